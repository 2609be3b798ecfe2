"""Client updates per second, federation overhead, peak memory and bytes per round of fedhb's loop, against the same
federation run the way PFLlib and FLamby run it (a deep copy of the model per client, clients one after another).

    python benchmarks/throughput.py            # 10, 100 and 1,000 clients (about 5 minutes on 2 idle cores)
    python benchmarks/throughput.py --quick    # 10 and 100 clients: a smoke test

The workload is fixed: the ``tiny-vit`` preset with LoRA r=8 on query/value and a linear head, FedAvg, SGD, one local
epoch of 32 samples (2 batches of 16) per client per round and every client evaluated on its 16 test samples each
round (its own model, then the global model on the union, as fedhb's loop does). Samples come from one pool of learnable
28 px images shared by all cell sizes, so the data take the same memory for 10 or 1,000 clients and what grows with
the client count is what the federation keeps per client.

Every cell runs in its own process(es) with one torch thread per process, and reports:

- ``updates/s``: clients trained per second of round wall time;
- ``CPU ms/update``: CPU time of all the cell's processes per client update; unlike updates/s it barely moves when
  other jobs load the machine, so it tells the cost of the work from the wait for a core;
- ``overhead``: the share of process time in a round spent outside client training and evaluation (state swaps,
  uploads, collectives, aggregation, waiting for the slower rank): ``1 - compute_s / (processes * time_s)`` from the
  loop's ``RoundResult``;
- ``peak RSS``: the resident-set high-water mark of each process (``getrusage``), the largest over the processes;
- ``live MB``: heap memory in use at the end (glibc's ``mallinfo2``), which unlike the high-water mark leaves out
  memory the allocator holds free; the two differ by glibc's fragmentation (see benchmarks/README.md);
- ``bytes/round``: what the clients upload and receive.

Rounds after the first are averaged (the first pays for lazy initialisation). Figures depend on the load of the
machine; the header prints its cores and load average. ``LD_PRELOAD`` and ``MALLOC_*`` variables reach the cells, so
another allocator can be compared without editing this file.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np

from fedhb.config import ModelArgs, OptimArgs

SEED = 42
POOL = 4096  # samples shared by every cell
TRAIN, VAL, TEST = 32, 8, 16  # samples per client
BATCH = 16
CLASSES = 11
LR = 0.05
OPTIM = OptimArgs(name="sgd", lr=LR, schedule="constant")  # the model-copy loop uses the same


# -- the workload -------------------------------------------------------------------------------------------------
def workload(num_clients: int) -> tuple[Any, list[Any]]:
    """The sample pool and every client's split (indices into it), identical for both runners."""
    from fedhb.data.base import Samples
    from fedhb.data.fixtures import class_images
    from fedhb.data.partition import ClientSplit

    images, labels = class_images(CLASSES, POOL, 28, 1, np.random.default_rng(SEED))
    samples = Samples(inputs=images, labels=labels.astype(np.int64), num_classes=CLASSES, task="multi-class",
                      modality="image")
    splits = []
    for c in range(num_clients):
        idx = np.random.default_rng([SEED, c]).choice(POOL, TRAIN + VAL + TEST, replace=False)
        splits.append(ClientSplit(np.sort(idx[:TRAIN]), np.sort(idx[TRAIN:TRAIN + VAL]), np.sort(idx[TRAIN + VAL:])))
    return samples, splits


def build_module(samples: Any) -> tuple[Any, dict[str, Any]]:
    """The tiny ViT with LoRA and head, initialised from the run seed as ``fedhb fit`` does."""
    from fedhb import build

    module = build.build_module(ModelArgs(backbone="tiny-vit"), samples, OPTIM, SEED)
    return module, module.prepare(samples)


