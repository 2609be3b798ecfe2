"""Client-batched local training (``--federation.client_batch``, :mod:`fedhb.batched`) gives the numbers of training
the clients one at a time: the same client states, losses, bytes and metrics, for every algorithm that allows it,
with clients of unequal sizes and partial participation; the others fall back to sequential training."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import fedhb.batched
from fedhb.algorithms import (
    EPFL,
    SCAFFOLD,
    Algorithm,
    Centralized,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedNova,
    FedPer,
    FedProx,
    FedSALoRA,
    FedYogi,
    FFALoRA,
    Local,
)
from fedhb.algorithms import names as algorithm_names
from fedhb.config import FabricArgs, FederationArgs, ModelArgs, OptimArgs, PartitionArgs

CLIENTS = 6
FRACTION = 0.5  # 3 of the 6 clients train in each round
TOL = 1e-5


def federation(samples: Any, algorithm: Algorithm, client_batch: int, *, optim: str = "sgd", momentum: float = 0.0,
               fraction: float = FRACTION, rounds: int = 2, model: ModelArgs | None = None,
               clients: int = CLIENTS, init: Any = None, protocol: str = "after_aggregation",
               local_epochs: int = 1, precision: str = "32-true") -> Any:
    """A 2-round federation; evaluated in its last round. Returns the loop after the rounds and the round results."""
    from fedhb.build import build_loop
    from fedhb.data.partition import partition_samples
    from fedhb.strategy import make_fabric

    partition = PartitionArgs(num_clients=clients, alpha=0.5, scheme="dirichlet", min_samples=10)
    splits = partition_samples(samples, partition.scheme, clients, partition.alpha, partition.min_samples,
                               partition.split, 0, None)
    args = FederationArgs(rounds=rounds, eval_every=rounds, batch_size=16, fraction=fraction,
                          client_batch=client_batch, eval_protocol=protocol,  # type: ignore[arg-type]
                          local_epochs=local_epochs)
    optim_args = OptimArgs(name=optim, lr=0.05, momentum=momentum, schedule="cosine", min_lr=0.01)
    loop = build_loop(make_fabric(FabricArgs(accelerator="cpu", precision=precision)), samples, splits, algorithm,
                      model=model or ModelArgs(), federation=args, optim=optim_args, seed=0, init=init)
    loop.initial = {c: {k: v.clone() for k, v in s.items()} for c, s in loop.states.items()}
    results = [loop.run_round(r) for r in range(1, rounds + 1)]
    for r in results:
        loop.record(r)
    return loop, results


def assert_same(a: tuple[Any, list[Any]], b: tuple[Any, list[Any]], tol: float = TOL) -> None:
    (loop_a, res_a), (loop_b, res_b) = a, b
    assert sorted(loop_a.states) == sorted(loop_b.states)
    for c in loop_a.states:
        sa, sb = loop_a.states[c], loop_b.states[c]
        assert sorted(sa) == sorted(sb)
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=tol, msg=f"client {c} {k}")
    for ra, rb in zip(res_a, res_b):
        assert ra.selected == rb.selected and ra.failed == rb.failed and ra.dropped == rb.dropped
        assert (ra.bytes_up, ra.bytes_down) == (rb.bytes_up, rb.bytes_down)
        assert math.isclose(ra.train_loss, rb.train_loss, rel_tol=0, abs_tol=tol), (ra.train_loss, rb.train_loss)
    ma, mb = loop_a.history[-1], loop_b.history[-1]
    ma.pop("round_time_s"), mb.pop("round_time_s")
    assert_close_record(ma, mb, tol=tol)


def assert_close_record(a: Any, b: Any, where: str = "", tol: float = TOL) -> None:
    """Equal ``metrics.jsonl`` records: numbers to ``tol`` (NaN equal to NaN), everything else exactly."""
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), where
        for k in a:
            assert_close_record(a[k], b[k], f"{where}.{k}", tol)
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=0, abs_tol=tol) or (math.isnan(a) and math.isnan(b)), (where, a, b)
    else:
        assert a == b, where


@pytest.fixture
def passes(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The client counts of every shared pass taken (``[3, 3, 2, ...]``)."""
    seen: list[list[int]] = []
    real = fedhb.batched.ClientBatcher._step

    def spy(self: Any, trainers: Any, plans: Any, optimizers: Any, parts: Any) -> Any:
        seen.append([len(rows) for _, rows, _ in parts])
        return real(self, trainers, plans, optimizers, parts)

    monkeypatch.setattr(fedhb.batched.ClientBatcher, "_step", spy)
    return seen


