"""FedProx, SCAFFOLD, FedNova, FedAvgM and FedOpt (FedAdam, FedYogi, FedAdagrad) against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from algo_testkit import make_optimizer, t, toy_trainer

from fedhb.algorithms import SCAFFOLD, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedNova, FedProx, FedYogi
from fedhb.algorithms._ops import fednova_norm, fedopt_step, scaffold_control_variate, state_bytes, weighted_average
from fedhb.config import OptimArgs

W = "head.1.weight"


def _setup(algo, x0, clients=4):
    algo.setup([W], {W: x0}, clients)
    return algo


# -- FedProx --------------------------------------------------------------------------------------------------------
def test_fedprox_local_steps_follow_the_proximal_gradient():
    # Prepare: w starts at 0 (the anchor), data mean 2, mu = 1, lr 0.5, two full-batch steps.
    algo = FedProx(mu=1.0)
    trainer, module = toy_trainer({W: [0.0]}, [2.0], epochs=2)

    # Execute
    algo.local_update(trainer, {W: t(0.0)})

    # Assert: step 1 grad (0-2) + 1*(0-0) = -2 -> w = 1; step 2 grad (1-2) + 1*(1-0) = 0 -> w stays 1.
    assert torch.equal(trainer.read()[W], t(1.0))
    assert trainer.steps == 2


def test_fedprox_mu_zero_steps_are_fedavg_steps():
    prox, plain = FedProx(mu=0.0), FedAvg()
    a, module_a = toy_trainer({W: [0.5, -1.0]}, [2.0, 1.0, 3.0], epochs=3, batch_size=2)
    b, _ = toy_trainer({W: [0.5, -1.0]}, [2.0, 1.0, 3.0], epochs=3, batch_size=2)

    prox.local_update(a, {})
    plain.local_update(b, {})

    assert torch.equal(a.read()[W], b.read()[W])
    assert a.mean_loss == b.mean_loss


def test_fedprox_rejects_negative_mu():
    with pytest.raises(ValueError, match="--algorithm.mu must be >= 0"):
        FedProx(mu=-1)


# -- SCAFFOLD -------------------------------------------------------------------------------------------------------
def test_scaffold_control_variate_is_option_two():
    # c_i - c + (x - y) / (K lr) = 1 - 0.5 + (2 - 1) / (4 * 0.25) = 1.5
    assert torch.equal(scaffold_control_variate(t(1.0), t(0.5), t(2.0), t(1.0), 4, 0.25), t(1.5))
    assert torch.equal(scaffold_control_variate(t(1.0), t(0.5), t(2.0), t(1.0), 0, 0.25), t(1.0))  # no steps


def test_scaffold_local_update_corrects_gradients_and_updates_c_i():
    # Prepare: w = 0, data mean 1, server c = 0.25, own c_i = 0, lr 0.5, two steps (K = 2).
    algo = _setup(SCAFFOLD(), t(0.0))
    state = algo.init_client_state({W: t(0.0)}, 0)
    state["algo/scaffold/c/" + W] = t(0.25)
    trainer, _ = toy_trainer({W: [0.0]}, [1.0], epochs=2)

    # Execute
    algo.local_update(trainer, state)

    # Assert: grad + (c - c_i): step 1 (0-1)+0.25 -> w = 0.375; step 2 (0.375-1)+0.25 = -0.375 -> w = 0.5625.
    assert torch.equal(trainer.read()[W], t(0.5625))
    # c_i+ = 0 - 0.25 + (0 - 0.5625) / (2 * 0.5) = -0.8125, uploaded as the change c_i+ - c_i.
    assert torch.equal(state["algo/scaffold/c_i/" + W], t(-0.8125))
    assert torch.equal(state["algo/scaffold/dc/" + W], t(-0.8125))


def test_scaffold_corrects_the_true_gradient_under_an_fp16_loss_scale():
    # Prepare: the case above, under 16-mixed precision whose GradScaler multiplies the loss (and gradients) by 1024.
    from lightning import Fabric
    from lightning.fabric.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=10**6)
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    algo = _setup(SCAFFOLD(), t(0.0))
    state = algo.init_client_state({W: t(0.0)}, 0)
    state["algo/scaffold/c/" + W] = t(0.25)
    trainer, _ = toy_trainer({W: [0.0]}, [1.0], epochs=2, fabric=fabric)

    # Execute
    algo.local_update(trainer, state)

    # Assert: the same steps as in full precision; adding c - c_i to scaled gradients would give 0.25 / 1024 instead.
    assert scaler.get_scale() == 1024.0
    assert torch.equal(trainer.read()[W], t(0.5625))
    assert torch.equal(state["algo/scaffold/c_i/" + W], t(-0.8125))


@pytest.mark.parametrize(("name", "momentum", "target"), [("sgd", 0.9, 1.0), ("adam", 0.0, 2.0), ("adamw", 0.0, 2.0)])
def test_scaffold_control_variate_is_the_mean_true_gradient_under_momentum_and_adam(name, momentum, target):
    # Issue #18, defect 4. Prepare: the quadratic (w - t)^2 / 2 from w = 0, 10 steps at lr 0.01, c = 0.25, c_i = 0.
    optim = OptimArgs(name=name, lr=0.01, momentum=momentum, schedule="constant", min_lr=0.0)
    algo = _setup(SCAFFOLD(), t(0.0))
    state = algo.init_client_state({W: t(0.0)}, 0)
    state["algo/scaffold/c/" + W] = t(0.25)
    trainer, _ = toy_trainer({W: [0.0]}, [target], lr=0.01, epochs=10, optim=optim)

    # Execute
    algo.local_update(trainer, state)

    # Assert: re-derived with the same torch optimizer: steps on g + c - c_i, the control variate the mean of g.
    w = torch.zeros(1, requires_grad=True)
    opt = make_optimizer([w], optim)
    grads = []
    for _ in range(10):
        opt.zero_grad()
        (0.5 * (w - target).pow(2).sum()).backward()
        grads.append(w.grad.clone())
        w.grad.add_(0.25)
        opt.step()
    mean = torch.stack(grads).mean(0)
    torch.testing.assert_close(trainer.read()[W], w.detach(), rtol=0, atol=1e-7)
    torch.testing.assert_close(state["algo/scaffold/c_i/" + W], mean, rtol=0, atol=1e-6)
    # Option II's (x - y) / (K lr) is far from it under these optimizers (4.4x with momentum, 0.5x with Adam).
    option_two = scaffold_control_variate(t(0.0), t(0.25), t(0.0), w.detach(), 10, 0.01)
    assert not torch.allclose(option_two, mean, rtol=0.2)


def test_scaffold_server_update_by_hand():
    # Prepare: 4 clients in the federation, 2 upload; x = 1, c = 0, server_lr 0.5.
    algo = _setup(SCAFFOLD(server_lr=0.5), t(1.0), clients=4)
    dc = "algo/scaffold/dc/" + W
    uploads = {0: {W: t(3.0), dc: t(0.5)}, 2: {W: t(0.0), dc: t(-0.25)}}

    # Execute
    received = algo.aggregate(uploads, {0: 10, 2: 30})

    # Assert: x = 1 + 0.5 * mean(3 - 1, 0 - 1) = 1.25 (uniform, sample counts ignored); c = 0 + (0.5 - 0.25) / 4.
    for cid in (0, 2):
        assert torch.equal(received[cid][W], t(1.25))
        assert torch.equal(received[cid]["algo/scaffold/c/" + W], t(0.0625))
    assert state_bytes(received[0]) == 2 * 4  # the model and the server control variate both travel


def test_scaffold_first_round_with_zero_variates_and_server_lr_one_is_uniform_fedavg():
    algo = _setup(SCAFFOLD(server_lr=1.0), t(0.3, -0.7))
    dc = "algo/scaffold/dc/" + W
    ys = {0: t(1.1, 2.3), 1: t(-0.4, 0.9), 5: t(0.25, -3.5)}

    received = algo.aggregate({c: {W: y, dc: torch.zeros(2)} for c, y in ys.items()}, {0: 5, 1: 50, 5: 500})

    uniform = weighted_average([{W: y} for y in ys.values()], [1, 1, 1])[W]
    torch.testing.assert_close(received[0][W], uniform, rtol=0, atol=1e-7)
    assert torch.equal(received[0]["algo/scaffold/c/" + W], torch.zeros(2))


def test_scaffold_uploads_the_model_and_the_change_of_its_control_variate():
    # The loop asks for upload layouts after init_client_state, so there is no bare-state fallback any more.
    algo = _setup(SCAFFOLD(), t(0.0, 0.0))

    full = algo.upload(algo.init_client_state({W: t(1.0, 2.0)}, 0))

    assert list(full) == [W, "algo/scaffold/dc/" + W]
    with pytest.raises(KeyError):
        algo.upload({W: t(1.0, 2.0)})


def test_scaffold_server_state_round_trips():
    algo = _setup(SCAFFOLD(), t(1.0))
    algo.aggregate({0: {W: t(3.0), "algo/scaffold/dc/" + W: t(1.0)}}, {0: 1})
    other = _setup(SCAFFOLD(), t(0.0))

    other.load_state_dict(algo.state_dict())

    assert other.global_state() == algo.global_state()


# -- FedNova --------------------------------------------------------------------------------------------------------
def test_fednova_norm_with_momentum_sums_the_momentum_coefficients():
    assert fednova_norm(3) == 3.0
    # rho = 0.5, tau = 3: coefficients 1, 1.5, 1.75.
    assert fednova_norm(3, 0.5) == pytest.approx(4.25)


def test_fednova_normalizes_by_local_steps():
    # Prepare: x = 0; client 0 took 2 steps to -4, client 1 one step to -1; equal samples.
    algo = _setup(FedNova(), t(0.0))
    tau = "algo/fednova/tau"
    uploads = {0: {W: t(-4.0), tau: torch.tensor(2.0, dtype=torch.float64)},
               1: {W: t(-1.0), tau: torch.tensor(1.0, dtype=torch.float64)}}

    received = algo.aggregate(uploads, {0: 7, 1: 7})

    # d = 0.5 * 4 / 2 + 0.5 * 1 / 1 = 1.5; tau_eff = 0.5 * 2 + 0.5 * 1 = 1.5; x = 0 - 1.5 * 1.5 = -2.25
    # (FedAvg would give -2.5: it favours the client that took more steps).
    assert torch.equal(received[0][W], t(-2.25)) and torch.equal(received[1][W], t(-2.25))


def test_fednova_with_equal_steps_is_fedavg():
    algo = _setup(FedNova(), t(0.5, -0.5))
    tau = torch.tensor(3.0, dtype=torch.float64)
    ys = {0: t(1.0, 2.0), 1: t(-3.0, 0.5), 2: t(0.2, 0.1)}
    samples = {0: 10, 1: 30, 2: 60}

    nova = algo.aggregate({c: {W: y, "algo/fednova/tau": tau} for c, y in ys.items()}, samples)
    avg = FedAvg().aggregate({c: {W: y} for c, y in ys.items()}, samples)

    torch.testing.assert_close(nova[0][W], avg[0][W], rtol=0, atol=1e-6)


def test_fednova_local_update_reports_its_step_count():
    algo = _setup(FedNova(), t(0.0))
    state = algo.init_client_state({W: t(0.0)}, 0)
    trainer, _ = toy_trainer({W: [0.0]}, [1.0, 2.0, 3.0], epochs=2, batch_size=2)

    algo.local_update(trainer, state)

    assert float(state["algo/fednova/tau"]) == 4.0  # 2 epochs x 2 batches
    assert "algo/fednova/tau" in algo.upload(state)


# -- FedAvgM --------------------------------------------------------------------------------------------------------
def test_fedavgm_two_rounds_by_hand():
    # Prepare: x = (1, 2), momentum 0.5, server_lr 1.
    algo = _setup(FedAvgM(momentum=0.5, server_lr=1.0), t(1.0, 2.0))

    # Execute round 1: average (1*(0,0) + 3*(3,6)) / 4 = (2.25, 4.5); d = x - avg = (-1.25, -2.5); v = d.
    first = algo.aggregate({0: {W: t(0.0, 0.0)}, 1: {W: t(3.0, 6.0)}}, {0: 1, 1: 3})
    # Round 2: clients return x unchanged, d = 0, v = 0.5 * v = (-0.625, -1.25); x = x - v.
    second = algo.aggregate({0: {W: t(2.25, 4.5)}, 1: {W: t(2.25, 4.5)}}, {0: 1, 1: 3})

    assert torch.equal(first[0][W], t(2.25, 4.5))
    assert torch.equal(second[1][W], t(2.875, 5.75))


def test_fedavgm_with_zero_momentum_is_fedavg():
    algo = _setup(FedAvgM(momentum=0.0, server_lr=1.0), t(0.1, 0.2))
    fedavg = FedAvg()
    rounds = [{0: {W: t(1.0, 2.0)}, 1: {W: t(-3.0, 0.5)}}, {0: {W: t(0.3, 0.7)}, 1: {W: t(2.0, -1.0)}}]

    for uploads in rounds:
        m = algo.aggregate(uploads, {0: 2, 1: 5})
        a = fedavg.aggregate(uploads, {0: 2, 1: 5})
        torch.testing.assert_close(m[0][W], a[0][W], rtol=0, atol=1e-7)


# -- FedOpt ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("cls", "v_expected"), [
    # v starts at tau^2 = 0.25; delta = (0.5, 1), beta2 = 0.75.
    (FedAdam, (0.75 * 0.25 + 0.25 * 0.25, 0.75 * 0.25 + 0.25 * 1.0)),  # (0.25, 0.4375)
    (FedYogi, (0.25 - 0.25 * 0.25 * 0.0, 0.25 + 0.25 * 1.0)),  # sign(0.25 - 0.25) = 0, sign(0.25 - 1) = -1
    (FedAdagrad, (0.25 + 0.25, 0.25 + 1.0)),
])
def test_fedopt_first_step_by_hand(cls, v_expected):
    # Prepare: x = 0, one client moves to (0.5, 1): delta = (0.5, 1); m = (1 - 0.5) * delta = (0.25, 0.5).
    algo = _setup(cls(server_lr=0.1, beta1=0.5, beta2=0.75, tau=0.5), t(0.0, 0.0))

    received = algo.aggregate({3: {W: t(0.5, 1.0)}}, {3: 9})

    expected = [0.1 * m / (math.sqrt(v) + 0.5) for m, v in zip((0.25, 0.5), v_expected)]
    torch.testing.assert_close(received[3][W], t(*expected), rtol=0, atol=1e-7)
    torch.testing.assert_close(algo.state_dict()["v"][W], torch.tensor(v_expected, dtype=torch.float64))


def test_fedopt_step_rules_differ_only_in_the_second_moment():
    x, delta, m, v = (torch.tensor([0.0]), torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([1.0]))

    _, m_adam, v_adam = fedopt_step(x, delta, m, v, "adam", 1.0, 0.9, 0.5, 1e-3)
    _, m_yogi, v_yogi = fedopt_step(x, delta, m, v, "yogi", 1.0, 0.9, 0.5, 1e-3)
    _, _, v_ada = fedopt_step(x, delta, m, v, "adagrad", 1.0, 0.9, 0.5, 1e-3)

    assert torch.equal(m_adam, m_yogi)
    assert v_adam.item() == pytest.approx(0.5 * 1 + 0.5 * 4)  # 2.5
    assert v_yogi.item() == pytest.approx(1 + 0.5 * 4)  # 3: additive, v < delta^2
    assert v_ada.item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="unknown FedOpt rule"):
        fedopt_step(x, delta, m, v, "sgd", 1.0, 0.9, 0.5, 1e-3)


def test_fedopt_weights_clients_by_samples_and_keeps_state_across_rounds():
    algo = _setup(FedAdam(server_lr=1.0, beta1=0.0, beta2=0.0, tau=1.0), t(0.0))

    # beta1 = beta2 = 0: m = delta, v = delta^2, x = x + delta / (|delta| + tau).
    first = algo.aggregate({0: {W: t(4.0)}, 1: {W: t(0.0)}}, {0: 3, 1: 1})  # delta = 3 -> x = 0.75
    second = algo.aggregate({0: {W: t(0.75)}}, {0: 1})  # delta = 0 -> x unchanged

    assert torch.equal(first[0][W], t(0.75))
    assert torch.equal(second[0][W], t(0.75))


@pytest.mark.parametrize("bad", [dict(server_lr=0), dict(beta1=1.0), dict(beta2=-0.1), dict(tau=0)])
def test_fedopt_options_are_checked_and_name_the_flag(bad):
    with pytest.raises(ValueError, match="--algorithm."):
        FedAdam(**bad)
