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


# -- what the audit attacks on the other tasks ----------------------------------------------------------------------
def test_a_segmentation_case_is_scored_by_its_mean_dice():
    from fedhb.tasks.segmentation import CASE_STATS, Segmentation

    task = Segmentation(("t1c", "t1n", "t2f", "t2w"), patch=32)
    rows = torch.zeros(2, len(CASE_STATS))
    rows[0, :3] = torch.tensor([0.9, 0.6, 0.3])  # Dice WT, TC, ET; the HD95 and voxel counts do not enter
    rows[1, :3] = torch.tensor([0.0, 0.5, 1.0])
    rows[:, 3:] = 7.0

    loss, phi = per_example(rows, torch.tensor([4, 9]), task)

    assert phi.dtype == torch.float64 and torch.allclose(phi, torch.tensor([0.6, 0.5], dtype=torch.float64))
    assert torch.allclose(loss, 1 - phi)


def _retrieval(modalities, objective, emb, present):
    """A retrieval task of embedding width 2 and its packed evaluation output (embeddings, presence, log scale)."""
    from fedhb.tasks.retrieval import Retrieval

    task = Retrieval(modalities, num_samples=len(present[0]), objective=objective)
    task.dim = 2
    output = torch.cat([*emb, torch.stack([p.float() for p in present], 1), torch.zeros(len(present[0]), 1)], 1)
    return task, output


def test_a_retrieval_pair_is_scored_by_its_similarity_and_a_sample_missing_a_modality_is_left_out():
    a = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    b = torch.tensor([[0.8, 0.6], [0.6, 0.8], [1.0, 0.0]])
    task, output = _retrieval(("image", "text"), "clip", [a, b],
                              [torch.tensor([True, True, True]), torch.tensor([True, True, False])])

    loss, phi = per_example(output, torch.arange(3), task)

    # a . b per row: 0.8, 0.36 + 0.64 = 1.0; the third has no text.
    assert phi[:2].tolist() == pytest.approx([0.8, 1.0]) and math.isnan(float(phi[2]))
    assert torch.equal(loss[:2], -phi[:2])


def test_a_symile_triple_is_scored_by_its_multilinear_inner_product():
    x = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    y = torch.tensor([[3.0, 1.0], [2.0, 2.0]])
    z = torch.tensor([[0.5, 1.0], [1.0, 1.0]])
    yes = torch.tensor([True, True])
    task, output = _retrieval(("image", "signal", "tabular"), "symile", [x, y, z], [yes, yes, yes])

    _, phi = per_example(output, torch.arange(2), task)

    # MIP: 1 * 3 * 0.5 + 2 * 1 * 1 = 3.5; 0.5 * 2 * 1 + (-1) * 2 * 1 = -1.
    assert phi.tolist() == pytest.approx([3.5, -1.0])


def test_an_open_vqa_answer_is_scored_by_its_token_f1():
    from fedhb.tasks.vqa import VQA

    task = VQA("generate", answer_length=4)
    words = {1: "left", 2: "lung", 3: "right"}

    class Words:
        def batch_decode(self, rows, skip_special_tokens=True):
            return [" ".join(words[t] for t in row if t in words) for row in rows]

    task.tokenizer = Words()
    generated = torch.tensor([[0, 1, 2, 0], [0, 3, 0, 0]], dtype=torch.float32)  # start token, then the answer
    reference = torch.tensor([[0, 1, 2, 0], [0, 1, 2, 0]])

    loss, phi = per_example(generated, reference, task)

    # "left lung" against itself: F1 1; "right" against "left lung": no common token, F1 0.
    assert phi.tolist() == [1.0, 0.0] and loss.tolist() == [0.0, 1.0]


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["brats", "symile"])
def test_the_audit_attacks_segmentation_and_retrieval_runs(dataset, tmp_path):
    # It used to stop a BraTS run after its last round with MONAI's shape error, and scored every retrieval sample
    # with a one-sample contrastive loss (0, whatever the model: AUC 0.5).
    import json
    from pathlib import Path

    from fedhb.cli import main

    configs = Path(__file__).resolve().parents[2] / "configs"
    if dataset == "brats":
        from fedhb.data.fixtures_brats import write_brats_fixture

        root = write_brats_fixture(tmp_path / "brats", cases=12, size=32)
        args = ["--config", str(configs / "brats_fedavg.yaml"), "--data.root", str(root), "--data.size", "32",
                "--data.patch", "32", "--data.cache", str(tmp_path / "cache")]
    else:
        from fedhb.data.fixtures_symile import write_symile_fixture

        root = write_symile_fixture(tmp_path / "symile")
        args = ["--config", str(configs / "symile_mimic_fedavg.yaml"), "--data.root", str(root),
                "--data.image_size", "28"]
    out = tmp_path / "run"

    main(["fit", *args, "--fast_dev_run", "true", "--audit.enabled", "true", "--audit.shadows", "2",
          "--out_dir", str(out), "--fabric.accelerator", "cpu", "--fabric.devices", "1", "--fabric.strategy", "auto"])

    audit = json.loads((out / "summary.json").read_text())["audit"]
    rows = list(audit["clients"].values())
    assert sum(r["members"] for r in rows) > 0 and all(r["members"] == r["non_members"] for r in rows)
    for key in ("loss_auc", "lira_auc"):
        assert 0.0 <= audit[key] <= 1.0, key
