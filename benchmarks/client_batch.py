"""Client-batched local training (``--federation.client_batch K``) against training the clients one at a time.

    python benchmarks/client_batch.py                       # K = 4 and 8, 20 clients, 6 timed rounds each
    python benchmarks/client_batch.py --client_batch 8 --rounds 3 --device cuda --precision bf16-mixed

Two federations of the same workload (the OrganAMNIST-format fixture at 28 px, 20 clients, Dirichlet 0.5, the
``tiny-vit`` preset with LoRA r=8 on query/value and a linear head, FedAvg, SGD, one local epoch, batch 32) are built
in one process from the same seed: one with ``client_batch 1``, one with ``client_batch K``. Their rounds run
interleaved (sequential round r, batched round r, sequential round r + 1, ...), so load on the machine hits both alike;
rounds do not evaluate, so a round is its clients' training plus the federation's own work. Round 1 of each is not
timed. The script prints the median round time of each, their ratio (sequential / batched: above 1 means batched is
faster) in wall time and in CPU time of the process (which load from other jobs barely moves), client updates per
second, and the largest difference between the two federations' client states at the end
(float rounding only: the numbers are the same).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import torch


def build(root: str, client_batch: int, rounds: int, clients: int, device: str, precision: str) -> Any:
    from fedhb.build import build_loop
    from fedhb.config import FabricArgs, FederationArgs, ModelArgs, OptimArgs, PartitionArgs
    from fedhb.data import MedMNIST
    from fedhb.data.partition import partition_samples
    from fedhb.strategy import make_fabric

    samples = MedMNIST(root=root).load()
    partition = PartitionArgs(num_clients=clients, alpha=0.5, scheme="dirichlet", min_samples=10)
    splits = partition_samples(samples, partition.scheme, clients, partition.alpha, partition.min_samples,
                               partition.split, 0, None)
    federation = FederationArgs(rounds=rounds, eval_every=10 ** 6, batch_size=32, client_batch=client_batch)
    fabric = make_fabric(FabricArgs(accelerator=device, precision=precision))  # type: ignore[arg-type]
    from fedhb.algorithms import FedAvg

    return build_loop(fabric, samples, splits, FedAvg(), model=ModelArgs(), federation=federation,
                      optim=OptimArgs(name="sgd", lr=0.05, schedule="constant"), seed=0)


def compare(root: str, k: int, rounds: int, clients: int, device: str, precision: str) -> dict[str, float]:
    loops = {1: build(root, 1, rounds + 1, clients, device, precision),
             k: build(root, k, rounds + 1, clients, device, precision)}
    times: dict[int, list[float]] = {1: [], k: []}
    cpu: dict[int, list[float]] = {1: [], k: []}
    for rnd in range(1, rounds + 2):
        for size, loop in loops.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start, start_cpu = time.perf_counter(), time.process_time()
            loop.run_round(rnd)
            if device == "cuda":
                torch.cuda.synchronize()
            if rnd > 1:
                times[size].append(time.perf_counter() - start)
                cpu[size].append(time.process_time() - start_cpu)
    assert loops[k].batcher.unsupported() is None, loops[k].batcher.unsupported()
    diff = max(float((a - loops[k].states[c][n]).abs().max()) for c, s in loops[1].states.items()
               for n, a in s.items())
    seq, bat = statistics.median(times[1]), statistics.median(times[k])
    cpu_ratio = statistics.median(cpu[1]) / statistics.median(cpu[k])
    return {"k": k, "sequential_s": seq, "batched_s": bat, "ratio": seq / bat, "cpu_ratio": cpu_ratio,
            "updates_per_s_seq": clients / seq, "updates_per_s_batched": clients / bat, "max_state_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--client_batch", type=int, nargs="*", default=[4, 8], help="K values (default 4 8)")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds (round 1 is extra, untimed)")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--samples", type=int, default=2000, help="fixture training samples (val and test: 10%%, 20%%)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="32-true", help="--fabric.precision (32-true, bf16-mixed)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fedhb.data.fixtures import write_medmnist_fixture

    with tempfile.TemporaryDirectory() as root:
        write_medmnist_fixture(root, "organamnist", 28, (args.samples, args.samples // 10, args.samples // 5), seed=0)
        print(f"{args.clients} clients, tiny-vit LoRA r=8, FedAvg, batch 32, {args.device} {args.precision}, "
              f"{torch.get_num_threads()} torch threads, load {os.getloadavg()[0]:.1f}; medians of {args.rounds} "
              f"interleaved rounds")
        print(f"{'K':>3} {'sequential s':>13} {'batched s':>10} {'ratio':>6} {'CPU ratio':>10} {'updates/s seq':>14} "
              f"{'updates/s K':>12} {'max |diff|':>11}")
        for k in args.client_batch:
            r = compare(root, k, args.rounds, args.clients, args.device, args.precision)
            print(f"{k:>3} {r['sequential_s']:>13.3f} {r['batched_s']:>10.3f} {r['ratio']:>6.2f} "
                  f"{r['cpu_ratio']:>10.2f} {r['updates_per_s_seq']:>14.1f} {r['updates_per_s_batched']:>12.1f} "
                  f"{r['max_state_diff']:>11.2e}", flush=True)


if __name__ == "__main__":
    main()
