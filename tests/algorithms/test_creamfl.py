"""CreamFL's regularisers, representation ensemble and public data against values computed by hand; a multimodal
federation with missing reports on 1 and 2 processes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from algo_testkit import multimodal_trainer, t

from fedhb import seeds
from fedhb.algorithms import CreamFL
from fedhb.algorithms.creamfl import (
    GLOBAL,
    HELD,
    LOCAL,
    READY,
    contribution_weights,
    inter_modal_loss,
    intra_modal_loss,
)
from fedhb.data.partition import ClientSplit
from fedhb.loop import hold_out_public

A, B, W = "encoders.a.p", "encoders.b.p", "head.1.weight"
LA, LB, GA, GB = LOCAL + "encoders.a", LOCAL + "encoders.b", GLOBAL + "encoders.a", GLOBAL + "encoders.b"


def tt(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def unit(rows: list[list[float]]) -> torch.Tensor:
    return torch.nn.functional.normalize(tt(rows), dim=1)


def l2(x: float) -> float:
    """log(1 + e^x)."""
    return math.log1p(math.exp(x))


# -- the regularisers --------------------------------------------------------------------------------------------------
def test_intra_modal_loss_by_hand():
    z = {"a": tt([[1, 0], [0, 1]]), "b": tt([[1, 1], [0, 1]])}
    target = {"a": tt([[1, 0], [1, 0]]), "b": tt([[1, 1], [0, 2]])}
    old = {"a": tt([[0, 1], [0, 1]]), "b": tt([[1, -1], [1, 0]])}
    present = {"a": torch.tensor([True, True]), "b": torch.tensor([True, False])}

    loss = intra_modal_loss(z, target, old, present, temperature=0.5)

    # (cos to target, cos to old) per held pair: a0 (1, 0), a1 (0, 1), b0 (1, 0); b1 is absent. Each term is
    # log(1 + e^{(c_old - c_target) / 0.5}); the mean is over the three pairs.
    assert loss is not None and loss.item() == pytest.approx((2 * l2(-2) + l2(2)) / 3, rel=1e-6)
    assert intra_modal_loss(z, target, old, {m: torch.tensor([False, False]) for m in z}, 0.5) is None


def test_inter_modal_loss_by_hand():
    # Three public samples; the batch holds public samples 0 and 2. Sample 2 lacks b, so a -> b uses sample 0 only.
    z = {"a": tt([[1, 0], [0, 1]]), "b": tt([[1, 1], [3, 3]])}
    targets = {"a": tt([[0, 1], [1, 0], [1, 1]]), "b": tt([[1, 0], [0, 1], [0, 0]])}
    rows = torch.tensor([0, 2])
    present = {"a": torch.tensor([True, True]), "b": torch.tensor([True, False])}
    public_present = {"a": torch.tensor([True, True, True]), "b": torch.tensor([True, True, False])}

    loss = inter_modal_loss(z, targets, rows, present, public_present, temperature=0.5)

    # a -> b: z_a (1, 0) against b's targets of samples 0 and 1: cosines (1, 0) / 0.5, label 0: log(1 + e^-2).
    # b -> a: z_b (1, 1) against a's targets of samples 0, 1, 2: cosines (1/sqrt2, 1/sqrt2, 1) / 0.5, label 0.
    c = 2 / math.sqrt(2)
    b_to_a = math.log(2 * math.exp(c) + math.exp(2)) - c
    assert loss is not None and loss.item() == pytest.approx(l2(-2) + b_to_a, rel=1e-6)


def weights_by_hand(reps: list[torch.Tensor], reference: torch.Tensor) -> torch.Tensor:
    """The contribution weights re-derived with loops: score_ki = <z_ki, r_i> - log sum_j e^{<z_ki, r_j>} over the
    references of present samples; weights = e^score / sum_k e^score per sample; uniform where a sample is absent."""
    k, p = len(reps), reference.shape[0]
    present = [j for j in range(p) if float(reference[j].abs().sum()) > 0]
    out = torch.full((k, p), 1.0 / k, dtype=torch.float64)
    for i in present:
        scores = []
        for z in reps:
            dots = [float(z[i] @ reference[j]) for j in present]
            scores.append(float(z[i] @ reference[i]) - math.log(sum(math.exp(d) for d in dots)))
        total = sum(math.exp(s) for s in scores)
        for c, s in enumerate(scores):
            out[c, i] = math.exp(s) / total
    return out


def test_contribution_weights_by_hand():
    # Client 1 retrieves each sample's reference, client 2 the other one; the third sample is absent (zero rows).
    reference = tt([[1, 0], [0, 1], [0, 0]])
    reps = [tt([[1, 0], [0, 1], [0, 0]]), tt([[0, 1], [1, 0], [0, 0]])]

    weights = contribution_weights(reps, [reference])

    # Scores 1 - log(1 + e) and -log(1 + e): weights sigmoid(1) and 1 - sigmoid(1); the absent sample 1/2 each.
    s = 1 / (1 + math.exp(-1))
    assert torch.allclose(weights, torch.tensor([[s, s, 0.5], [1 - s, 1 - s, 0.5]], dtype=torch.float64))
    assert torch.allclose(weights, weights_by_hand(reps, reference))


# -- the server ----------------------------------------------------------------------------------------------------
def _algo(public: int = 3) -> CreamFL:
    algo = CreamFL(public_fraction=0.2)
    algo.public_index = np.arange(public)
    initial = {"fusion.proj.a.weight": torch.zeros(2, 4), "fusion.proj.b.weight": torch.zeros(2, 3), W: torch.zeros(1)}
    algo.setup(list(initial), initial, 3)
    return algo


def _upload(w: float, a: list[list[float]], b: list[list[float]] | None) -> dict[str, torch.Tensor]:
    return {"fusion.proj.a.weight": torch.zeros(2, 4), "fusion.proj.b.weight": torch.zeros(2, 3), W: t(w),
            LA: unit(a), LB: unit(b) if b is not None else torch.zeros(3, 2), HELD: t(1.0, 1.0 if b else 0.0)}


def test_the_global_representations_are_the_contribution_weighted_means_of_the_holders():
    algo = _algo()
    assert algo.widths == {"a": 2, "b": 2}
    state = algo.init_client_state({W: t(0.0)}, 0)
    assert state[LA].shape == state[GB].shape == (3, 2) and state[READY].tolist() == [0.0, 0.0]
    # Client 2 holds no b: its b representations (zeros) do not count.
    uploads = {0: _upload(1.0, [[1, 0], [0, 1], [1, 1]], [[1, 0], [1, 1], [0, 1]]),
               1: _upload(4.0, [[0, 1], [1, 0], [1, -1]], [[0, 1], [1, 0], [1, 1]]),
               2: _upload(7.0, [[1, 1], [1, 2], [2, 1]], None)}
    sizes = {0: 1, 1: 2, 2: 1}

    received = algo.aggregate(uploads, sizes)

    glob = received[0]
    assert glob[W].item() == pytest.approx((1 + 8 + 7) / 4)  # FedAvg's sample-weighted mean
    # Round 1 (no ensemble yet): each modality's reference is the holders' sample-weighted mean of the other one.
    ref_b = (1 * uploads[0][LB] + 2 * uploads[1][LB]) / 3
    ref_a = (1 * uploads[0][LA] + 2 * uploads[1][LA] + 1 * uploads[2][LA]) / 4
    holders = {"a": [0, 1, 2], "b": [0, 1]}
    for m, ref, key in (("a", ref_b, LA), ("b", ref_a, LB)):
        reps = [uploads[c][key] for c in holders[m]]
        w = weights_by_hand([r.double() for r in reps], ref.double())
        expected = sum(w[k][:, None] * reps[k].double() for k in range(len(reps)))
        assert torch.allclose(glob[GLOBAL + f"encoders.{m}"].double(), expected, atol=1e-6), m
    assert glob[READY].tolist() == [1.0, 1.0] and algo.global_state() is glob

    # Round 2: the reference is the ensemble of round 1.
    again = algo.aggregate({0: uploads[0], 1: uploads[1]}, sizes)[0]
    w = weights_by_hand([uploads[0][LA].double(), uploads[1][LA].double()], glob[GB].double())
    expected = w[0][:, None] * uploads[0][LA].double() + w[1][:, None] * uploads[1][LA].double()
    assert torch.allclose(again[GA].double(), expected, atol=1e-6)


def test_public_data_is_a_seeded_fraction_of_each_training_split_and_nobody_elses():
    splits = [ClientSplit(np.arange(0, 10), np.array([30]), np.array([31, 32])),
              ClientSplit(np.arange(10, 15), np.array([33]), np.array([34])),
              ClientSplit(np.array([20]), np.array([35]), np.array([36]))]

    public, kept = hold_out_public(splits, 0.2, seed=4)

    taken = seeds.rng(4, seeds.Stream.PUBLIC, 0).choice(10, size=2, replace=False)
    assert sorted(public[public < 10].tolist()) == sorted(taken.tolist())
    assert [len(s.train) for s in kept] == [8, 4, 1]  # round(0.2 n), one sample always left to train on
    for old, new in zip(splits, kept):
        assert not set(public) & set(np.concatenate([new.train, new.val, new.test]).tolist())
        assert sorted([*new.train.tolist(), *public[np.isin(public, old.train)].tolist()]) == old.train.tolist()
        assert new.val is old.val and new.test is old.test
    assert np.array_equal(hold_out_public(splits, 0.2, seed=4)[0], public)
    assert hold_out_public(splits, 0.0, seed=4)[1] is splits


def test_bad_options_name_the_flag():
    for kwargs, flag in (({"public_fraction": 0.0}, "public_fraction"), ({"interintra_weight": -1.0},
                                                                         "interintra_weight"),
                         ({"temperature": 0.0}, "temperature")):
        with pytest.raises(ValueError, match=f"--algorithm.{flag}"):
            CreamFL(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="public data"):
        CreamFL().setup([W], {W: torch.zeros(1)}, 2)


# -- the client ----------------------------------------------------------------------------------------------------
def _client(ready: bool, holds_b: bool = True):
    # Samples 0 and 1 are the client's (the second lacks b), 2 and 3 the server's public data (both modalities).
    algo = CreamFL(interintra_weight=0.5, temperature=0.5)
    algo.public_index = np.array([2, 3])
    initial = {A: t(1.0, 0.0), B: t(0.0, 1.0)}
    params = {"a": [1.0, 0.0], "b": [0.0, 1.0]}
    trainer, module = multimodal_trainer(params, {"a": [1.0, 2.0, 1.0, -1.0], "b": [1.0, 5.0, 2.0, 1.0]},
                                         {"a": [True] * 4, "b": [holds_b, False, True, True]}, [0, 1])
    # The toy's projections are the identity: the widths are those of its features.
    algo.setup([A, B], {"fusion.proj.a.weight": torch.zeros(2, 2), "fusion.proj.b.weight": torch.zeros(2, 2)}, 2)
    state = algo.init_client_state(dict(initial), 0)
    if ready:
        state[READY] = t(1.0, 1.0)
        state[GA], state[GB] = tt([[1, 0], [0, 1]]), tt([[0, 1], [1, 0]])
    return algo, trainer, state


def test_before_any_ensemble_the_local_update_is_fedavgs_and_uploads_the_public_representations():
    algo, trainer, state = _client(ready=False)

    algo.local_update(trainer, state)

    # The toy task loss at the start: a mean(0.5, 2.5) + b 0.5 (see test_mmoon); one SGD step at lr 0.5:
    # p_a = (1, 0) - 0.5 * ((1, 0) - (1.5, 1.5)) = (1.25, 0.75), p_b = (0, 1) - 0.5 * ((0, 1) - (1, 1)) = (0.5, 1).
    assert trainer.steps == 1 and trainer.mean_loss == pytest.approx(2.0)
    assert torch.allclose(trainer.read()[A], t(1.25, 0.75)) and torch.allclose(trainer.read()[B], t(0.5, 1.0))
    # Public samples x_a = (1, -1), x_b = (2, 1), represented by the trained model, as unit vectors.
    assert torch.allclose(state[LA], unit([[1.25, 0.75], [-1.25, -0.75]]))
    assert torch.allclose(state[LB], unit([[1.0, 2.0], [0.5, 1.0]]))
    assert state[HELD].tolist() == [1.0, 1.0]
    assert set(algo.upload(state)) == {A, B, LA, LB, HELD}


def test_the_local_objective_adds_the_intra_and_inter_modal_regularisers_on_public_data():
    algo, trainer, state = _client(ready=True)

    algo.local_update(trainer, state)

    # Public representations at the start: z_a = (1, 0), (-1, 0); z_b = (0, 1), (0, 1); the model before training is
    # the same (cos 1 to it); targets g_a = (1, 0), (0, 1); g_b = (0, 1), (1, 0).
    # Intra: a (cos to g 1, 0), b (1, 0): log(1 + e^0) and log(1 + e^2) twice each, mean over the four.
    intra = (math.log(2) + l2(2)) / 2
    # Inter a -> b: z_a against g_b: cosines (0, 1) / 0.5 label 0 -> log(1 + e^2); (0, -1) / 0.5 label 1 -> same.
    # Inter b -> a: z_b against g_a: cosines (0, 1) / 0.5 for both: label 0 -> log(1 + e^2), label 1 -> log(1 + e^-2).
    inter = l2(2) + (l2(2) + l2(-2)) / 2
    assert trainer.steps == 1 and trainer.mean_loss == pytest.approx(2.0 + 0.5 * (intra + inter), rel=1e-6)


def test_a_client_without_a_modality_leaves_it_out_of_its_upload_and_regulariser():
    algo, trainer, state = _client(ready=True, holds_b=False)

    algo.local_update(trainer, state)

    # Task loss a only: mean(0.5, 2.5) = 1.5. Intra over a: (log 2 + log(1 + e^2)) / 2; inter a -> b only.
    expected = 1.5 + 0.5 * ((math.log(2) + l2(2)) / 2 + l2(2))
    assert trainer.mean_loss == pytest.approx(expected, rel=1e-6)
    assert state[HELD].tolist() == [1.0, 0.0] and not bool(state[LB].any())


# -- end to end ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_creamfl_federation_with_missing_reports_gives_the_same_numbers_on_1_and_2_processes(padchest_file,
                                                                                                tmp_path: Path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from test_multimodal_federation import finite, launch, make_run

    from fedhb.data.partition import class_counts
    from fedhb.fit import prepare_partition

    one = launch(1, padchest_file, tmp_path / "one", [("CreamFL", "concat")], images=False)["CreamFL-concat"]
    two = launch(2, padchest_file, tmp_path / "two", [("CreamFL", "concat")], images=False)["CreamFL-concat"]

    assert [r["round"] for r in one["history"]] == [1, 2] and two["world_size"] == 2
    # 10% of each client's training split is the server's.
    run = make_run(padchest_file, tmp_path / "unused", "CreamFL", 1, images=False)
    samples, splits, _ = prepare_partition(run.data, run.partition, run.seed)
    assert one["public_samples"] == two["public_samples"] == sum(round(0.1 * len(s.train)) for s in splits) > 0
    # partition.json lists what the clients train on; the server's share is listed apart, and together they are the
    # partition's training splits.
    import json

    partition = json.loads((tmp_path / "one" / "CreamFL-concat" / "partition.json").read_text())
    trains = [partition["clients"][str(c)]["train"] for c in range(len(splits))]
    assert trains == [len(s.train) - round(0.1 * len(s.train)) for s in splits]
    assert partition["public"]["train"] == one["public_samples"]
    counts = np.add.reduce([np.asarray(partition["clients"][str(c)]["class_counts"]["train"])
                            for c in range(len(splits))]) + np.asarray(partition["public"]["class_counts"])
    assert counts.tolist() == np.add.reduce([class_counts(samples.labels, s.train, samples.num_classes)
                                             for s in splits]).tolist()
    for a, b in zip(one["history"], two["history"], strict=True):
        assert a["failures"] == [] and finite(a["client_acc"]) and math.isfinite(a["train_loss"])
        for key in ("personalized_acc", "personalized_f1", "train_loss", "global_acc"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
        assert a["client_acc"] == pytest.approx(b["client_acc"], abs=1e-6)
        assert a["bytes_up_by_modality"] == b["bytes_up_by_modality"]
    # The representations count with their modality: each of the 2 x 3 uploads carries P x d floats of each beyond
    # the model's own tensors.
    for m in ("text", "tabular"):
        assert one["bytes_up_by_modality"][m] > 2 * 3 * one["state_bytes_by_modality"][m], m
    assert one["history"][1]["train_loss"] > one["history"][0]["train_loss"]  # round 2 adds the regularisers
