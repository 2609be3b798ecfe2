"""m-MOON (MOON on multimodal models, as Med-MMFL applies it) against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from algo_testkit import multimodal_trainer, t

from fedhb.algorithms import MMOON, MOON
from fedhb.algorithms.mmoon import Representations, modality_contrastive_loss

A, B = "encoders.a.p", "encoders.b.p"


def _mmoon(contrast: str) -> MMOON:
    algo = MMOON(mu=1.0, temperature=1.0, contrast=contrast)
    algo.setup([A, B], {A: torch.zeros(2), B: torch.zeros(2)}, 2)
    return algo


def _client(algo: MMOON):
    # Two samples: both hold a (x = 1, 2); only the first holds b (x = 1; the second's 5 is absent).
    trainer, module = multimodal_trainer({"a": [1.0, 0.0], "b": [0.0, 1.0]}, {"a": [1.0, 2.0], "b": [1.0, 5.0]},
                                         {"a": [True, True], "b": [True, False]}, [0, 1])
    state = algo.init_client_state({A: t(1.0, 0.0), B: t(0.0, 1.0)}, 0)
    state["algo/moon/prev/" + A], state["algo/moon/prev/" + B] = t(0.0, 1.0), t(1.0, 1.0)
    return trainer, state


def l_con(cos_glob: float, cos_prev: float) -> float:
    """MOON's term at temperature 1: -log(e^{c_g} / (e^{c_g} + e^{c_p}))."""
    return math.log1p(math.exp(cos_prev - cos_glob))


#: The toy task loss at the start: a: mean(0.5 * |(1,0) - (1,1)|^2, 0.5 * |(1,0) - (2,2)|^2) = 1.5; b (first sample
#: only): 0.5 * |(0,1) - (1,1)|^2 = 0.5.
TASK = 2.0


def test_modalities_contrast_each_modality_over_the_samples_holding_it():
    algo = _mmoon("modalities")
    trainer, state = _client(algo)

    algo.local_update(trainer, state)

    # z_glob = z at the start (the received model). a: z = (x, 0), z_prev = x (0, 1): cos 0 for both samples.
    # b, first sample only: z = (0, 1), z_prev = (1, 1): cos 1/sqrt(2). The absent second sample adds nothing.
    expected = TASK + l_con(1, 0) + l_con(1, 1 / math.sqrt(2))
    assert trainer.steps == 1
    assert trainer.mean_loss == pytest.approx(expected, rel=1e-6)
    assert torch.equal(state["algo/moon/prev/" + A], trainer.read()[A])  # the model after training, as MOON's


def test_both_adds_moons_term_on_the_fused_features():
    algo = _mmoon("both")
    trainer, state = _client(algo)

    algo.local_update(trainer, state)

    # Fused (concatenation, zeros where absent): first sample z = (1, 0, 0, 1), z_prev = (0, 1, 1, 1): cos 1/sqrt(6);
    # second z = (2, 0, 0, 0), z_prev = (0, 2, 0, 0): cos 0.
    fused = (l_con(1, 1 / math.sqrt(6)) + l_con(1, 0)) / 2
    expected = TASK + l_con(1, 0) + l_con(1, 1 / math.sqrt(2)) + fused
    assert trainer.mean_loss == pytest.approx(expected, rel=1e-6)


def test_fused_is_moons_term():
    moon, mmoon = MOON(mu=1.0, temperature=1.0), _mmoon("fused")
    moon.setup([A, B], {A: torch.zeros(2), B: torch.zeros(2)}, 2)
    (t1, s1), (t2, s2) = _client(moon), _client(mmoon)  # type: ignore[arg-type]

    moon.local_update(t1, s1)
    mmoon.local_update(t2, s2)

    assert t2.mean_loss == t1.mean_loss == pytest.approx(TASK + (l_con(1, 1 / math.sqrt(6)) + l_con(1, 0)) / 2)
    assert all(torch.equal(t1.read()[k], t2.read()[k]) for k in (A, B))


def test_a_modality_no_sample_holds_adds_nothing():
    z = {"a": torch.tensor([[1.0, 0.0]]), "b": torch.tensor([[0.0, 1.0]])}
    present = {"a": torch.tensor([True]), "b": torch.tensor([False])}

    loss = modality_contrastive_loss(z, z, {"a": torch.tensor([[0.0, 1.0]]), "b": z["b"]}, present, 0.5)

    assert loss is not None and loss.item() == pytest.approx(math.log1p(math.exp(-2)))  # cos 1 and 0 over t = 0.5
    assert modality_contrastive_loss(z, z, z, {m: torch.tensor([False]) for m in z}, 0.5) is None


def test_representations_are_the_fusions_projections_of_the_real_client_model(multimodal_data):
    # The real client model (report text + tabular features, late fusion) on samples some of which lack a report.
    from fedhb.build import build_module
    from fedhb.config import ModelArgs, OptimArgs

    args = ModelArgs(backbones={"text": "tiny-bert", "tabular": "tiny-mlp"}, max_length=16, fusion_dim=8)
    module = build_module(args, multimodal_data, OptimArgs(), 0).eval()
    tensors = module.prepare(multimodal_data)
    absent = (~tensors["text/present"].bool()).nonzero().squeeze(1)
    rows = torch.cat([absent[:2], torch.tensor([0, 1, 2])])
    batch = {k: v[rows] for k, v in tensors.items()}
    reps = Representations(module)

    with torch.no_grad(), reps:
        module.features(batch)
        got = reps.take(reps.present(tensors, rows))
        features, present = module.encode(batch)

    assert reps.modalities == ["text", "tabular"] and not reps._handles  # hooks removed on exit
    assert not bool(present["text"][:2].any()) and bool(present["text"][2:].all())
    for m in ("text", "tabular"):
        assert torch.equal(got[m], module.fusion.proj[m](features[m]))
    # A frozen fusion (a task that leaves it out): the encoders' outputs, run on the rows that hold the modality only
    # and scattered back (zeros elsewhere, as the client model hands them to the fusion).
    module.fusion.requires_grad_(False)
    frozen = Representations(module)
    with torch.no_grad(), frozen:
        module.features(batch)
        got = frozen.take(frozen.present(tensors, rows))
    assert frozen.layers["text"] is module.encoders["text"]
    for m in ("text", "tabular"):
        assert torch.equal(got[m], features[m])
    assert not bool(got["text"][:2].any())


def test_a_wrong_contrast_names_the_option():
    with pytest.raises(ValueError, match="--algorithm.contrast"):
        MMOON(contrast="joint")


def test_mmoon_runs_like_moon_in_a_federation_with_fused_contrast(make_loop):
    # On the unimodal tiny ViT, fused contrast is MOON, modalities contrast its one encoder's features.
    runs = {}
    for name, algo in (("moon", MOON()), ("fused", MMOON()), ("modalities", MMOON(contrast="modalities"))):
        loop = make_loop(algo, clients=2, rounds=1)
        loop.run_round(1)
        runs[name] = {k: v.clone() for k, v in loop.states[0].items()}

    assert all(torch.equal(runs["moon"][k], runs["fused"][k]) for k in runs["moon"])
    # One modality whose representation is the fused features: the same term, the same model.
    assert all(np.allclose(runs["moon"][k].numpy(), runs["modalities"][k].numpy(), atol=1e-6) for k in runs["moon"])
