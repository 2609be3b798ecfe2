"""Per-client ``algo/`` tensors and server state go into checkpoints: a resumed run gives the uninterrupted numbers."""

from __future__ import annotations

import pytest

from fedhb.algorithms import APFL, APPLE, SCAFFOLD, FedAdam, FedALA, FedDyn, FLoRA, HetLoRA, PFedMe
from fedhb.config import CheckpointArgs, FabricArgs, FederationArgs, OptimArgs, PartitionArgs
from fedhb.data import MedMNIST
from fedhb.fit import fit
from fedhb.io import read_jsonl


def _fit(root, out, algorithm, resume=None):
    return fit(data=MedMNIST(root=root, fraction=0.3), algorithm=algorithm, out_dir=str(out), seed=5,
               partition=PartitionArgs(num_clients=3, alpha=0.5), federation=FederationArgs(rounds=2),
               optim=OptimArgs(name="adamw", lr=0.01, schedule="constant", min_lr=0.0),
               checkpoint=CheckpointArgs(every=1, keep=2), fabric=FabricArgs(accelerator="cpu"), resume=resume)


def _comparable(out):
    records = read_jsonl(out / "metrics.jsonl")
    for r in records:
        r.pop("round_time_s")
    return records


@pytest.mark.slow
@pytest.mark.parametrize("make", [SCAFFOLD, FedAdam, APFL, APPLE, lambda: FedALA(max_start_epochs=2), FLoRA,
                                  lambda: FLoRA(ranks=[8, 2]), lambda: FedAdam(variant="flower"), FedDyn,
                                  lambda: PFedMe(inner_steps=2), lambda: HetLoRA(ranks=[8, 2], lam=0.1)],
                         ids=["SCAFFOLD", "FedAdam", "APFL", "APPLE", "FedALA", "FLoRA", "FLoRA-ranks",
                              "FedAdam-flower", "FedDyn", "PFedMe", "HetLoRA-ranks"])
def test_resuming_after_round_one_gives_the_uninterrupted_numbers(organamnist_root, tmp_path, make):
    out = tmp_path / "run"
    _fit(organamnist_root, out, make())
    uninterrupted = _comparable(out)
    (out / "checkpoints" / "round-000002.ckpt").unlink()  # as if killed during round 2

    _fit(organamnist_root, out, make(), resume="auto")

    assert _comparable(out) == uninterrupted
