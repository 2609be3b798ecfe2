"""pFedMe: a hand-computed step and server step, the Moreau envelope's fixed point, and PFLlib's client re-derived."""

from __future__ import annotations

import pytest
import torch
from algo_testkit import t, toy_trainer

from fedhb.algorithms import PFedMe

W = "head.1.weight"
THETA = "algo/pfedme/theta/" + W


def _setup(algo, x0=None):
    algo.setup([W], {W: t(0.0) if x0 is None else x0}, 3)
    return algo


def test_pfedme_local_step_by_hand():
    # Prepare: w = theta = 0, data mean 2, lam 1, one inner step at personal_lr 0.5, mu 0, lr 0.5.
    algo = _setup(PFedMe(lam=1.0, inner_steps=1, personal_lr=0.5, mu=0.0))
    state = algo.init_client_state({W: t(0.0)}, 0)
    trainer, _ = toy_trainer({W: [0.0]}, [2.0])

    algo.local_update(trainer, state)

    # theta = 0 - 0.5 * ((0 - 2) + 1 * (0 - 0)) = 1; w = 0 - 0.5 * 1 * (0 - 1) = 0.5.
    assert torch.equal(state[THETA], t(1.0)) and torch.equal(trainer.read()[W], t(0.5))
    assert torch.equal(algo.personalized_model(state)[W], t(1.0))


def test_pfedme_server_mixes_the_average_with_beta():
    algo = _setup(PFedMe(beta=0.5), t(1.0, 1.0))

    received = algo.aggregate({0: {W: t(3.0, 1.0)}, 2: {W: t(1.0, 5.0)}}, {0: 1, 2: 3})

    # Average (1.5, 4.0); (1 - 0.5) (1, 1) + 0.5 (1.5, 4) = (1.25, 2.5).
    assert torch.equal(received[0][W], t(1.25, 2.5))
    with pytest.raises(ValueError, match="--algorithm.lam"):
        PFedMe(lam=0.0)


def test_pfedme_personal_model_reaches_the_moreau_envelopes_minimiser():
    # With many inner steps theta solves min f(theta) + lam / 2 ||theta - w||^2 (+ mu / 2 ||theta||^2): on the toy
    # loss, theta* = (mean + lam w) / (1 + lam + mu) for the w the inner steps last saw.
    algo = _setup(PFedMe(lam=3.0, inner_steps=400, personal_lr=0.05, mu=0.1))
    state = algo.init_client_state({W: t(1.0)}, 0)
    trainer, _ = toy_trainer({W: [1.0]}, [4.0, 6.0], lr=0.0001)

    algo.local_update(trainer, state)

    torch.testing.assert_close(state[THETA], t((5.0 + 3.0 * 1.0) / (1 + 3.0 + 0.1)), rtol=0, atol=1e-5)


def test_pfedme_is_pfllibs_client():
    """PFLlib (TsingZ0/PFLlib, commit d832e76f6a23b833038949ec1e4fdefe63a4d350) ``clients/clientpFedMe.py::train``
    with ``optimizers/fedoptimizer.py::pFedMeOptimizer`` (``p -= lr (grad + lamda (p - local) + mu p)``, ``K`` times
    per batch, then ``local -= lamda * learning_rate * (local - personalized)``) and
    ``servers/serverpFedMe.py::beta_aggregate_parameters``."""
    data = [1.0, -2.0, 3.0, 0.5, 2.5]
    algo = _setup(PFedMe(lam=2.0, inner_steps=3, personal_lr=0.05, mu=0.001), t(0.5, -1.0))
    state = algo.init_client_state({W: t(0.5, -1.0)}, 0)
    trainer, _ = toy_trainer({W: [0.5, -1.0]}, data, lr=0.1, epochs=2, batch_size=2)

    algo.local_update(trainer, state)

    twin, _ = toy_trainer({W: [0.0]}, data, epochs=2, batch_size=2)
    model = torch.nn.Parameter(t(0.5, -1.0))
    local = t(0.5, -1.0)
    for _, batch in twin.batches(2):
        x = batch["x"]
        for _ in range(3):
            grad = torch.autograd.grad(0.5 * (model[None, :] - x[:, None]).pow(2).sum(1).mean(), model)[0]
            with torch.no_grad():
                model -= 0.05 * (grad + 2.0 * (model - local) + 0.001 * model)
        local = local - 2.0 * 0.1 * (local - model.detach())
    torch.testing.assert_close(state[THETA], model.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(trainer.read()[W], local, rtol=0, atol=1e-6)
