"""Per-FedAvg: a hand-computed step, a property, and PFLlib's client re-derived."""

from __future__ import annotations

import torch
from algo_testkit import t, toy_trainer

from fedhb.algorithms import FedAvg, PerFedAvg

W = "head.1.weight"
DELTA = "algo/perfedavg/delta/" + W


def _setup(algo):
    algo.setup([W], {W: t(0.0)}, 3)
    return algo


def test_perfedavg_meta_step_by_hand():
    # Prepare: w = 0, four samples in batches of 2 ([a, b], [c, d] in the seeded order), alpha 0.5, beta 0.25.
    algo = _setup(PerFedAvg(alpha=0.5, beta=0.25))
    state = algo.init_client_state({W: t(0.0)}, 0)
    data = [2.0, 2.0, 4.0, 4.0]
    trainer, _ = toy_trainer({W: [0.0]}, data, batch_size=2)
    twin, _ = toy_trainer({W: [0.0]}, data, batch_size=2)
    (d1, d2), fresh = [b["x"].mean() for _, b in twin.batches(1)], next(twin.batches(1))[1]["x"].mean()

    # Execute
    algo.local_update(trainer, state)

    # Assert: w' = 0 - 0.5 (0 - m1) = m1 / 2; w = 0 - 0.25 (w' - m2); then delta = -0.5 (w - m_fresh).
    w = -0.25 * (d1 / 2 - d2)
    torch.testing.assert_close(trainer.read()[W], w.reshape(1), rtol=0, atol=1e-7)
    torch.testing.assert_close(state[DELTA], (-0.5 * (w - fresh)).reshape(1), rtol=0, atol=1e-7)
    assert trainer.steps == 1  # one meta-step, reported with the loss of its first batch
    torch.testing.assert_close(algo.personalized_model({**state, W: t(1.0)})[W], t(1.0) + state[DELTA])


def test_perfedavg_server_is_fedavg_and_an_odd_batch_is_halved():
    uploads = {0: {W: t(1.0, 2.0)}, 1: {W: t(4.0, 8.0)}}
    expected = FedAvg().aggregate(uploads, {0: 1, 1: 3})[1][W]
    assert torch.equal(PerFedAvg().aggregate(uploads, {0: 1, 1: 3})[1][W], expected)
    algo = _setup(PerFedAvg(alpha=0.5, beta=0.5))
    state = algo.init_client_state({W: t(0.0)}, 0)
    trainer, _ = toy_trainer({W: [0.0]}, [1.0, 3.0], batch_size=2)  # one batch: halves [x1], [x2]

    algo.local_update(trainer, state)

    twin, _ = toy_trainer({W: [0.0]}, [1.0, 3.0], batch_size=2)
    x = next(twin.batches(1))[1]["x"]
    w = -0.5 * (0.5 * x[0] - x[1])
    torch.testing.assert_close(trainer.read()[W], w.reshape(1), rtol=0, atol=1e-7)


def test_perfedavg_is_pfllibs_client():
    """PFLlib (TsingZ0/PFLlib, commit d832e76f6a23b833038949ec1e4fdefe63a4d350) ``clients/clientperavg.py::train``:
    a loader of ``2 * batch_size``, halves ``X[:batch_size]`` and ``X[batch_size:]``; ``temp_model`` copy,
    ``PerAvgOptimizer.step()`` (lr) on the first half, gradient on the second, parameters restored from
    ``temp_model``, ``step(beta=beta)``; ``beta = learning_rate``; ``train_one_step`` before evaluation."""
    data = [1.0, -2.0, 3.0, 0.5, 2.5, -1.0, 4.0, 0.0]
    algo = _setup(PerFedAvg())
    state = algo.init_client_state({W: t(0.5, -1.0)}, 0)
    trainer, _ = toy_trainer({W: [0.5, -1.0]}, data, lr=0.1, epochs=2, batch_size=2)

    algo.local_update(trainer, state)

    twin, _ = toy_trainer({W: [0.0]}, data, epochs=3, batch_size=2)
    batches = [b["x"] for _, b in twin.batches(2)]
    loaders = [torch.cat(batches[i:i + 2]) for i in range(0, len(batches), 2)]  # the 2 * batch_size loader
    p = torch.nn.Parameter(t(0.5, -1.0))
    for X in loaders:
        temp_model = p.detach().clone()
        grad = torch.autograd.grad(0.5 * (p[None, :] - X[:2][:, None]).pow(2).sum(1).mean(), p)[0]
        with torch.no_grad():
            p -= 0.1 * grad
        grad = torch.autograd.grad(0.5 * (p[None, :] - X[2:][:, None]).pow(2).sum(1).mean(), p)[0]
        with torch.no_grad():
            p.copy_(temp_model)
            p -= 0.1 * grad
    torch.testing.assert_close(trainer.read()[W], p.detach(), rtol=0, atol=1e-6)
    one_step = p.detach() - 0.1 * (p.detach() - next(twin.batches(1))[1]["x"].mean())
    torch.testing.assert_close(algo.personalized_model({**state, **trainer.read()})[W], one_step, rtol=0, atol=1e-6)
