"""FedSA-LoRA, FFA-LoRA, FLoRA and EPFL's upload against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from algo_testkit import t, toy_trainer

from fedhb import seeds
from fedhb.algorithms import EPFL, FedSALoRA, FFALoRA, FLoRA
from fedhb.algorithms._ops import stack_lora, state_bytes
from fedhb.algorithms.flora import fresh_a, run_key

A, B = "enc.q.lora_A.default.weight", "enc.q.lora_B.default.weight"
HEAD = "head.1.weight"


def m(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# -- FedSA-LoRA -----------------------------------------------------------------------------------------------------
def test_fedsa_lora_averages_a_and_never_touches_b_or_the_head():
    uploads = {c: FedSALoRA().upload(s) for c, s in {
        0: {A: m([1.0, 2.0]), B: m([5.0], [6.0]), HEAD: m([9.0])},
        1: {A: m([4.0, 8.0]), B: m([7.0], [8.0]), HEAD: m([1.0])},
    }.items()}

    received = FedSALoRA().aggregate(uploads, {0: 1, 1: 2})

    assert all(set(u) == {A} for u in uploads.values())  # B and head never leave the client
    assert all(set(r) == {A} for r in received.values())  # so no client's B can be overwritten
    assert torch.equal(received[0][A], m([3.0, 6.0]))  # (1 * (1, 2) + 2 * (4, 8)) / 3


# -- FFA-LoRA -------------------------------------------------------------------------------------------------------
def test_ffa_lora_trains_b_and_head_but_never_a():
    algo = FFALoRA()
    algo.setup([A, B, HEAD])
    trainer, _ = toy_trainer({A: [0.0], B: [0.0], HEAD: [0.0]}, [2.0], epochs=2)

    algo.local_update(trainer, {})

    after = trainer.read()
    assert torch.equal(after[A], t(0.0))
    assert torch.equal(after[B], t(1.5)) and torch.equal(after[HEAD], t(1.5))  # 0 -> 1 -> 1.5


def test_ffa_lora_averages_b_and_head_only():
    state = {A: m([1.0]), B: m([2.0]), HEAD: m([3.0])}
    algo = FFALoRA()

    received = algo.aggregate({0: algo.upload(state), 1: {B: m([4.0]), HEAD: m([5.0])}}, {0: 1, 1: 1})

    assert set(algo.upload(state)) == {B, HEAD}
    assert received[0] == {B: m([3.0]), HEAD: m([4.0])}
    assert algo.has_global_model


# -- FLoRA ----------------------------------------------------------------------------------------------------------
def test_stacking_gives_the_exact_weighted_sum_of_updates_for_different_ranks():
    # Prepare: three clients with ranks 1, 2 and 3 on a 4x5 layer, and their LoRA scalings alpha / r.
    gen = torch.Generator().manual_seed(0)
    ranks, weights, scalings = [1, 2, 3], [0.5, 0.3, 0.2], [16.0, 8.0, 16 / 3]
    a = [torch.randn(r, 5, generator=gen, dtype=torch.float64) for r in ranks]
    b = [torch.randn(4, r, generator=gen, dtype=torch.float64) for r in ranks]

    # Execute
    stacked_a, stacked_b = stack_lora(a, b, weights, scalings)

    # Assert
    assert stacked_a.shape == (6, 5) and stacked_b.shape == (4, 6)
    expected = sum(w * s * bk @ ak for w, s, ak, bk in zip(weights, scalings, a, b))
    torch.testing.assert_close(stacked_b @ stacked_a, expected, rtol=0, atol=1e-12)
    # Averaging the factors separately does not give it: that is why FLoRA stacks.
    naive = sum(w * bk[:, :1] for w, bk in zip(weights, b)) @ sum(w * ak[:1] for w, ak in zip(weights, a))
    assert not torch.allclose(naive, sum(w * bk @ ak for w, ak, bk in zip(weights, a, b)))


def test_stacking_by_hand_and_rank_mismatch():
    stacked_a, stacked_b = stack_lora([m([1.0, 2.0])], [m([3.0], [4.0])], [0.5])

    assert torch.equal(stacked_b @ stacked_a, torch.tensor([[1.5, 3.0], [2.0, 4.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="client 0: A has rank 1 but B has 2 columns"):
        stack_lora([m([1.0, 2.0])], [m([3.0, 1.0], [4.0, 1.0])], [1.0])


def test_flora_aggregate_accumulates_the_sample_weighted_update_and_resets_adapters():
    # Prepare: rank-1 adapters on a 2x2 layer, A initialised to (1, 0).
    algo = FLoRA()
    algo.setup([A, B, HEAD], {A: m([1.0, 0.0]), B: m([0.0], [0.0]), HEAD: m([0.0])}, 2)
    uploads = {0: {A: m([1.0, 1.0]), B: m([1.0], [0.0]), HEAD: m([2.0])},
               1: {A: m([0.0, 2.0]), B: m([0.0], [3.0]), HEAD: m([6.0])}}

    # Execute: two rounds with the same uploads.
    received = algo.aggregate(uploads, {0: 3, 1: 1})
    algo.aggregate(uploads, {0: 3, 1: 1})

    # Assert: 0.75 * [[1, 1], [0, 0]] + 0.25 * [[0, 0], [0, 6]] per round, accumulated over the two rounds.
    once = torch.tensor([[0.75, 0.75], [0.0, 1.5]], dtype=torch.float64)
    torch.testing.assert_close(algo.merged_update("enc.q"), 2 * once, rtol=0, atol=0)
    # After aggregation 1 the adapters restart from B = 0 and a fresh A: peft's kaiming_uniform_(a=sqrt(5)), bound
    # 1 / sqrt(in), drawn from the stream [run key, 1, LORA_REDRAW, layer 0]; the second aggregation draws again.
    gen = torch.Generator().manual_seed(seeds.derive(run_key({A: m([1.0, 0.0])}), 1, seeds.Stream.LORA_REDRAW, 0))
    first = torch.empty(1, 2).uniform_(-1 / math.sqrt(2), 1 / math.sqrt(2), generator=gen)
    assert torch.equal(received[1][A], first) and torch.equal(received[1][B], m([0.0], [0.0]))
    assert not torch.equal(algo.global_state()[A], first) and algo.global_state()[A].abs().max() <= 1 / math.sqrt(2)
    assert torch.equal(received[0][HEAD], m([3.0]))  # 0.75 * 2 + 0.25 * 6
    assert state_bytes(received[0]) == state_bytes(uploads[0])


def test_flora_with_a_rank_per_client_by_hand():
    # Prepare: the model's adapters have rank 2 on a 2x2 layer; client 0 uses rank 2, client 1 rank 1.
    algo = FLoRA(ranks=[2, 1])
    eye = m([1.0, 0.0], [0.0, 1.0])
    algo.setup([A, B, HEAD], {A: eye, B: torch.zeros(2, 2), HEAD: m([0.0])}, 2)
    states = {c: algo.init_client_state({A: eye.clone(), B: torch.zeros(2, 2), HEAD: m([0.0])}, c) for c in (0, 1)}
    states[0].update({A: eye, B: eye, HEAD: m([2.0])})  # B_0 A_0 = I
    states[1].update({A: m([1.0, 1.0], [0.0, 0.0]), B: m([1.0, 0.0], [0.0, 0.0]), HEAD: m([6.0])})  # [[1, 1], [0, 0]]

    # Execute
    uploads = {c: algo.upload(s) for c, s in states.items()}
    received = algo.aggregate(uploads, {0: 1, 1: 3})

    # Assert: client 1 sends its rank-1 factors only.
    assert uploads[1][A].shape == (1, 2) and uploads[1][B].shape == (2, 1) and uploads[0][A].shape == (2, 2)
    assert state_bytes(uploads[1]) == (2 + 2 + 1) * 4
    # 0.25 * (2 / 2) * I + 0.75 * (2 / 1) * [[1, 1], [0, 0]]: each update at its client's scaling alpha / r_k.
    expected = torch.tensor([[1.75, 1.5], [0.0, 0.25]], dtype=torch.float64)
    torch.testing.assert_close(algo.merged_update("enc.q"), expected, rtol=0, atol=0)
    # Each client restarts from the round's fresh A cut to its rank, B = 0, and the averaged head (0.25*2 + 0.75*6).
    fresh = fresh_a(run_key({A: eye}), 1, 0, (2, 2))
    assert torch.equal(received[0][A], fresh) and torch.equal(received[1][A], torch.cat([fresh[:1], m([0.0, 0.0])]))
    assert not received[1][B].any() and torch.equal(received[1][HEAD], m([5.0]))
    # Download: the stacked factors ((4 + 4) + (2 + 2) floats) and the head; a client catching up gets the dense 2x2.
    assert algo.download_bytes(received[1]) == (8 + 4) * 4 + 4
    assert algo.download_bytes(algo.global_state(), catch_up=True) == 4 * 4 + 4
    assert algo.hparams() == {"ranks": "2,1"}


def test_flora_refuses_ranks_the_model_cannot_hold():
    with pytest.raises(ValueError, match="--algorithm.ranks"):
        FLoRA(ranks=[])
    with pytest.raises(ValueError, match="--algorithm.ranks"):
        FLoRA(ranks=[4, 0])
    with pytest.raises(ValueError, match=r"--algorithm.ranks has rank 3 but --model.lora.r is 2.*--model.lora.r 3"):
        FLoRA(ranks=[3, 1]).setup([A, B], {A: torch.zeros(2, 4), B: torch.zeros(4, 2)}, 2)


def test_flora_on_load_gives_the_module_each_clients_rank_and_scaling(tiny_data):
    # A real peft layer of rank 8 and alpha 16: client 1 of rank 2 runs at scaling 16 / 2 with the rest held at zero.
    from fedhb.build import build_module
    from fedhb.config import ModelArgs, OptimArgs

    torch.manual_seed(0)
    module = build_module(ModelArgs(), tiny_data, OptimArgs(), seed=0)
    initial = module.get_state()
    algo = FLoRA(ranks=[8, 2])
    algo.setup(list(initial), initial, 2)
    layer = module.get_submodule(FLoRA.layer_of(next(n for n in initial if ".lora_A." in n)))
    state = algo.init_client_state({k: v.clone() for k, v in initial.items()}, 1)
    state.update({k: torch.ones_like(v) for k, v in state.items() if ".lora_" in k})  # e.g. a stale global sync

    module.load_state(state, list(initial))

    assert layer.scaling["default"] == 8.0
    assert layer.lora_A["default"].weight[:2].eq(1).all() and not layer.lora_A["default"].weight[2:].any()
    assert layer.lora_B["default"].weight[:, :2].eq(1).all() and not layer.lora_B["default"].weight[:, 2:].any()
    module.load_state(algo.init_client_state({k: v.clone() for k, v in initial.items()}, 0))
    assert layer.scaling["default"] == 2.0
    module.load_state(initial)  # the global model: the module's own scaling
    assert layer.scaling["default"] == 2.0


def test_flora_on_load_writes_the_update_into_the_frozen_weights(tiny_data):
    # A real peft layer: W0 + scaling * update must replace the base weight, once per aggregation, idempotently.
    from fedhb.build import build_module
    from fedhb.config import ModelArgs, OptimArgs
    from fedhb.models.lora import BaseMerge

    torch.manual_seed(0)
    module = build_module(ModelArgs(), tiny_data, OptimArgs(), seed=0)
    initial = module.get_state()
    algo = FLoRA()
    algo.setup(list(initial), initial, 2)
    a_name = next(n for n in initial if ".lora_A." in n)
    layer = module.get_submodule(FLoRA.layer_of(a_name))
    w0 = layer.base_layer.weight.detach().clone()
    gen = torch.Generator().manual_seed(1)
    uploads = {c: {k: torch.randn(v.shape, generator=gen) for k, v in initial.items()} for c in (0, 1)}

    backbone = BaseMerge(module)  # what the loop does with the aggregate's backbone update
    backbone.merge(algo.aggregate(uploads, {0: 1, 1: 3}).backbone)
    backbone.merge(algo.backbone_update())  # merging again: no double counting

    b_name = a_name.replace(".lora_A.", ".lora_B.")
    update = sum(w * uploads[c][b_name].double() @ uploads[c][a_name].double() for c, w in ((0, 0.25), (1, 0.75)))
    expected = (w0.double() + layer.scaling["default"] * update).float()
    torch.testing.assert_close(layer.base_layer.weight, expected, rtol=0, atol=1e-6)

    # A restored server state (a resumed run) merges into this process's original weights, not on top of them.
    restored = FLoRA()
    restored.setup(list(initial), initial, 2)
    restored.load_state_dict(algo.state_dict())
    backbone.merge(restored.backbone_update())
    torch.testing.assert_close(layer.base_layer.weight, expected, rtol=0, atol=1e-6)


# -- EPFL -----------------------------------------------------------------------------------------------------------
def test_epfl_uploads_a_and_b_and_counts_their_bytes():
    state = {A: torch.zeros(8, 64), B: torch.zeros(64, 8), HEAD: torch.zeros(11, 64), "algo/x": torch.zeros(3)}

    upload = EPFL().upload(state)

    assert set(upload) == {A, B}  # the server needs B for the distances
    assert state_bytes(upload) == 2 * 8 * 64 * 4
