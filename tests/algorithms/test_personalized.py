"""Ditto, APFL, APPLE, FedALA, FedRep, FedPer, MOON and Centralized against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from algo_testkit import t, toy_trainer

from fedhb.algorithms import APFL, APPLE, MOON, Centralized, Ditto, FedALA, FedAvg, FedPer, FedRep
from fedhb.algorithms._ops import ala_weight_step, model_contrastive_loss
from fedhb.build import training_splits
from fedhb.data.partition import ClientSplit

W = "head.1.weight"
BODY = "enc.q.lora_A.default.weight"


def _setup(algo, names=(W,), clients=4):
    algo.setup(list(names), {n: torch.zeros(1) for n in names}, clients)
    return algo


# -- Ditto ----------------------------------------------------------------------------------------------------------
def test_ditto_trains_the_global_copy_and_a_personal_model_pulled_toward_w_t():
    # Prepare: received w_t = 0, personal v = 4, data mean 2, lam 0.5, lr 0.5, one step each.
    algo = _setup(Ditto(lam=0.5))
    state = algo.init_client_state({W: t(0.0)}, 0)
    state["algo/ditto/v/" + W] = t(4.0)
    trainer, _ = toy_trainer({W: [0.0]}, [2.0])

    # Execute
    algo.local_update(trainer, state)

    # Assert: global w = 0 - 0.5 * (0 - 2) = 1 (what is uploaded); personal grad (4-2) + 0.5 * (4-0) = 4 -> v = 2.
    assert torch.equal(trainer.read()[W], t(1.0))
    assert torch.equal(state["algo/ditto/v/" + W], t(2.0))
    assert torch.equal(algo.personalized_model(state)[W], t(2.0))
    assert algo.upload({**state, W: t(1.0)}) == {W: t(1.0)}


# -- APFL -----------------------------------------------------------------------------------------------------------
def test_apfl_step_by_hand():
    # Prepare: w = 0, v = 1, alpha = 0.5, data mean 2, lr = alpha_lr = 0.5, one step.
    algo = _setup(APFL(alpha=0.5, alpha_lr=0.5))
    state = algo.init_client_state({W: t(0.0)}, 0)
    state["algo/apfl/v/" + W] = t(1.0)
    trainer, _ = toy_trainer({W: [0.0]}, [2.0])

    # Execute
    algo.local_update(trainer, state)

    # Assert: w = 0 - 0.5 * (0 - 2) = 1. v_bar = 0.5 * 1 + 0.5 * 0 = 0.5, g = 0.5 - 2 = -1.5;
    # v = 1 - 0.5 * 0.5 * (-1.5) = 1.375; alpha = clip(0.5 - 0.5 * (-1.5) * (1 - 0)) = clip(1.25) = 1.
    assert torch.equal(trainer.read()[W], t(1.0))
    assert torch.equal(state["algo/apfl/v/" + W], t(1.375))
    assert float(state["algo/apfl/alpha"]) == 1.0
    # Personalized model: 1 * v + 0 * w.
    assert torch.equal(algo.personalized_model({**state, W: t(1.0)})[W], t(1.375))
    assert trainer.steps == 1  # the mixture's gradient is not a second reported step


def test_apfl_with_alpha_fixed_at_zero_keeps_v_and_evaluates_w():
    algo = _setup(APFL(alpha=0.0, adapt_alpha=False))
    state = algo.init_client_state({W: t(0.0)}, 0)
    state["algo/apfl/v/" + W] = t(5.0)
    trainer, _ = toy_trainer({W: [0.0]}, [2.0, 4.0], epochs=2)

    algo.local_update(trainer, state)

    assert torch.equal(state["algo/apfl/v/" + W], t(5.0))
    assert float(state["algo/apfl/alpha"]) == 0.0
    w = trainer.read()[W]
    assert torch.equal(algo.personalized_model({**state, W: w})[W], w)


def test_apfl_mixture_is_parameter_wise():
    algo = _setup(APFL())
    state = {W: t(3.0, 1.0), "algo/apfl/v/" + W: t(1.0, 3.0), "algo/apfl/alpha": torch.tensor(0.25)}

    assert torch.equal(algo.personalized_model(state)[W], t(2.5, 1.5))  # 0.25 * v + 0.75 * w


# -- APPLE ----------------------------------------------------------------------------------------------------------
def test_apple_step_by_hand():
    # Prepare: 2 clients; client 0's own core 0, client 1's core 2; p = (0.5, 0.5); data mean 3; lr 0.5; dr_lr 1/8;
    # no proximal term.
    algo = _setup(APPLE(mu=0.0, dr_lr=0.125), clients=2)
    state = algo.init_client_state({W: t(0.0)}, 0)
    state["algo/apple/core/1/" + W] = t(2.0)
    trainer, _ = toy_trainer({W: [0.0]}, [3.0], client=0)

    # Execute
    algo.local_update(trainer, state)

    # Assert: personalized 0.5 * 0 + 0.5 * 2 = 1, g = 1 - 3 = -2; own core 0 - 0.5 * 0.5 * (-2) = 0.5;
    # dp = (g * core_0, g * core_1) = (0, -4) -> p = (0.5, 1.0).
    assert torch.equal(trainer.read()[W], t(0.5))
    assert torch.equal(state["algo/apple/p"], torch.tensor([0.5, 1.0], dtype=torch.float64))
    assert torch.equal(state["algo/apple/core/0/" + W], t(0.5))  # the own slot mirrors the model
    assert torch.equal(algo.personalized_model(state)[W], t(2.25))  # 0.5 * 0.5 + 1.0 * 2


def test_apple_regulariser_is_the_codes_without_a_half_and_fades_from_round_one():
    # Issue #18, defect 2: the code's lambda(r) ||p - p0||^2 (gradient 2 lambda (p - p0)) with r counted from 0.
    algo = _setup(APPLE(mu=2.0, dr_lr=0.125, prox_rounds=0.2, schedule="cosine"), clients=2)
    state = algo.init_client_state({W: t(0.0)}, 0)
    state["algo/apple/p"] = torch.tensor([1.0, 0.0], dtype=torch.float64)
    # Data mean equals the personalized model (0), so only the regulariser moves p.
    trainer, _ = toy_trainer({W: [0.0]}, [0.0], rnd=2, rounds=10, client=1)

    algo.local_update(trainer, state)

    # L = int(0.2 * 10) = 2; round 2 is r = 1: lambda = 2 * (1 + cos(pi / 2)) / 2 = 1; dp = 2 * 1 * (p - 0.5).
    torch.testing.assert_close(state["algo/apple/p"], torch.tensor([0.875, 0.125], dtype=torch.float64))
    assert algo.proximal_weight(1, 10) == 2.0 and algo.proximal_weight(3, 10) == 0.0
    exponential = APPLE(mu=2.0, prox_rounds=0.2)  # the code's default schedule: mu * 0.001^(r / L)
    assert exponential.proximal_weight(1, 10) == 2.0
    assert exponential.proximal_weight(2, 10) == pytest.approx(2.0 * 0.001 ** 0.5)
    assert exponential.proximal_weight(3, 10) == 0.0


def test_apple_learns_the_sample_shares_from_the_first_full_aggregation():
    # Prepare: 3 clients with 1, 3 and 4 training samples; the server sees all of them in round 1.
    algo = _setup(APPLE(mu=0.0), clients=3)
    uploads = {c: {W: t(float(c))} for c in range(3)}

    received = algo.aggregate(uploads, {0: 1, 1: 3, 2: 4})
    partial = _setup(APPLE(), clients=3).aggregate({0: uploads[0]}, {0: 1})

    shares = torch.tensor([1 / 8, 3 / 8, 4 / 8], dtype=torch.float64)
    assert all(torch.equal(r["algo/apple/shares"], shares) for r in received.values())
    assert "algo/apple/shares" not in partial[0]  # not every count known yet: p stays uniform
    restored = _setup(APPLE(), clients=3)
    restored.load_state_dict(algo.state_dict())
    assert torch.equal(restored.aggregate({1: uploads[1]}, {1: 3})[1]["algo/apple/shares"], shares)
    assert "algo/apple/shares" not in _setup(APPLE(init="uniform"), clients=3).aggregate(uploads, {0: 1, 1: 3,
                                                                                                   2: 4})[0]

    # Execute: client 1's next local update (mu = 0: only the shift and the loss move p).
    state = algo.init_client_state({W: t(0.0)}, 1)
    state["algo/apple/p"] = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)  # after round 1 from uniform
    state["algo/apple/shares"] = received[1]["algo/apple/shares"]
    trainer, _ = toy_trainer({W: [0.0]}, [0.0], client=1)
    algo.local_update(trainer, state)

    # Assert: p shifted by shares - 1/3, the target now the shares (all cores 0 and data 0: no gradient).
    torch.testing.assert_close(state["algo/apple/p"], torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64) + shares
                               - 1 / 3)
    assert torch.equal(state["algo/apple/p0"], shares)


def test_apple_equals_a_rederivation_of_the_released_training_loop():
    """Re-derives ``train_one_round`` of ljaiverson/pFL-APPLE ``train_APPLE.py`` (commit 80781967): the personalized
    model ``sum_j ps_j core_j`` (``ClientNet.superBlock``), loss plus ``reg_loss(ps, p0, get_reg_coef(args, r))``
    (``utils/losses.py``), ``optim.SGD([own core, {ps, lr: lr_coef}], lr=lr_net, momentum=0.9)`` with only the own
    core trainable, a fresh optimizer each round."""
    # Prepare: 3 clients; client 1 holds cores (0.5, -1), (1, 2), (-2, 0.5); p and p0 at the shares; round 2 of 10.
    shares = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    cores = [t(0.5, -1.0), t(1.0, 2.0), t(-2.0, 0.5)]
    algo = _setup(APPLE(mu=0.5, dr_lr=0.05, prox_rounds=0.5), clients=3)
    state = algo.init_client_state({W: cores[1].clone()}, 1)
    state.update({f"algo/apple/core/{j}/{W}": cores[j].clone() for j in (0, 2)})
    state.update({"algo/apple/p": torch.tensor([0.1, 0.5, 0.4], dtype=torch.float64), "algo/apple/p0": shares,
                  "algo/apple/shares": shares})
    data = [1.0, -2.0, 3.0, 0.5, 2.5]
    trainer, _ = toy_trainer({W: cores[1].tolist()}, data, lr=0.1, epochs=2, batch_size=2, client=1, rnd=2)
    twin, _ = toy_trainer({W: cores[1].tolist()}, data, lr=0.1, epochs=2, batch_size=2, client=1, rnd=2)
    order = [rows for rows, _ in twin.batches(2)]

    # Execute
    algo.local_update(trainer, state)

    # Assert: the released loop on the same batches (the toy loss at the personalized model).
    own = torch.nn.Parameter(cores[1].clone())
    ps = torch.nn.Parameter(torch.tensor([0.1, 0.5, 0.4]))
    p0 = shares.float()
    optimizer = torch.optim.SGD([{"params": [own]}, {"params": [ps], "lr": 0.05 * 1.0 ** 1}], lr=0.1 * 1.0 ** 1,
                                momentum=0.9)
    horizon = int(10 * 0.5)
    coef = (0.001 / 1) ** (1 / horizon) * 0.5  # get_reg_coef, exponential, r = 1
    x = torch.tensor(data)
    for rows in order:
        optimizer.zero_grad()
        mixed = ps[0] * cores[0] + ps[1] * own + ps[2] * cores[2]
        loss = 0.5 * (mixed[None, :] - x[rows][:, None]).pow(2).sum(1).mean() + torch.sum((ps - p0) * (ps - p0)) * coef
        loss.backward()
        optimizer.step()
    torch.testing.assert_close(state["algo/apple/p"].float(), ps.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(state[f"algo/apple/core/1/{W}"], own.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(trainer.read()[W], own.detach(), rtol=0, atol=1e-6)


def test_apple_clients_receive_every_other_participants_core():
    algo = _setup(APPLE(), clients=3)
    uploads = {0: {W: t(1.0)}, 2: {W: t(3.0)}}

    received = algo.aggregate(uploads, {0: 1, 2: 1})

    assert received == {0: {"algo/apple/core/2/" + W: t(3.0)}, 2: {"algo/apple/core/0/" + W: t(1.0)}}


def test_apple_starts_uniform_with_every_core_at_the_initial_model():
    algo = _setup(APPLE(), clients=4)

    state = algo.init_client_state({W: t(7.0)}, 0)

    assert torch.equal(state["algo/apple/p"], torch.full((4,), 0.25, dtype=torch.float64))
    assert all(torch.equal(state[f"algo/apple/core/{j}/{W}"], t(7.0)) for j in range(4))
    assert torch.equal(algo.personalized_model(state)[W], t(7.0))


# -- FedALA ---------------------------------------------------------------------------------------------------------
def test_ala_weight_step_clips_to_the_unit_interval():
    w = ala_weight_step(t(1.0, 0.5, 0.2), t(1.0, -1.0, 1.0), t(2.0, 2.0, 2.0), t(0.0, 0.0, 0.0), 0.25)

    # 1 - 0.25 * 1 * 2 = 0.5; 0.5 + 0.5 = 1.0; 0.2 - 0.5 -> 0.
    assert torch.equal(w, t(0.5, 1.0, 0.0))


def test_fedala_learns_the_weights_then_trains_from_the_mixture():
    # Prepare: received global 2, local 0, W = 1, data mean 1, eta 0.25; the body tensor is not adaptive.
    algo = _setup(FedALA(layers=1, eta=0.25, rand_percent=100, num_pre_loss=2, threshold=0.1), names=(BODY, W))
    state = algo.init_client_state({BODY: t(0.0), W: t(0.0)}, 0)
    trainer, _ = toy_trainer({BODY: [5.0], W: [2.0]}, [1.0])

    # Execute
    algo.local_update(trainer, state)

    # Assert: theta = 0 + 2 * 1 = 2, g = 1, W = 1 - 0.25 * 1 * 2 = 0.5, theta = 1 where g = 0: W stays 0.5. The body
    # keeps the global value 5. Local training then moves body 5 -> 3 and head 1 -> 1.
    assert torch.equal(state["algo/fedala/weight/" + W], t(0.5))
    assert "algo/fedala/weight/" + BODY not in state
    assert float(state["algo/fedala/started"]) == 1.0
    assert torch.equal(trainer.read()[W], t(1.0)) and torch.equal(trainer.read()[BODY], t(3.0))
    assert torch.equal(algo.personalized_model(state)[W], t(1.0))


def test_fedala_skips_adaptive_aggregation_while_local_equals_global():
    algo = _setup(FedALA(layers=1))
    state = algo.init_client_state({W: t(2.0)}, 0)
    trainer, _ = toy_trainer({W: [2.0]}, [0.0])

    algo.local_update(trainer, state)

    assert float(state["algo/fedala/started"]) == 0.0
    assert torch.equal(state["algo/fedala/weight/" + W], t(1.0))
    assert torch.equal(state["algo/fedala/local/" + W], t(1.0))  # plain local step 2 - 0.5 * 2


def test_fedala_first_weight_learning_stops_when_the_loss_settles():
    algo = _setup(FedALA(layers=1, eta=0.25, rand_percent=100, num_pre_loss=2, threshold=0.1, max_start_epochs=50))
    trainer, _ = toy_trainer({W: [2.0]}, [1.0])
    glob, local, weights = {W: t(2.0)}, {W: t(0.0)}, {W: t(1.0)}

    algo.learn_weights(trainer, glob, local, weights, first=True)

    # Epoch losses 0.5, 0, 0: after three the spread of the last two is 0 < 0.1. Recorded as no local steps.
    assert trainer.steps == 0
    assert torch.equal(trainer.read()[W], t(1.0))


def test_fedala_learns_on_one_slice_per_round_as_the_reference_ala():
    """Re-derives ``ALA.adaptive_local_aggregation`` of TsingZ0/PFLlib ``system/utils/ALA.py`` (commit d832e76f):
    one ``DataLoader(train_data[rand_idx:rand_idx + rand_num])`` per round, unshuffled, reused every weight-learning
    epoch, with ``weight = clamp(weight - eta * grad * (param_g - param), 0, 1)`` after every batch."""
    # Prepare: 8 samples, rand_percent 50 (a slice of 4), batches of 2, three epochs (threshold 0 never stops).
    data = [0.5, 3.0, -1.0, 2.0, 4.0, -2.5, 1.5, 0.0]
    algo = _setup(FedALA(layers=1, eta=0.3, rand_percent=50, threshold=0.0, num_pre_loss=10, max_start_epochs=3),
                  names=(BODY, W))
    trainer, _ = toy_trainer({BODY: [5.0], W: [2.0, -1.0]}, data, batch_size=2)
    seen = []
    gradients = trainer.gradients

    def recording(batch, **kwargs):
        seen.append(batch["x"].tolist())
        return gradients(batch, **kwargs)

    trainer.gradients = recording
    glob, local, weights = {W: t(2.0, -1.0)}, {W: t(0.0, 1.0)}, {W: t(1.0, 1.0)}

    # Execute
    learned = algo.learn_weights(trainer, glob, local, weights, first=True)

    # Assert: every epoch saw the same contiguous slice in the same order (issue #18, defect 6) ...
    epochs = [sum(seen[i:i + 2], []) for i in range(0, 6, 2)]
    assert epochs[0] == epochs[1] == epochs[2]
    start = data.index(epochs[0][0])
    assert epochs[0] == data[start:start + 4]
    # ... and the weights are the reference's on that slice.
    weight = torch.ones(2)
    param, param_g = local[W], glob[W]
    for _ in range(3):
        for first in range(0, 4, 2):
            x = torch.tensor(epochs[0][first:first + 2])
            param_t = param + (param_g - param) * weight
            grad = param_t - x.mean()  # the toy loss's gradient at param_t
            weight = torch.clamp(weight - 0.3 * (grad * (param_g - param)), 0, 1)
    torch.testing.assert_close(learned[W], weight, rtol=0, atol=1e-7)
    torch.testing.assert_close(trainer.read()[W], param + (param_g - param) * weight, rtol=0, atol=1e-7)


# -- FedRep and FedPer ----------------------------------------------------------------------------------------------
def test_fedrep_trains_the_head_then_the_body():
    algo = _setup(FedRep(head_epochs=2), names=(BODY, W))
    trainer, _ = toy_trainer({BODY: [0.0], W: [0.0]}, [2.0])

    # Two head-only epochs (0 -> 1 -> 1.5) then one body-only epoch (0 -> 1).
    algo.local_update(trainer, {})

    assert torch.equal(trainer.read()[W], t(1.5))
    assert torch.equal(trainer.read()[BODY], t(1.0))
    assert trainer.steps == 3


def test_fedrep_and_fedper_share_the_adapter_and_keep_the_head():
    state = {BODY: t(1.0), W: t(2.0), "head.1.bias": t(3.0)}
    for algo in (FedRep(), FedPer()):
        assert algo.upload(state) == {BODY: t(1.0)}
        received = algo.aggregate({0: {BODY: t(1.0)}, 1: {BODY: t(4.0)}}, {0: 2, 1: 1})
        assert received[1] == {BODY: t(2.0)}
        assert not algo.has_global_model


# -- MOON -----------------------------------------------------------------------------------------------------------
def test_model_contrastive_loss_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z_glob = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # cos 1 for both
    z_prev = torch.tensor([[0.0, 1.0], [0.0, -3.0]])  # cos 0 and -1

    loss = model_contrastive_loss(z, z_glob, z_prev, temperature=0.5)

    # -log(e^2 / (e^2 + e^0)) and -log(e^2 / (e^2 + e^-2)), averaged.
    expected = 0.5 * (math.log1p(math.exp(-2)) + math.log1p(math.exp(-4)))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_moon_local_update_adds_the_contrastive_term_and_remembers_the_model():
    # Toy features are x * p: with p0 = (1, 0) and the previous model (0, 1) the cosines are known.
    algo = _setup(MOON(mu=1.0, temperature=1.0), names=(W,))
    state = algo.init_client_state({W: t(1.0, 0.0)}, 0)
    state["algo/moon/prev/" + W] = t(0.0, 1.0)
    trainer, _ = toy_trainer({W: [1.0, 0.0]}, [1.0])

    algo.local_update(trainer, state)

    # z = z_glob = (1, 0) and z_prev = (0, 1) at the start: l_con = log(1 + e^-1); the task gradient is (0, -1).
    assert trainer.steps == 1
    assert trainer.mean_loss == pytest.approx(0.5 + math.log1p(math.exp(-1)), rel=1e-6)
    assert torch.equal(state["algo/moon/prev/" + W], trainer.read()[W])


# -- Centralized ----------------------------------------------------------------------------------------------------
def test_centralized_pools_training_data_on_client_zero():
    splits = [ClientSplit(np.array([4, 1]), np.array([7]), np.array([9])),
              ClientSplit(np.array([0, 3]), np.array([8]), np.array([2]))]

    pooled = training_splits(Centralized(), splits)

    assert pooled[0].train.tolist() == [0, 1, 3, 4] and pooled[1].train.tolist() == []
    assert [s.test.tolist() for s in pooled] == [[9], [2]] and [s.val.tolist() for s in pooled] == [[7], [8]]
    assert training_splits(FedAvg(), splits) is splits


def test_centralized_hands_client_zeros_model_to_everyone():
    algo = Centralized()

    received = algo.aggregate({0: {W: t(1.5)}, 1: {W: t(-9.0)}}, {0: 10, 1: 0})

    assert received[1][W].item() == 1.5 and algo.global_state()[W].item() == 1.5
    assert algo.aggregate({1: {W: t(-9.0)}}, {1: 0}) == {}  # nothing trained this round
