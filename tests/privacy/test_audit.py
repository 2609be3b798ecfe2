"""The membership-inference audit: its statistics by hand, and attacks that find members of a model that memorised
them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedhb.algorithms import Local
from fedhb.config import AuditArgs
from fedhb.privacy.audit import COLUMNS, auc, audit_federation, per_example, tpr_at_fpr


def test_auc_counts_pairs_with_ties_as_half():
    # pairs (member, non-member): (3,1) (3,2) (2,1) win, (2,2) ties: (3 + 0.5) / 4
    assert auc(np.array([3.0, 2.0]), np.array([1.0, 2.0])) == 0.875
    assert auc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5
    assert math.isnan(auc(np.array([]), np.array([1.0])))


def test_tpr_at_low_fpr_uses_the_threshold_that_lets_that_many_non_members_through():
    non = np.arange(200, dtype=np.float64)  # 1% of 200: two may pass, so the threshold is the third largest, 197
    members = np.array([196.0, 197.0, 197.5, 250.0])

    assert tpr_at_fpr(members, non, 0.01) == 0.5
    assert tpr_at_fpr(members, non[:50], 0.01) == 1.0  # fewer than 100: no false positive allowed, threshold 49


def test_phi_is_the_logit_of_the_true_class_probability():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([0, 2])

    class Multi:
        kind = "multi-class"

    loss, phi = per_example(logits, targets, Multi())

    p = torch.softmax(logits.double(), 1)[torch.arange(2), targets]
    assert torch.allclose(phi, torch.log(p / (1 - p)))
    assert torch.allclose(loss, -torch.log(p))


@pytest.mark.slow
def test_a_model_that_memorised_its_training_split_is_found_out(make_loop):
    loop = make_loop(Local(), clients=2, lr=0.2, local_epochs=15, rounds=3)
    initial = {k: v.clone() for k, v in loop.client_module.get_state().items()}
    for r in (1, 2, 3):
        loop.run_round(r)

    result = audit_federation(loop, initial, AuditArgs(enabled=True, shadows=2, shadow_epochs=5), seed=0)

    assert set(result["clients"]) == {"0", "1"} and set(result["clients"]["0"]) == set(COLUMNS)
    assert result["loss_auc"] > 0.6 and result["lira_auc"] > 0.6
    means = [np.mean([c[k] for c in result["clients"].values()]) for k in ("loss_auc", "lira_auc")]
    assert [result["loss_auc"], result["lira_auc"]] == pytest.approx(means)
