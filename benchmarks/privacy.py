"""Utility against privacy on a learnable federation: accuracy and membership-inference AUC at ε = 1, 4, 8 and without
DP, for FedAvg and EPFL, under client-level DP and under sample-level DP-SGD; and secure aggregation's cost.

    python benchmarks/privacy.py            # the tables in benchmarks/README.md
    python benchmarks/privacy.py --quick    # 2 rounds, ε 1 and 8 only: a smoke test in a few minutes

The data are a learnable file in MedMNIST's OrganAMNIST format (``fedhb.data.fixtures``, 11 classes), split over 10
clients by a Dirichlet(1.0) label partition, each client 40/30/30 into train/val/test; the tiny ViT with LoRA r=8 on
query and value, AdamW at 0.01, several local epochs so that the models can memorise (the audit needs something to
find). Every run goes through ``fedhb.fit.fit`` on one process with one torch thread, every client trains every
round (client sampling rate 1, the hardest case for client-level DP), ``--privacy.target_epsilon`` with δ = 1e-5 sets
the noise, and the audit (loss threshold and LiRA-offline with 2 reference models) attacks each client's final model.

Columns: ``acc`` the mean over clients of each client's model on its own test split; ``ε`` what the accountant
reports after the last round (DP-SGD: the largest over clients); ``σ`` the noise multiplier; ``loss AUC`` and ``LiRA
AUC`` the audit's means over clients (0.5 is chance); ``s`` the run's wall time.

Secure aggregation: FedAvg without DP, with and without ``--secure_aggregation.enabled`` (and with 10% dropout,
``min_clients`` set so that a round the protocol cannot unmask is redrawn): bytes each client uploads per round, the
protocol's other messages per client per round (keys and Shamir shares), the server's unmasking time and the round
time.
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


def run_one(root: Path, out: Path, algorithm: str, mode: str, eps: float | None, rounds: int, epochs: int,
            secure: bool = False, dropout: float = 0.0, audit: bool = True) -> dict[str, Any]:
    from fedhb.algorithms import EPFL, FedAvg
    from fedhb.config import (
        AuditArgs,
        FabricArgs,
        FederationArgs,
        OptimArgs,
        PartitionArgs,
        PrivacyArgs,
        SecureAggregationArgs,
    )
    from fedhb.data import MedMNIST
    from fedhb.fit import fit

    privacy = PrivacyArgs() if mode == "none" else PrivacyArgs(mode=mode, clip=0.5 if mode == "client" else 1.0,
                                                               target_epsilon=eps)
    clients = 10
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        summary = fit(
            data=MedMNIST(root=str(root)), algorithm=FedAvg() if algorithm == "FedAvg" else EPFL(lam=0.5),
            out_dir=str(out), seed=0, partition=PartitionArgs(num_clients=clients, alpha=1.0),
            federation=FederationArgs(rounds=rounds, local_epochs=epochs, batch_size=16, dropout=dropout,
                                      min_clients=clients - 4 if secure else 1),
            optim=OptimArgs(name="adamw", lr=0.01, schedule="constant", min_lr=0.0),
            fabric=FabricArgs(accelerator="cpu"), privacy=privacy,
            secure_aggregation=SecureAggregationArgs(enabled=secure, threshold=4 if secure else None),
            audit=AuditArgs(enabled=audit, shadows=2, shadow_epochs=epochs * rounds))
    wall = time.perf_counter() - start
    assert summary is not None
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = summary["final"]
    info = summary.get("privacy") or {}
    sigma = info.get("noise_multiplier")
    if sigma is None and info.get("noise_multiplier_by_client"):
        sigma = max(info["noise_multiplier_by_client"].values())
    return {
        "acc": final["personalized_acc"], "epsilon": info.get("epsilon"), "sigma": sigma,
        "loss_auc": (summary.get("audit") or {}).get("loss_auc"),
        "lira_auc": (summary.get("audit") or {}).get("lira_auc"),
        "wall_s": wall, "bytes_up": sum(r["bytes_up"] for r in history) / len(history),
        "secagg_bytes": sum(r.get("secagg_bytes", 0) for r in history) / len(history),
        "secagg_s": sum(r.get("secagg_time_s", 0) for r in history) / len(history),
        "round_s": sum(r["round_time_s"] for r in history) / len(history),
        "trained": sum(r["clients_trained"] for r in history) / len(history),
    }


def fmt(value: Any, spec: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and value == float("inf"):
        return "∞"
    return format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rounds, ε 1 and 8: a smoke test")
    parser.add_argument("--out", default=None, help="keep the run folders here (default: a temporary folder)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from fedhb.data.fixtures import write_medmnist_fixture

    rounds, epochs = (2, 2) if args.quick else (5, 3)
    epsilons = (1.0, 8.0) if args.quick else (1.0, 4.0, 8.0)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.out) if args.out else Path(tmp)
        root = base / "data"
        write_medmnist_fixture(root, "organamnist", 28, (1000, 200, 600), seed=0)
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, one thread; "
              f"{rounds} rounds x {epochs} local epochs, 10 clients", flush=True)
        print()
        print("| algorithm | DP | target ε | acc | ε reached | σ | loss AUC | LiRA AUC | s |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for algorithm in ("FedAvg", "EPFL"):
            cells = [("none", None)] + [(mode, e) for mode in ("client", "sample") for e in epsilons]
            for mode, eps in cells:
                out = base / f"{algorithm}_{mode}_{eps}"
                r = run_one(root, out, algorithm, mode, eps, rounds, epochs)
                print(f"| {algorithm} | {mode} | {fmt(eps, 'g')} | {100 * r['acc']:.1f} | {fmt(r['epsilon'], '.2f')} | "
                      f"{fmt(r['sigma'], '.2f')} | {fmt(r['loss_auc'], '.3f')} | {fmt(r['lira_auc'], '.3f')} | "
                      f"{r['wall_s']:.0f} |", flush=True)
        print()
        print("| FedAvg, 10 clients | dropout | bytes up / client / round | protocol bytes / client / round | "
              "unmask s / round | round s | acc |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for secure, dropout in ((False, 0.0), (True, 0.0), (True, 0.1)):
            out = base / f"secagg_{secure}_{dropout}"
            r = run_one(root, out, "FedAvg", "none", None, rounds, epochs, secure=secure, dropout=dropout,
                        audit=False)
            name = "secure aggregation" if secure else "plain"
            print(f"| {name} | {dropout:g} | {r['bytes_up'] / r['trained']:,.0f} | "
                  f"{r['secagg_bytes'] / 10:,.0f} | {r['secagg_s']:.3f} | {r['round_s']:.2f} | "
                  f"{100 * r['acc']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
