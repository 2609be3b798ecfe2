"""Every algorithm on the same learnable federation: 20 clients, Dirichlet 0.1, the tiny ViT with LoRA.

    python benchmarks/algorithms.py              # the table in benchmarks/README.md (about 40 minutes on 2 cores)
    python benchmarks/algorithms.py --quick      # 3 rounds on fewer samples: a smoke test of every algorithm
    python benchmarks/algorithms.py --only FedAvg EPFL --rounds 5

The data are a learnable file in MedMNIST's OrganAMNIST format (``fedhb.data.fixtures``: a class template plus noise,
11 classes), pooled and split over 20 clients by a Dirichlet(0.1) label partition, each client 40/30/30 into
train/val/test. Every algorithm runs with its default options, the same seed, partition, initial model and local
optimizer, through ``fedhb.fit.fit`` on one process with one torch thread. Columns, from the last round (evaluated
after aggregation):

- ``pers. acc``: mean over clients of each client's model on its own test split;
- ``worst``: the lowest of those;
- ``global acc``: the global model on the union of the test splits, for methods that have one;
- ``bytes/round``: uploaded plus downloaded bytes, averaged over rounds;
- ``s/round``: the run's wall time divided by its rounds (local training of every client, aggregation, collectives;
  the set-up and the one evaluation included).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def algorithms() -> dict[str, Any]:
    """Each algorithm with its defaults (FedALA's first weight learning capped to keep the run short)."""
    import fedhb.algorithms as A

    made = {name: getattr(A, name)() for name in A.__all__ if name not in ("Algorithm", "LocalTrainer")}
    made["FedALA"] = A.FedALA(max_start_epochs=5)
    made["FLoRA-ranks"] = A.FLoRA(ranks=[8, 4, 2])  # heterogeneous clients: ranks 8, 4, 2, 8, 4, 2, ...
    made["HetLoRA-ranks"] = A.HetLoRA(ranks=[8, 4, 2])  # the same clients, zero-padded aggregation
    for rule in ("median", "trimmed_mean", "krum"):  # FedAvg's robust server steps
        made[f"FedAvg-{rule}"] = A.FedAvg(aggregation=rule)
    order = ["Local", "Centralized", "FedAvg", "FedAvg-median", "FedAvg-trimmed_mean", "FedAvg-krum", "FedProx",
             "SCAFFOLD", "FedNova", "FedDyn", "FedAvgM", "FedAdam", "FedYogi", "FedAdagrad", "MOON", "APFL", "APPLE",
             "FedALA", "Ditto", "PerFedAvg", "PFedMe", "FedPer", "FedRep", "FedBABU", "EPFL", "FedSALoRA", "FFALoRA",
             "FedDPA", "FLoRA", "FLoRA-ranks", "HetLoRA", "HetLoRA-ranks"]
    missing = sorted(set(made) - set(order))
    return {name: made[name] for name in order + missing}


def run_one(name: str, algorithm: Any, root: Path, out: Path, rounds: int, lr: float) -> dict[str, Any]:
    from fedhb.config import FabricArgs, FederationArgs, OptimArgs, PartitionArgs
    from fedhb.data import MedMNIST
    from fedhb.fit import fit

    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the table only
        summary = fit(
            data=MedMNIST(root=str(root)), algorithm=algorithm, out_dir=str(out / name), seed=0, overwrite=True,
            partition=PartitionArgs(num_clients=20, alpha=0.1),
            federation=FederationArgs(rounds=rounds, batch_size=32, eval_every=rounds),
            optim=OptimArgs(name="sgd", lr=lr, momentum=0.0, schedule="constant", min_lr=0.0),
            fabric=FabricArgs(accelerator="cpu"),
        )
    assert summary is not None
    final = summary["final"]
    return {
        "name": name,
        "personalized_acc": final["personalized_acc"],
        "worst_client_acc": final["worst_client_acc"],
        "global_acc": final["global_acc"],
        "bytes_per_round": summary["bytes_total"] / rounds,
        "s_per_round": summary["wall_time_s"] / rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds on 1,800 samples")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per federation (default 30; quick: 3)")
    parser.add_argument("--samples", type=int, default=None, help="pooled samples (default 6,000; quick: 1,800)")
    parser.add_argument("--lr", type=float, default=0.1, help="local SGD learning rate")
    parser.add_argument("--only", nargs="*", default=None, help="algorithm names to run")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 30)
    total = args.samples or (1800 if args.quick else 6000)

    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from fedhb.data.fixtures import write_medmnist_fixture

    chosen = algorithms()
    if args.only:
        unknown = sorted(set(args.only) - set(chosen))
        if unknown:
            raise SystemExit(f"--only: unknown algorithms {unknown}; choose from {list(chosen)}")
        chosen = {k: v for k, v in chosen.items() if k in args.only}
    print(f"# fedhb benchmarks/algorithms.py: {rounds} rounds, {total} samples, 20 clients, Dirichlet 0.1, tiny-vit, "
          f"SGD lr {args.lr}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedhb-bench-") as tmp:
        root = Path(tmp) / "data"
        split = (int(total * 0.6), int(total * 0.1), total - int(total * 0.6) - int(total * 0.1))
        write_medmnist_fixture(root, "organamnist", 28, split, seed=0)
        for name, algorithm in chosen.items():
            start = time.perf_counter()
            rows.append(run_one(name, algorithm, root, Path(tmp) / "runs", rounds, args.lr))
            print(f"# {name} done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| algorithm | pers. acc | worst | global acc | bytes/round | s/round |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        glob = "—" if r["global_acc"] is None else f"{r['global_acc']:.3f}"
        lines.append(f"| {r['name']} | {r['personalized_acc']:.3f} | {r['worst_client_acc']:.3f} | {glob} | "
                     f"{_bytes(r['bytes_per_round'])} | {r['s_per_round']:.2f} |")
    return "\n".join(lines)


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
