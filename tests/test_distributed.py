"""Placement of clients on ranks, what crosses the collectives, and the same federation on 1, 2 and 3 processes.

Multi-process runs use ``ddp_spawn`` on CPU. Starting processes costs more than these federations, so each launch
runs several federations in the same processes (:func:`federations`); this module must stay importable by them.
"""

from __future__ import annotations

import gc
import json
import math
import pickle
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

import fedhb.loop
from fedhb.algorithms import EPFL, FedAvg
from fedhb.client import ClientModule
from fedhb.config import CheckpointArgs, FabricArgs, FederationArgs, ModelArgs, OptimArgs, PartitionArgs
from fedhb.data import MedMNIST
from fedhb.fit import _Run
from fedhb.loop import FederatedLoop, assign_clients, host_copy
from fedhb.metrics import ClientScores
from fedhb.strategy import make_fabric

CLIENTS = 7
ALGORITHMS = {"fedavg": FedAvg, "epfl": lambda: EPFL(lam=0.5)}
# Collectives of torch.distributed that move data; a rank reaching any of them is recorded by the spy.
COLLECTIVES = ("all_gather", "all_gather_into_tensor", "_all_gather_base", "all_reduce", "broadcast", "reduce",
               "gather", "scatter", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
               "send", "recv", "isend", "irecv", "broadcast_object_list", "all_gather_object", "gather_object",
               "scatter_object_list", "send_object_list", "recv_object_list")


# -- placement ------------------------------------------------------------------------------------------------------
def test_clients_go_largest_first_to_the_least_loaded_rank():
    # 10 -> r0; 7 -> r1; 5 -> r1 (7 < 10); 5 -> r0 (10 < 12); 3 -> r1 (12 < 15)
    assert assign_clients([10, 7, 5, 5, 3], 2) == [0, 1, 1, 0, 1]
    # Empty clients still count one unit, so they spread instead of piling onto one rank.
    assert sorted(assign_clients([0, 0, 0, 0], 2)) == [0, 0, 1, 1]


def test_placement_balances_samples_not_client_counts():
    sizes = [400, 30, 25, 20, 15, 10, 5, 5]
    owner = assign_clients(sizes, 2)
    load = [sum(s for s, o in zip(sizes, owner) if o == r) for r in range(2)]
    assert owner[0] == 0 and set(owner[1:]) == {1}  # the big client alone on one rank
    assert load == [400, 110]
    many = [int(x) for x in torch.randint(1, 500, (200,), generator=torch.Generator().manual_seed(0))]
    for world in (2, 3, 8):
        owner = assign_clients(many, world)
        load = [sum(s for s, o in zip(many, owner) if o == r) for r in range(world)]
        assert max(load) - min(load) <= max(many), world  # greedy bound: never off by more than one client


def test_host_copy_keeps_detached_cpu_copies_and_pins_only_for_gpus(monkeypatch):
    param = torch.nn.Parameter(torch.randn(3, 4))
    plain = host_copy({"w": param}, pin=False)["w"]
    assert not plain.requires_grad and plain.device.type == "cpu" and torch.equal(plain, param.detach())
    assert plain.untyped_storage().data_ptr() != param.untyped_storage().data_ptr()
    # No CUDA here: check that the pinned path asks for page-locked memory, with a stand-in allocator.
    asked = []
    real_empty = torch.empty

    def empty(*shape, pin_memory=False, **kwargs):
        asked.append(pin_memory)
        return real_empty(*shape, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    pinned = host_copy({"w": param, "b": torch.zeros(2)}, pin=True)
    assert asked == [True, True] and torch.equal(pinned["w"], param.detach())


# -- federations in spawned processes -------------------------------------------------------------------------------
def make_run(root: str, out: Path, algorithm: str, world: int) -> _Run:
    args = dict(
        data=MedMNIST(root=root, fraction=0.5), algorithm=ALGORITHMS[algorithm](), out_dir=str(out), seed=5,
        partition=PartitionArgs(num_clients=CLIENTS, alpha=0.5), model=ModelArgs(),
        federation=FederationArgs(rounds=2, batch_size=16, eval_batch_size=128),
        optim=OptimArgs(name="adamw", lr=0.01, schedule="constant", min_lr=0.0),
        fabric=FabricArgs(accelerator="cpu", devices=world, strategy="ddp_spawn" if world > 1 else "auto"),
        checkpoint=CheckpointArgs(),
    )
    return _Run.of(**args)


def reversed_round_robin(sizes: list[int], world: int) -> list[int]:
    """A placement unlike the balanced one, to show the result does not depend on it."""
    return [(len(sizes) - 1 - c) % world for c in range(len(sizes))]


def _describe(obj: Any) -> list[str]:
    """Type names of everything inside an object sent by an object collective."""
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in _describe(x)]
    if isinstance(obj, dict):
        return [t for kv in obj.items() for x in kv for t in _describe(x)]
    return [type(obj).__name__]