def federation_args(rounds: int) -> Any:
    from fedhb.config import FederationArgs

    return FederationArgs(rounds=rounds, batch_size=BATCH, eval_batch_size=64)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def live_heap_bytes() -> float:
    """Bytes glibc's malloc has handed out and not got back (heap in use plus mmapped blocks); NaN elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return float("nan")
    return float(info.uordblks + info.hblkhd)


def summarize(rounds: list[dict[str, float]], processes: int) -> dict[str, float]:
    timed = rounds[1:] or rounds  # the first round pays for lazy initialisation
    time_s = float(np.mean([r["time_s"] for r in timed]))
    compute_s = float(np.mean([r["compute_s"] for r in timed]))
    trained = float(np.mean([r["trained"] for r in timed]))
    cpu_s = float(np.mean([r["cpu_s"] for r in timed]))
    return {"round_s": time_s, "updates_per_s": trained / time_s, "cpu_ms_per_update": 1000 * cpu_s / trained,
            "overhead": max(0.0, 1 - compute_s / (processes * time_s)),
            "bytes_per_round": float(np.mean([r["bytes"] for r in timed]))}


# -- fedhb ----------------------------------------------------------------------------------------------------------
def fedhb_cell(num_clients: int, processes: int, rounds: int, algorithm: str = "FedAvg") -> dict[str, Any] | None:
    """fedhb's ``FederatedLoop`` on ``processes`` CPU processes (``ddp``: this command is re-run for rank 1)."""
    import torch

    from fedhb.algorithms._ops import state_bytes
    from fedhb.build import build_loop
    from fedhb.config import FabricArgs
    from fedhb.strategy import make_fabric

    torch.set_num_threads(1)
    fabric = make_fabric(FabricArgs(accelerator="cpu", devices=processes, strategy="ddp" if processes > 1 else "auto"))
    fabric.launch()
    samples, splits = workload(num_clients)
    import fedhb.algorithms

    loop = build_loop(fabric, samples, splits, getattr(fedhb.algorithms, algorithm)(),
                      model=ModelArgs(backbone="tiny-vit"),
                      federation=federation_args(rounds), optim=OPTIM, seed=SEED)
    per_client = [state_bytes(s) for s in loop.states.values()]
    results = []
    acc = float("nan")
    for rnd in range(1, rounds + 1):
        cpu = time.process_time()
        r = loop.run_round(rnd)
        # CPU seconds of every process: on a loaded machine, what the round cost apart from waiting for a core.
        cpu = float(fabric.all_reduce(torch.tensor(time.process_time() - cpu, dtype=torch.float64), reduce_op="sum"))
        results.append({"time_s": r.time_s, "compute_s": r.compute_s, "bytes": r.bytes_up + r.bytes_down,
                        "trained": len(r.selected) - len(r.failed), "cpu_s": cpu})
        acc = r.metrics["personalized_acc"] if r.metrics else acc
    # Round figures are rank 0's (every round ends in collectives, so ranks finish it together); memory is per rank.
    memory = fabric.all_gather(torch.tensor([peak_rss_bytes(), live_heap_bytes()], dtype=torch.float64))
    memory = memory.reshape(-1, 2)
    if fabric.global_rank != 0:
        return None
    return {**summarize(results, processes), "peak_rss": float(memory[:, 0].max()), "live": float(memory[:, 1].max()),
            "state_bytes": per_client[0], "accuracy": acc}