BATCHABLE = {
    "fedavg": FedAvg,
    "fedavg_median": lambda: FedAvg(aggregation="median"),
    "fedprox": lambda: FedProx(mu=0.5),
    "ffa_lora": FFALoRA,
    "fedsa_lora": FedSALoRA,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedper": FedPer,
    "local": Local,
    "epfl": lambda: EPFL(lam=0.5),
}


@pytest.mark.parametrize("name", list(BATCHABLE))
def test_three_clients_per_pass_equal_one_at_a_time(tiny_data, passes, name):
    sequential = federation(tiny_data, BATCHABLE[name](), 1)
    assert passes == []
    batched = federation(tiny_data, BATCHABLE[name](), 3)
    loop = batched[0]
    assert loop.batcher.unsupported() is None and loop.batcher.fell_back == 0
    # The passes did share clients: 3 per pass while all have batches, fewer once the smaller ones ran out
    # (the clients' sizes differ); full batches alike go through one batched matmul, batches of unequal sizes (each
    # client's last one) through the grouped path.
    counts = [len(p) for p in passes]
    assert max(counts) == 3 and min(counts) < 3
    assert any(len(set(p)) > 1 for p in passes) and any(len(p) > 1 and len(set(p)) == 1 for p in passes)
    assert_same(sequential, batched)
    # Training changed every trained client (the comparison is not between two untouched states).
    trained = {c for r in batched[1] for c in r.selected}
    assert len(trained) > 3
    untouched = [c for c in trained if all(torch.equal(v, loop.initial[c][k]) for k, v in loop.states[c].items())]
    assert not untouched


@pytest.mark.parametrize("optim,momentum", [("adam", 0.0), ("sgd", 0.9)])
def test_each_client_keeps_its_own_optimizer_state(tiny_data, passes, optim, momentum):
    # Adam's moments and SGD's momentum buffers are per client: one shared optimizer would mix them. Two local
    # epochs: each client reshuffles its own data between them.
    sequential = federation(tiny_data, FedAvg(), 1, optim=optim, momentum=momentum, local_epochs=2)
    batched = federation(tiny_data, FedAvg(), 3, optim=optim, momentum=momentum, local_epochs=2)
    assert passes
    assert_same(sequential, batched)


def test_fhbench_protocol_scores_each_client_right_after_its_shared_pass(tiny_data, passes):
    # FHBench scores every client on val/test right after local training: each from its own trained model.
    sequential = federation(tiny_data, FedSALoRA(), 1, protocol="fhbench")
    batched = federation(tiny_data, FedSALoRA(), 3, protocol="fhbench")
    assert passes
    assert_same(sequential, batched)
    assert sequential[0].best_val.keys() == batched[0].best_val.keys()
    for c, (val, test) in sequential[0].best_val.items():
        assert math.isclose(val, batched[0].best_val[c][0], abs_tol=TOL)
        torch.testing.assert_close(test, batched[0].best_val[c][1], rtol=0, atol=TOL, equal_nan=True)


def test_bf16_mixed_keeps_the_autocast_of_sequential_training(tiny_data, passes):
    # The shared pass runs under the same autocast; bf16 rounds a batched matmul and two linears alike here, but
    # the tolerance allows for a kernel that accumulates in another order (bf16 has 8 bits of mantissa).
    sequential = federation(tiny_data, FedProx(mu=0.1), 1, precision="bf16-mixed")
    batched = federation(tiny_data, FedProx(mu=0.1), 3, precision="bf16-mixed")
    assert passes
    assert_same(sequential, batched, tol=1e-3)