def client_modules() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on every object touches deprecated torch attributes
        return sum(isinstance(o, ClientModule) for o in gc.get_objects())


@contextmanager
def observe(fabric: Any, facts: dict[str, Any], permute: bool):
    """Record every collective this rank joins and what the loop holds; optionally place clients differently."""
    sent: list[dict[str, Any]] = []
    saved = {name: getattr(torch.distributed, name) for name in COLLECTIVES if hasattr(torch.distributed, name)}

    def spy(name: str, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            tensors = [t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, (list, tuple)) else [a])
                       if isinstance(t, torch.Tensor)]
            entry: dict[str, Any] = {"op": name, "tensors": [(str(t.dtype), list(t.shape)) for t in tensors]}
            if name.endswith("_object") or name.endswith("object_list"):
                objects = args[0] if args else kwargs.get("object_list", kwargs.get("obj"))
                entry["objects"] = _describe(objects)
                entry["pickled_bytes"] = len(pickle.dumps(objects))
            sent.append(entry)
            return fn(*args, **kwargs)
        return call

    run = FederatedLoop.run

    def run_and_record(loop: FederatedLoop, *args: Any, **kwargs: Any) -> Any:
        facts.update(
            owner=list(loop.owner), mine=list(loop.mine), num_train=list(loop.num_train),
            state_keys={str(c): sorted(s) for c, s in loop.states.items()},
            state_bytes={str(c): sum(t.numel() * t.element_size() for t in s.values()) for c, s in loop.states.items()},
            trainable={n: p.numel() for n, p in loop.client_module.trainable().items()},
            client_modules=client_modules() - before,
        )
        return run(loop, *args, **kwargs)

    placement = fedhb.loop.assign_clients
    # Earlier federations in this process leave their model behind (Fabric keeps every set-up LightningModule in its
    # callbacks); count the models this federation adds.
    before = client_modules()
    try:
        for name, fn in saved.items():
            setattr(torch.distributed, name, spy(name, fn))
        FederatedLoop.run = run_and_record
        if permute:
            fedhb.loop.assign_clients = reversed_round_robin
        yield sent
    finally:
        for name, fn in saved.items():
            setattr(torch.distributed, name, fn)
        FederatedLoop.run = run
        fedhb.loop.assign_clients = placement


def federations(fabric: Any, root: str, out: str, plan: list[tuple[str, str, bool]]) -> dict[str, Any] | None:
    """Run each ``(name, algorithm, permute)`` of ``plan`` in these processes; every rank writes what it saw to
    ``out/name/rank{r}.json``; rank 0 returns the metrics of every run."""
    histories = {}
    for name, algorithm, permute in plan:
        folder = Path(out) / name
        facts: dict[str, Any] = {}
        with observe(fabric, facts, permute) as sent:
            make_run(root, folder, algorithm, fabric.world_size)(fabric)
        facts["collectives"] = sent
        (folder / f"rank{fabric.global_rank}.json").write_text(json.dumps(facts))
        if fabric.global_rank == 0:
            histories[name] = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return histories if fabric.global_rank == 0 else None


def launch(world: int, root: str, out: Path, plan: list[tuple[str, str, bool]]) -> dict[str, Any]:
    if world == 1:
        fabric = make_fabric(FabricArgs(accelerator="cpu"))
    else:
        fabric = make_fabric(FabricArgs(accelerator="cpu", devices=world, strategy="ddp_spawn"))
    return fabric.launch(federations, root, str(out), plan)