# -- the model-copy loop (PFLlib, FLamby) ---------------------------------------------------------------------------
def copy_cell(num_clients: int, rounds: int) -> dict[str, Any]:
    """One ``deepcopy`` of the whole model per client (PFLlib's ``clientAVG``, FLamby's per-client model list), clients
    trained one after another in plain PyTorch, FedAvg over every parameter as PFLlib's server does, then each client
    receives a copy of the global model. Same data, seeds and evaluation as the fedhb cell."""
    import torch

    from fedhb.loop import client_seed
    from fedhb.metrics import score_logits

    torch.set_num_threads(1)
    samples, splits = workload(num_clients)
    server, tensors = build_module(samples)
    clients = [copy.deepcopy(server) for _ in range(num_clients)]
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=LR) for m in clients]
    weights = torch.tensor([s.num_train for s in splits], dtype=torch.float64)
    weights = weights / weights.sum()
    model_bytes = sum(p.numel() * p.element_size() for p in server.parameters())

    def batches(index: np.ndarray, size: int, order: torch.Generator | None = None) -> Any:
        if order is not None:
            index = index[torch.randperm(len(index), generator=order).numpy()]
        for start in range(0, len(index), size):
            rows = torch.from_numpy(index[start:start + size])
            yield {k: v[rows] for k, v in tensors.items()}

    @torch.no_grad()
    def test(model: torch.nn.Module, index: np.ndarray) -> float:
        """The client's scores with fedhb's own metric code, so that both runners evaluate alike."""
        model.eval()
        logits = torch.cat([model(batch) for batch in batches(index, 64)])
        return score_logits(logits, tensors["labels"][torch.from_numpy(index)], samples.task, CLASSES).acc

    results = []
    acc = 0.0
    for rnd in range(1, rounds + 1):
        start, cpu = time.perf_counter(), time.process_time()
        compute = 0.0
        for c, (model, opt) in enumerate(zip(clients, optimizers)):
            t = time.perf_counter()
            seed = client_seed(SEED, rnd, c)
            torch.manual_seed(seed)
            model.train()
            for batch in batches(splits[c].train, BATCH, torch.Generator().manual_seed(seed)):
                loss = model.training_step(batch)["loss"]
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            compute += time.perf_counter() - t
        with torch.no_grad():  # PFLlib's aggregate_parameters: every parameter of the model, weighted by samples
            for p in server.parameters():
                p.zero_()
            for w, model in zip(weights.tolist(), clients):
                for new, old in zip(server.parameters(), model.parameters()):
                    new.add_(old.detach(), alpha=w)
            for model in clients:  # PFLlib's set_parameters: every parameter
                for new, old in zip(server.parameters(), model.parameters()):
                    old.data = new.data.clone()
        t = time.perf_counter()
        scores = [test(model, s.test) for model, s in zip(clients, splits)]
        for s in splits:
            test(server, s.test)
        compute += time.perf_counter() - t
        acc = float(np.mean(scores))
        results.append({"time_s": time.perf_counter() - start, "compute_s": compute, "trained": num_clients,
                        "bytes": 2 * num_clients * model_bytes, "cpu_s": time.process_time() - cpu})
    return {**summarize(results, 1), "peak_rss": float(peak_rss_bytes()), "live": live_heap_bytes(),
            "state_bytes": model_bytes, "accuracy": acc}