def test_groups_of_two_and_every_client(tiny_data, passes):
    # All 6 clients train: groups of 2, 2 and 2 with K = 2; K larger than the clients of a process is one group.
    for k in (2, 8):
        passes.clear()
        assert_same(federation(tiny_data, FedProx(mu=0.1), 1, fraction=1.0),
                    federation(tiny_data, FedProx(mu=0.1), k, fraction=1.0))
        assert max(len(p) for p in passes) == min(k, CLIENTS)


@pytest.mark.parametrize("algorithm", [FedNova, SCAFFOLD])
def test_algorithms_that_cannot_share_a_pass_train_one_at_a_time(tiny_data, passes, algorithm):
    sequential = federation(tiny_data, algorithm(), 1)
    batched = federation(tiny_data, algorithm(), 3)
    assert passes == []  # no shared pass was taken
    assert "one client at a time" in str(batched[0].batcher.unsupported())
    for c in sequential[0].states:
        for k, v in sequential[0].states[c].items():
            assert torch.equal(v, batched[0].states[c][k]), (c, k)
    assert [r.train_loss for r in sequential[1]] == [r.train_loss for r in batched[1]]


def test_a_diverging_client_fails_alone(tiny_data, passes, monkeypatch):
    # One client's head is NaN before round 1: its loss is not finite at its first step; it fails as it would
    # sequentially (state kept, excluded), while the others of its pass train as usual.
    from fedhb.loop import FederatedLoop

    real = FederatedLoop.train

    def poisoned(self: Any, rnd: int, plan: Any) -> Any:
        if rnd == 1:
            victim = plan.reporting[1]
            for k, v in self.states[victim].items():
                if k.startswith("head."):
                    v.fill_(float("nan"))
        return real(self, rnd, plan)

    monkeypatch.setattr(FederatedLoop, "train", poisoned)
    sequential = federation(tiny_data, FedAvg(), 1, rounds=1)
    batched = federation(tiny_data, FedAvg(), 3, rounds=1)
    assert passes
    assert sequential[1][0].failed and sequential[1][0].failed == batched[1][0].failed
    for c in sequential[0].states:
        for k, v in sequential[0].states[c].items():
            torch.testing.assert_close(v, batched[0].states[c][k], rtol=0, atol=TOL, equal_nan=True)
    assert math.isclose(sequential[1][0].train_loss, batched[1][0].train_loss, abs_tol=TOL)


def test_a_text_encoder_with_padding_trimmed_per_batch(passes):
    # tiny-bert trims each batch to its longest text: a shared pass is as wide as its longest client's batch, and
    # masked padding leaves every client's numbers as in its own, narrower pass. Dropout off (BERT's default is 0.1).
    import numpy as np

    from fedhb.data.base import Samples

    rng = np.random.default_rng(0)
    words = ["the", "lungs", "are", "clear", "mild", "effusion", "normal", "chest", "small", "left", "heart", "no"]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(2, 30)))) for _ in range(240)]
    labels = np.array([("clear" in t) + ("effusion" in t) for t in texts], dtype=np.int64)
    samples = Samples(inputs=texts, labels=labels, num_classes=3, task="multi-class", modality="text",
                      meta={"dataset": "t"})

    def no_dropout(module: Any) -> None:
        for m in module.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0

    model = ModelArgs(backbone="tiny-bert", max_length=32)
    sequential = federation(samples, FedAvg(), 1, model=model, clients=4, fraction=0.75, init=no_dropout)
    batched = federation(samples, FedAvg(), 3, model=model, clients=4, fraction=0.75, init=no_dropout)
    assert passes and max(len(p) for p in passes) == 3
    assert_same(sequential, batched)


def test_centralized_pools_on_one_client(tiny_data, passes):
    # Client 0 trains on everything, the others on nothing: a pass with one client, zero-step clients beside it.
    assert_same(federation(tiny_data, Centralized(), 1, fraction=1.0, rounds=1),
                federation(tiny_data, Centralized(), 3, fraction=1.0, rounds=1))