def facts(out: Path, name: str, world: int) -> list[dict[str, Any]]:
    return [json.loads((out / name / f"rank{r}.json").read_text()) for r in range(world)]


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal records: numbers to 1e-6, everything else exactly; wall-clock times are skipped."""
    if isinstance(a, dict):
        keys = set(a) - {"round_time_s"}
        assert keys == set(b) - {"round_time_s"}, where
        for k in keys:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)):
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-6, f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def check_placement(ranks: list[dict[str, Any]], expected_owner: list[int]) -> None:
    world = len(ranks)
    assert all(r["owner"] == expected_owner for r in ranks)  # every rank agrees on the placement
    mine = [set(r["mine"]) for r in ranks]
    assert set().union(*mine) == set(range(CLIENTS)) and sum(map(len, mine)) == CLIENTS
    trainable = ranks[0]["trainable"]
    for r, rank in enumerate(ranks):
        assert rank["mine"] == [c for c in range(CLIENTS) if expected_owner[c] == r]
        assert rank["client_modules"] == 1  # one backbone per process, whatever its number of clients
        # A rank keeps its own clients' states only, and a state is the trainable tensors, nothing else.
        assert sorted(map(int, rank["state_keys"])) == rank["mine"]
        for c in rank["mine"]:
            assert rank["state_keys"][str(c)] == sorted(trainable)
            assert rank["state_bytes"][str(c)] == 4 * sum(trainable.values())
    assert world == len({tuple(r["mine"]) for r in ranks})


def check_collectives(ranks: list[dict[str, Any]], algorithm: str) -> None:
    """Only adapter tensors (flat rows of client states or uploads) and per-client scalars cross; never inputs,
    labels or sample indices, and no object collective carries a tensor or an array."""
    trainable = ranks[0]["trainable"]
    state_width = sum(trainable.values())
    lora_width = sum(n for k, n in trainable.items() if "lora_" in k)
    upload_width = state_width if algorithm == "fedavg" else lora_width
    assert lora_width < state_width  # EPFL keeps the head home: its upload is narrower than the state
    num_classes = 11
    for rank in ranks:
        sent = rank["collectives"]
        widths = set()
        for entry in sent:
            assert entry["op"] in ("all_gather", "all_reduce", "broadcast_object_list"), entry
            if "objects" in entry:
                assert not {"Tensor", "ndarray", "Parameter"} & set(entry["objects"]), entry
                assert entry["pickled_bytes"] < 64 * 1024, entry
                continue
            for dtype, shape in entry["tensors"]:
                assert dtype in ("torch.float32", "torch.float64"), entry  # images are uint8, labels int64
                if entry["op"] == "all_gather":
                    height, width = shape
                    assert height <= max(len(r["mine"]) for r in ranks), entry
                    assert width <= 1 + ClientScores.width or width in (upload_width, state_width), entry
                    widths.add(width)
                else:  # sums of compute time and of confusion counts
                    assert math.prod(shape) in (1, num_classes * num_classes), entry
        assert upload_width in widths  # the uploads did cross, as one block of flat rows per rank


@pytest.mark.slow
def test_one_two_and_three_processes_and_any_placement_give_the_same_federation(organamnist_root, tmp_path):
    reference = launch(1, organamnist_root, tmp_path / "one", [("fedavg", "fedavg", False), ("epfl", "epfl", False)])
    two = launch(2, organamnist_root, tmp_path / "two", [("fedavg", "fedavg", False), ("epfl", "epfl", False)])
    three = launch(3, organamnist_root, tmp_path / "three", [("epfl", "epfl", False), ("epfl_moved", "epfl", True)])

    assert [r["round"] for r in reference["fedavg"]] == [1, 2]
    assert reference["fedavg"][-1]["global_acc"] is not None and reference["epfl"][-1]["global_acc"] is None
    runs = [(two, "fedavg", "fedavg"), (two, "epfl", "epfl"), (three, "epfl", "epfl"), (three, "epfl_moved", "epfl")]
    for result, name, algorithm in runs:
        assert_same(reference[algorithm], result[name], name)

    sizes = facts(tmp_path / "one", "fedavg", 1)[0]["num_train"]
    for out, world, name, algorithm, moved in ((tmp_path / "two", 2, "fedavg", "fedavg", False),
                                               (tmp_path / "two", 2, "epfl", "epfl", False),
                                               (tmp_path / "three", 3, "epfl", "epfl", False),
                                               (tmp_path / "three", 3, "epfl_moved", "epfl", True)):
        ranks = facts(out, name, world)
        expected = reversed_round_robin(sizes, world) if moved else assign_clients(sizes, world)
        check_placement(ranks, expected)
        check_collectives(ranks, algorithm)
    assert reversed_round_robin(sizes, 3) != assign_clients(sizes, 3)


# -- process exit -----------------------------------------------------------------------------------------------------
def _exit_handlers_release_the_group(fabric: Any) -> list[bool]:
    """Whether this rank's process group is up before and after the handlers Python runs at exit."""
    import atexit

    import torch.distributed as dist

    before = dist.is_initialized()
    atexit._run_exitfuncs()  # what the interpreter runs at exit, before it tears modules down
    return [before, dist.is_initialized()]


@pytest.mark.slow
def test_every_process_destroys_its_process_group_at_exit():
    # Left to finalization, gloo's threads can free tensors after Python is gone: rank 1 then aborted with SIGABRT
    # after a finished run (CI, stop 20). The strategy registers the destroy at exit in every process.
    fabric = make_fabric(FabricArgs(accelerator="cpu", devices=2, strategy="ddp_spawn"))
    assert fabric.launch(_exit_handlers_release_the_group) == [True, False]
