"""FedBABU: hand-computed steps and server step, properties on a federation, and PFLlib's client re-derived."""

from __future__ import annotations

import pytest
import torch
from algo_testkit import t, toy_trainer

from fedhb.algorithms import FedBABU

W, BODY = "head.1.weight", "enc.q.lora_A.default.weight"
DELTA = "algo/fedbabu/delta/"


def _setup(algo, clients=3):
    algo.setup([BODY, W], {BODY: t(0.0), W: t(7.0)}, clients)
    return algo


def test_fedbabu_trains_the_body_under_the_frozen_head_then_fine_tunes():
    # Prepare: body 0, head 2, data mean 1, lr 0.5; one body epoch, one fine-tuning epoch of everything.
    algo = _setup(FedBABU(fine_tune_epochs=1))
    state = algo.init_client_state({BODY: t(0.0), W: t(2.0)}, 0)
    trainer, _ = toy_trainer({BODY: [0.0], W: [2.0]}, [1.0])

    # Execute
    algo.local_update(trainer, state)

    # Assert: body 0 -> 0.5, head frozen at 2 (what is kept and uploaded); fine-tuning then moves body 0.5 -> 0.75
    # and head 2 -> 1.5, kept as the delta (0.25, -0.5) that the personalized model adds.
    assert torch.equal(trainer.read()[BODY], t(0.5)) and torch.equal(trainer.read()[W], t(2.0))
    assert torch.equal(state[DELTA + BODY], t(0.25)) and torch.equal(state[DELTA + W], t(-0.5))
    personal = algo.personalized_model({**state, BODY: t(0.5), W: t(2.0)})
    assert torch.equal(personal[BODY], t(0.75)) and torch.equal(personal[W], t(1.5))
    assert algo.upload({**state, BODY: t(0.5), W: t(2.0)}) == {BODY: t(0.5)}


def test_fedbabu_head_only_fine_tuning_and_the_server_step():
    algo = _setup(FedBABU(fine_tune_epochs=2, fine_tune="head"))
    state = algo.init_client_state({BODY: t(0.0), W: t(2.0)}, 0)
    trainer, _ = toy_trainer({BODY: [0.0], W: [2.0]}, [1.0])
    algo.local_update(trainer, state)

    received = algo.aggregate({0: {BODY: t(1.0)}, 2: {BODY: t(4.0)}}, {0: 1, 2: 2})

    # Head 2 -> 1.5 -> 1.25 under head-only fine-tuning; the body's delta is 0. Bodies average 1/3 + 8/3 = 3; the
    # global model keeps the initial head 7.
    assert torch.equal(state[DELTA + W], t(-0.75)) and torch.equal(state[DELTA + BODY], t(0.0))
    assert received[0] == {BODY: t(3.0)} and algo.global_state() == {BODY: t(3.0), W: t(7.0)}
    with pytest.raises(ValueError, match="--algorithm.fine_tune must be all or head"):
        FedBABU(fine_tune="body")


def test_fedbabu_never_moves_a_clients_head_and_without_fine_tuning_scores_the_model(make_loop):
    loop = make_loop(FedBABU(fine_tune_epochs=0), clients=3)
    head0 = {k: v.clone() for k, v in loop.client_module.get_state().items() if k.startswith("head.")}

    for rnd in (1, 2):
        assert not loop.run_round(rnd).failed

    for state in loop.states.values():
        assert all(torch.equal(state[k], v) for k, v in head0.items())
        personal = loop.algorithm.personalized_model(state)
        assert all(torch.equal(personal[k], state[k]) for k in loop.model_names)
    glob = loop.algorithm.global_state()
    assert all(torch.equal(glob[k], v) for k, v in head0.items())


def test_fedbabu_is_pfllibs_client():
    """PFLlib (TsingZ0/PFLlib, commit d832e76f6a23b833038949ec1e4fdefe63a4d350) ``clients/clientbabu.py``: the head's
    ``requires_grad = False`` in ``__init__``, ``train`` (SGD over the loader), ``fine_tune(['base', 'head'])``
    (``fine_tuning_epochs`` of SGD on both), and ``servers/serverbabu.py::receive_models`` (``model.base`` only,
    weighted by training samples)."""
    data = [1.0, -2.0, 3.0, 0.5, 2.5]
    algo = _setup(FedBABU(fine_tune_epochs=2))
    state = algo.init_client_state({BODY: t(0.5, -1.0), W: t(2.0, 1.0)}, 0)
    trainer, _ = toy_trainer({BODY: [0.5, -1.0], W: [2.0, 1.0]}, data, lr=0.1, epochs=1, batch_size=2)

    algo.local_update(trainer, state)

    twin, _ = toy_trainer({W: [0.0]}, data, epochs=3, batch_size=2)
    order = [batch["x"] for _, batch in twin.batches(3)]
    base, head = torch.nn.Parameter(t(0.5, -1.0)), torch.nn.Parameter(t(2.0, 1.0))
    head.requires_grad = False
    optimizer = torch.optim.SGD([base], lr=0.1)
    for x in order[:3]:
        optimizer.zero_grad()
        sum(0.5 * (p[None, :] - x[:, None]).pow(2).sum(1).mean() for p in (base, head)).backward()
        optimizer.step()
    trained = base.detach().clone()
    head.requires_grad = True
    optimizer = torch.optim.SGD([base, head], lr=0.1)
    for x in order[3:]:
        optimizer.zero_grad()
        sum(0.5 * (p[None, :] - x[:, None]).pow(2).sum(1).mean() for p in (base, head)).backward()
        optimizer.step()
    torch.testing.assert_close(trainer.read()[BODY], trained, rtol=0, atol=1e-6)
    personal = algo.personalized_model({**state, **trainer.read()})
    torch.testing.assert_close(personal[BODY], base.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(personal[W], head.detach(), rtol=0, atol=1e-6)