def test_only_plain_local_updates_are_declared_batchable():
    # A subclass inheriting client_batchable = True with a local update of its own would be batched wrongly: every
    # class that declares it uses a local update the batched path was checked against here.
    import fedhb.algorithms as algorithms

    checked = {Algorithm.local_update, FedProx.local_update, FFALoRA.local_update}
    batchable = []
    for name in algorithm_names():
        cls = getattr(algorithms, name)
        if cls.client_batchable:
            assert cls.local_update in checked, name
            batchable.append(name)
    assert {"FedAvg", "FedProx", "FFALoRA", "FedSALoRA", "FedAvgM", "FedAdam", "FedYogi", "FedAdagrad", "Local",
            "EPFL", "FedPer", "Centralized"} <= set(batchable)
    for name in ("SCAFFOLD", "FedNova", "Ditto", "MOON", "FedRep", "FedBABU", "APFL", "PFedMe", "PerFedAvg",
                 "FedALA", "FedDyn", "FedDPA", "FLoRA", "HetLoRA", "APPLE"):
        cls = getattr(algorithms, name)
        assert not cls.client_batchable, name
        assert "one client at a time" in " ".join((cls.__doc__ or "").split()), name


def test_a_method_wrongly_declared_batchable_is_told_what_it_called(tiny_data):
    class TwoPhases(FedAvg):
        def local_update(self, trainer: Any, state: Any) -> None:
            trainer.fit()
            trainer.fit(trainable=[n for n in trainer.names if n.startswith("head.")])

    with pytest.raises(RuntimeError, match=r"^TwoPhases sets client_batchable = True, but its local_update calls "
                                           r"trainer.fit twice; set client_batchable = False on it"):
        federation(tiny_data, TwoPhases(), 3, rounds=1)


def test_client_batch_must_be_positive():
    with pytest.raises(ValueError, match=r"^--federation.client_batch must be >= 1, got 0$"):
        FederationArgs(client_batch=0)


# -- two processes ------------------------------------------------------------------------------------------------
def _fit(fabric: Any, root: str, out: str, client_batch: int) -> dict[str, Any]:
    """A 2-round FedProx federation of 6 clients through ``fedhb fit``'s run, in these processes (on 2, each rank
    trains its clients in passes of ``client_batch``); rank 0 returns its records and the clients each rank batched."""
    import json
    from pathlib import Path

    from fedhb.config import CheckpointArgs
    from fedhb.data import MedMNIST
    from fedhb.fit import _Run

    args = dict(
        data=MedMNIST(root=root, fraction=0.3), algorithm=FedProx(mu=0.1), out_dir=out, seed=3,
        partition=PartitionArgs(num_clients=CLIENTS, alpha=0.5), model=ModelArgs(),
        federation=FederationArgs(rounds=2, batch_size=16, client_batch=client_batch),
        optim=OptimArgs(name="adamw", lr=0.01, schedule="constant", min_lr=0.0),
        fabric=FabricArgs(accelerator="cpu", devices=fabric.world_size,
                          strategy="ddp_spawn" if fabric.world_size > 1 else "auto"),
        checkpoint=CheckpointArgs(),
    )
    run = _Run.of(**args)
    real = fedhb.batched.ClientBatcher._train_together
    groups: list[int] = []

    def counted(self: Any, clients: list[int], rnd: int) -> Any:
        groups.append(len(clients))
        return real(self, clients, rnd)

    fedhb.batched.ClientBatcher._train_together = counted  # type: ignore[method-assign]
    try:
        run(fabric)
    finally:
        fedhb.batched.ClientBatcher._train_together = real  # type: ignore[method-assign]
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {"records": records, "groups": fabric.all_gather(torch.tensor(sum(groups))).tolist()}


@pytest.mark.slow
def test_two_processes_batching_their_clients_equal_one_process_one_at_a_time(organamnist_root, tmp_path):
    from fedhb.strategy import make_fabric

    one = make_fabric(FabricArgs(accelerator="cpu")).launch(_fit, organamnist_root, str(tmp_path / "one"), 1)
    two = make_fabric(FabricArgs(accelerator="cpu", devices=2, strategy="ddp_spawn")).launch(
        _fit, organamnist_root, str(tmp_path / "two"), 2)
    assert one["groups"] == 0 and len(two["groups"]) == 2 and min(two["groups"]) > 0  # both ranks batched clients
    assert len(one["records"]) == len(two["records"]) == 2
    for a, b in zip(one["records"], two["records"]):
        a.pop("round_time_s"), b.pop("round_time_s")
        assert_close_record(a, b)
