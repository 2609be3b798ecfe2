"""FedDyn: hand-computed server step, the paper's invariant on a federation, and the authors' code re-derived."""

from __future__ import annotations

import pytest
import torch
from algo_testkit import t, toy_trainer

from fedhb.algorithms import FedDyn

W = "head.1.weight"
LAM = "algo/feddyn/lambda/" + W


def _setup(algo, x0, clients=4):
    algo.setup([W], {W: x0}, clients)
    return algo


def test_feddyn_server_step_by_hand():
    # Prepare: 4 clients, alpha 0.5, theta = (1, 1); clients 0 and 2 upload (3, 1) and (1, -1).
    algo = _setup(FedDyn(alpha=0.5), t(1.0, 1.0))

    # Execute
    first = algo.aggregate({0: {W: t(3.0, 1.0)}, 2: {W: t(1.0, -1.0)}}, {0: 10, 2: 30})
    second = algo.aggregate({1: {W: first[0][W]}}, {1: 5})

    # Assert: h = 0 - 0.5 * ((2, 0) + (0, -2)) / 4 = (-0.25, 0.25); theta = mean (2, 0) - h / 0.5 = (2.5, -0.5)
    # (uniform: sample counts ignored). Round 2: one client returns theta unchanged, h stays, theta = (2.5, -0.5) +
    # (0.5, -0.5).
    assert torch.equal(first[0][W], t(2.5, -0.5)) and torch.equal(first[2][W], t(2.5, -0.5))
    torch.testing.assert_close(algo.state_dict()["h"][W], torch.tensor([-0.25, 0.25], dtype=torch.float64))
    assert torch.equal(second[1][W], t(3.0, -1.0))


def test_feddyn_local_step_by_hand():
    # Prepare: theta = 0 received, lambda = 1, data mean 2, alpha 0.5, lr 0.5, two full-batch steps.
    algo = _setup(FedDyn(alpha=0.5), t(0.0))
    state = algo.init_client_state({W: t(0.0)}, 0)
    state[LAM] = t(1.0)
    trainer, _ = toy_trainer({W: [0.0]}, [2.0], epochs=2)

    algo.local_update(trainer, state)

    # Gradient (w - 2) + 0.5 * (1 + (w - 0)): step 1 at 0: -1.5 -> w = 0.75; step 2: -1.25 + 0.875 = -0.375 ->
    # w = 0.9375. lambda <- 1 + (0.9375 - 0).
    assert torch.equal(trainer.read()[W], t(0.9375))
    assert torch.equal(state[LAM], t(1.9375))


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_feddyn_rejects_a_non_positive_alpha(bad):
    with pytest.raises(ValueError, match="--algorithm.alpha must be > 0"):
        FedDyn(alpha=bad)


def test_feddyn_server_h_is_minus_alpha_times_the_mean_client_lambda(make_loop):
    # The paper's invariant (its eq. (4) summed over clients): with every client's lambda_k = sum of its
    # theta_k - theta over its rounds, h = -alpha * (1 / N) sum_k lambda_k, whoever took part.
    loop = make_loop(FedDyn(alpha=0.1), clients=3)

    for rnd in (1, 2):
        assert not loop.run_round(rnd).failed

    h = loop.algorithm.state_dict()["h"]
    for k in loop.model_names:
        mean_lambda = torch.stack([s["algo/feddyn/lambda/" + k].double() for s in loop.states.values()]).mean(0)
        torch.testing.assert_close(h[k], -0.1 * mean_lambda, rtol=0, atol=1e-6)


def test_feddyn_is_the_authors_code():
    """alpemreacar/FedDyn (commit 48a19fac440ef079ce563da8e0c2896f8256fef9): ``utils_general.py::train_feddyn_mdl``
    (``SGD(weight_decay=alpha)`` on ``loss + alpha * sum(w * (-theta + local_grad_vector))``; its gradient clipping at
    norm 10 does not bind here) and ``utils_methods.py::train_FedDyn`` (``local_param_list += w - theta``;
    ``theta = mean(selected w) + mean(all local_param_list)``), equal sample shares so ``alpha_coef_adpt = alpha``."""
    alpha, lr, n_clients = 0.3, 0.1, 3
    data = {0: [1.0, -2.0, 3.0, 0.5], 1: [2.0, 2.0, -1.0], 2: [0.0, 4.0, -3.0, 1.0, 1.5]}
    algo = _setup(FedDyn(alpha=alpha), t(0.5, -0.5), clients=n_clients)
    states = {c: algo.init_client_state({W: t(0.5, -0.5)}, c) for c in data}
    local_param_list = {c: torch.zeros(2) for c in data}
    cld = t(0.5, -0.5)
    for selected in ([0, 1, 2], [0, 2]):
        uploads = {}
        for c in selected:
            trainer, _ = toy_trainer({W: states[c][W].tolist()}, data[c], lr=lr, epochs=2, batch_size=2)
            algo.local_update(trainer, states[c])
            uploads[c] = {W: trainer.read()[W]}
            twin, _ = toy_trainer({W: [0.0]}, data[c], epochs=2, batch_size=2)
            # The reference's client c.
            model = torch.nn.Parameter(cld.clone())
            optimizer = torch.optim.SGD([model], lr=lr, weight_decay=alpha)
            for _, batch in twin.batches(2):
                x = batch["x"]
                loss = 0.5 * (model[None, :] - x[:, None]).pow(2).sum(1).mean()
                loss = loss + alpha * torch.sum(model * (-cld + local_param_list[c]))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            local_param_list[c] = local_param_list[c] + model.detach() - cld
            torch.testing.assert_close(uploads[c][W], model.detach(), rtol=0, atol=1e-6)
            torch.testing.assert_close(states[c][LAM], local_param_list[c], rtol=0, atol=1e-6)
        received = algo.aggregate(uploads, dict.fromkeys(uploads, 1))
        for c in selected:
            states[c][W] = received[c][W]
        cld = torch.stack([uploads[c][W] for c in selected]).mean(0) + torch.stack(list(local_param_list.values()))\
            .mean(0)
        torch.testing.assert_close(received[selected[0]][W], cld, rtol=0, atol=1e-6)
        for c in data:
            states[c][W] = cld.clone()  # the reference's clients all start from the cloud model