# -- the table ------------------------------------------------------------------------------------------------------
def run_cells(runner: str, clients: int, processes: int, rounds: int, copies: int = 1,
              algorithm: str = "FedAvg") -> list[dict[str, Any]]:
    """``copies`` identical cells at once, each in fresh processes with one torch thread each; a cell's JSON line is
    the last line of its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, os.path.abspath(__file__), "--cell", runner, "--clients", str(clients),
           "--processes", str(processes), "--rounds", str(rounds), "--algorithm", algorithm]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(copies)]
    outs = []
    for proc in procs:
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"cell {runner} {clients} clients x{processes} failed:\n{stderr[-3000:]}")
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    return outs


def machine() -> str:
    import lightning
    import torch

    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"machine: {cores} cores ({model}), 1 torch thread per process, load average {load} (1/5/15 min)\n"
            f"python {platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}")


def mb(x: float) -> str:
    return f"{x / 2**20:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 and 100 clients only")
    parser.add_argument("--clients", type=int, nargs="*", help="client counts (default 10 100 1000)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per cell; the first is not timed (default 2)")
    parser.add_argument("--cell", choices=["fedhb", "copy"], help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--algorithm", default="FedAvg",
                        help="fedhb's algorithm (default FedAvg; e.g. EPFL for its memory per client; the model-copy "
                             "loop always runs FedAvg)")
    args = parser.parse_args()
    if args.cell is not None:
        n = args.clients[0]
        out = (fedhb_cell(n, args.processes, args.rounds, args.algorithm) if args.cell == "fedhb"
               else copy_cell(n, args.rounds))
        if out is not None:
            print(json.dumps(out), flush=True)
        return

    counts = args.clients or ([10, 100] if args.quick else [10, 100, 1000])
    rounds = max(2, args.rounds)
    began = time.perf_counter()
    print(machine())
    print(f"workload: tiny-vit + LoRA r=8 (query, value) + head, {args.algorithm} (model copy: FedAvg), SGD, "
          f"{TRAIN} train / {TEST} test samples per "
          f"client, batch {BATCH}, {rounds} rounds (round 1 not timed)\n", flush=True)
    cells: dict[tuple[int, str], dict[str, Any]] = {}
    print("| clients | runner | processes | updates/s | CPU ms/update | round s | overhead | peak RSS MB/proc "
          "| live MB/proc | state KB/client | bytes/round | accuracy |")
    print("|" + "---|" * 12)
    for n in counts:
        for name, runner, procs in (("fedhb", "fedhb", 1), ("fedhb", "fedhb", 2), ("model copy", "copy", 1)):
            r = run_cells(runner, n, procs, rounds, algorithm=args.algorithm)[0]
            cells[(n, f"{runner}{procs}")] = r
            print(f"| {n} | {name} | {procs} | {r['updates_per_s']:.1f} | {r['cpu_ms_per_update']:.1f} "
                  f"| {r['round_s']:.2f} | {r['overhead']:.1%} "
                  f"| {mb(r['peak_rss'])} | {mb(r['live'])} | {r['state_bytes'] / 1024:.1f} "
                  f"| {r['bytes_per_round'] / 2**20:.2f} MB | {r['accuracy']:.3f} |", flush=True)

    print("\nratios (same run):\n")
    print("| clients | fedhb 2 proc / 1 proc, updates/s | fedhb / model copy, updates/s | fedhb / model copy, peak RSS "
          "|\n|---|---|---|---|")
    for n in counts:
        one, two, cp = cells[(n, "fedhb1")], cells[(n, "fedhb2")], cells[(n, "copy1")]
        print(f"| {n} | {two['updates_per_s'] / one['updates_per_s']:.2f}x "
              f"| {one['updates_per_s'] / cp['updates_per_s']:.2f}x | {one['peak_rss'] / cp['peak_rss']:.2f} |")
    # How much a second process can add on this machine at all: two independent one-process cells at the same time
    # share nothing but the machine, so their combined rate bounds what fedhb on 2 processes can reach here.
    n = 100 if 100 in counts else counts[-1]
    pair = run_cells("fedhb", n, 1, rounds, copies=2, algorithm=args.algorithm)
    alone = cells[(n, "fedhb1")]
    combined = sum(r["updates_per_s"] for r in pair)
    print(f"\nparallel ceiling of this machine, {n} clients: two independent one-process cells at once make "
          f"{combined:.1f} updates/s together ({combined / alone['updates_per_s']:.2f}x one alone) at "
          f"{np.mean([r['cpu_ms_per_update'] for r in pair]):.1f} CPU ms/update; fedhb on 2 processes made "
          f"{cells[(n, 'fedhb2')]['updates_per_s']:.1f} updates/s at {cells[(n, 'fedhb2')]['cpu_ms_per_update']:.1f}")
    if len(counts) >= 2:
        lo, hi = counts[-2], counts[-1]
        print(f"\nmemory growth per added client, {lo} -> {hi} clients, one process:")
        for key, name in (("fedhb1", "fedhb"), ("copy1", "model copy")):
            a, b = cells[(lo, key)], cells[(hi, key)]
            state = b["state_bytes"]
            for label, field in (("peak RSS", "peak_rss"), ("live heap", "live")):
                growth = (b[field] - a[field]) / (hi - lo)
                print(f"  {name:10s} {label:9s}: {growth / 1024:7.1f} KB per client = {growth / state:5.2f}x its "
                      f"per-client state ({state / 1024:.1f} KB)")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\ntotal {time.perf_counter() - began:.0f} s; load average at the end {load}")


if __name__ == "__main__":
    main()
