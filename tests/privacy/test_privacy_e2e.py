"""Private federations end to end: the same numbers and the same ε on one and two processes, after a resume, and in
``summary.json`` and ``fedhb report``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedhb.algorithms import FedAvg
from fedhb.config import (
    AuditArgs,
    CheckpointArgs,
    FabricArgs,
    FederationArgs,
    ModelArgs,
    OptimArgs,
    PartitionArgs,
    PrivacyArgs,
    SecureAggregationArgs,
)
from fedhb.data import MedMNIST
from fedhb.fit import _Run, fit, resolved_config
from fedhb.io import read_jsonl


def _fit(root: str, out: Path, devices: int = 1, rounds: int = 3, **kw):
    return fit(data=MedMNIST(root=root, fraction=0.5), algorithm=kw.pop("algorithm", FedAvg()), out_dir=str(out),
               seed=5, partition=PartitionArgs(num_clients=4, alpha=0.5),
               federation=kw.pop("federation", FederationArgs(rounds=rounds, batch_size=16, fraction=0.75)),
               optim=OptimArgs(name="adamw", lr=0.01, schedule="constant", min_lr=0.0),
               checkpoint=CheckpointArgs(every=1, keep=3),
               fabric=FabricArgs(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto"),
               **kw)


def records(out: Path) -> list[dict]:
    rows = read_jsonl(out / "metrics.jsonl")
    for r in rows:
        r.pop("round_time_s")
        r.pop("secagg_time_s", None)
    return rows


def assert_close(a, b, where=""):
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, abs=1e-6), where
    else:
        assert a == b, where


PRIVATE = {
    "client_dp": dict(privacy=PrivacyArgs(mode="client", clip=0.5, noise_multiplier=0.8)),
    # min_clients 3: a round with more dropouts than secure aggregation recovers from is redrawn by the loop.
    "secagg_dp_dropout": dict(
        privacy=PrivacyArgs(mode="client", clip=0.5, noise_multiplier=0.8),
        secure_aggregation=SecureAggregationArgs(enabled=True, threshold=1, noise="distributed"),
        federation=FederationArgs(rounds=2, batch_size=16, fraction=1.0, dropout=0.25, min_clients=3)),
}


def make_run(root: str, out: Path, name: str, world: int) -> _Run:
    options = dict(PRIVATE[name])
    args = dict(data=MedMNIST(root=root, fraction=0.5), algorithm=FedAvg(), out_dir=str(out), seed=5,
                partition=PartitionArgs(num_clients=4, alpha=0.5), model=ModelArgs(),
                federation=options.pop("federation", FederationArgs(rounds=2, batch_size=16, fraction=0.75)),
                optim=OptimArgs(name="adamw", lr=0.01, schedule="constant", min_lr=0.0),
                fabric=FabricArgs(accelerator="cpu", devices=world, strategy="ddp_spawn" if world > 1 else "auto"),
                checkpoint=CheckpointArgs())
    config = resolved_config(**args, **options)
    return _Run(config=config, data=args["data"], algorithm=args["algorithm"], out=out, seed=args["seed"],
                partition=args["partition"], model=args["model"], federation=args["federation"], optim=args["optim"],
                fabric_args=args["fabric"], checkpoint=args["checkpoint"], **options)


def federations(fabric: Any, root: str, out: str) -> dict[str, Any] | None:
    """Every federation of :data:`PRIVATE` in these processes; rank 0 returns their summaries."""
    summaries = {name: make_run(root, Path(out) / name, name, fabric.world_size)(fabric) for name in sorted(PRIVATE)}
    return summaries if fabric.global_rank == 0 else None


@pytest.mark.slow
def test_one_and_two_processes_give_the_same_private_federations(organamnist_root, tmp_path):
    from fedhb.strategy import make_fabric

    one = make_fabric(FabricArgs(accelerator="cpu")).launch(federations, organamnist_root, str(tmp_path / "one"))
    two = make_fabric(FabricArgs(accelerator="cpu", devices=2, strategy="ddp_spawn")).launch(
        federations, organamnist_root, str(tmp_path / "two"))

    for name in PRIVATE:
        assert two[name]["world_size"] == 2
        assert_close(records(tmp_path / "one" / name), records(tmp_path / "two" / name))
        assert one[name]["privacy"]["epsilon"] == two[name]["privacy"]["epsilon"] > 0
        assert all(r["epsilon"] > 0 for r in records(tmp_path / "one" / name))
    secure = records(tmp_path / "one" / "secagg_dp_dropout")
    assert any(f["reason"].startswith("dropped") for r in secure for f in r["failures"])  # recovery was exercised
    assert all(r["secagg_bytes"] > 0 for r in secure)


@pytest.mark.slow
def test_a_resumed_private_run_reports_the_same_epsilon_and_metrics(organamnist_root, tmp_path):
    options = dict(privacy=PrivacyArgs(mode="client", clip=0.5, target_epsilon=6.0, adaptive_clip=True),
                   audit=AuditArgs(enabled=True, shadows=2, shadow_epochs=1, max_samples=50))
    full = _fit(organamnist_root, tmp_path / "full", **options)
    _fit(organamnist_root, tmp_path / "part", **options)
    (tmp_path / "part" / "checkpoints" / "round-000003.ckpt").unlink()  # as if killed after round 2
    (tmp_path / "part" / "summary.json").unlink()

    part = _fit(organamnist_root, tmp_path / "part", resume="auto", **options)

    assert_close(records(tmp_path / "full"), records(tmp_path / "part"))
    assert part["privacy"] == full["privacy"]
    assert part["privacy"]["epsilon"] <= 6.0 and part["privacy"]["releases"] == 3
    assert len({r["dp_clip"] for r in records(tmp_path / "full")}) == 3  # the clip adapted every round
    assert_close(full["audit"], part["audit"])
    saved = torch.load(tmp_path / "part" / "checkpoints" / "round-000002.ckpt", weights_only=True)
    assert saved["algorithm"]["accountant"]["history"].shape == (1, 3)
    config = (tmp_path / "part" / "config.yaml").read_text()
    assert "privacy:" in config and "secure_aggregation:" not in config  # only the groups in use


@pytest.mark.slow
def test_the_report_puts_epsilon_and_the_audit_next_to_accuracy(organamnist_root, tmp_path):
    from fedhb.report import write_report

    audit = AuditArgs(enabled=True, shadows=1, shadow_epochs=1, max_samples=40)
    for eps in (2.0, 8.0):
        _fit(organamnist_root, tmp_path / "runs" / f"eps{eps}", rounds=2, audit=audit,
             privacy=PrivacyArgs(mode="client", clip=0.5, target_epsilon=eps))
    _fit(organamnist_root, tmp_path / "runs" / "plain", rounds=2, audit=audit)

    report = write_report([tmp_path / "runs"], tmp_path / "report")

    text = (tmp_path / "report" / "report.md").read_text()
    assert "| ε | MIA AUC (LiRA) |" in text and "| — |" in text  # the run without DP has no ε
    summary = json.loads((tmp_path / "runs" / "eps2.0" / "summary.json").read_text())
    assert f"{summary['privacy']['epsilon']:.2f}" in text
    assert any(p.name.endswith("_vs_epsilon.png") for p in report.files)
