"""Each algorithm against a re-derivation of a named reference implementation, on the toy model whose loss is
``mean_b sum_name 0.5 ||p_name - x_b||^2`` (tests/algorithms/algo_testkit.py): the reference's training loop and
server step are written out here in its own terms (its optimizer class, its update lines) and run on the same batches.

References (repository, commit):

- PFLlib: TsingZ0/PFLlib d832e76f6a23b833038949ec1e4fdefe63a4d350 (``system/flcore/``).
- FedRepo: lxcnju/FedRepo 617ee015046409d95dbd76ba39eebb92d313ab94 (``algorithms/``).
- FedTorch: MLOPTPSU/FedTorch ab8068dbc96804a5c1a8b898fd115175cfebfe75 (the APFL authors' code).
- FedSA-LoRA: Pengxin-Guo/FedSA-LoRA fc276b5ead4208c75fb0b2dd16923f307afb3acd (FederatedScope-based).
- FederatedLLM: ATP-1010/FederatedLLM 7bea158 (FLoRA's code, ``fed_utils/model_aggregation.py``).
- FHBench: wph6/FHBench 0df1989acac53ae374d380f9b13466828421021d (``ViT_Lora/core/comm.py``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from algo_testkit import t, toy_trainer

from fedhb.algorithms import (
    APFL,
    EPFL,
    MOON,
    SCAFFOLD,
    Ditto,
    FedNova,
    FedPer,
    FedProx,
    FedRep,
    FedSALoRA,
    FFALoRA,
    FLoRA,
    Local,
)
from fedhb.algorithms._ops import fednova_norm
from fedhb.config import OptimArgs

W, BODY = "head.1.weight", "enc.q.lora_A.default.weight"
A, B = "enc.q.lora_A.default.weight", "enc.q.lora_B.default.weight"
A2, B2 = "enc.v.lora_A.default.weight", "enc.v.lora_B.default.weight"
DATA = [1.0, -2.0, 3.0, 0.5, 2.5, -1.0, 4.0]


def _order(data, epochs, batch_size):
    """The batches (as data tensors) the trainer of toy_trainer(..., seed 0) visits."""
    twin, _ = toy_trainer({W: [0.0]}, data, epochs=epochs, batch_size=batch_size)
    return [batch["x"] for _, batch in twin.batches(epochs)]


def _toy_loss(params, x):
    return sum(0.5 * (p[None, :] - x[:, None]).pow(2).sum(1).mean() for p in params)


def _setup(algo, names, clients=3, initial=None):
    algo.setup(list(names), initial or {n: torch.zeros(2) for n in names}, clients)
    return algo


def test_local_is_pfllibs_plain_local_training():
    """PFLlib ``clients/clientavg.py::train`` (SGD over the loader: zero_grad, backward, step), which
    ``servers/serverlocal.py`` runs with no aggregation."""
    trainer, _ = toy_trainer({W: [0.5, -1.0], BODY: [2.0, 0.0]}, DATA, lr=0.1, epochs=2, batch_size=3)
    algo = _setup(Local(), [W, BODY])

    algo.local_update(trainer, {})

    params = [torch.nn.Parameter(t(0.5, -1.0)), torch.nn.Parameter(t(2.0, 0.0))]
    optimizer = torch.optim.SGD(params, lr=0.1)
    for x in _order(DATA, 2, 3):
        optimizer.zero_grad()
        _toy_loss(params, x).backward()
        optimizer.step()
    assert torch.equal(trainer.read()[W], params[0].detach()) and torch.equal(trainer.read()[BODY], params[1].detach())
    assert algo.upload({W: t(1.0)}) == {} and algo.aggregate({0: {}}, {0: 1}) == {}


def test_fedprox_is_pfllibs_perturbed_gradient_descent():
    """PFLlib ``clients/clientprox.py::train`` with ``optimizers/fedoptimizer.py::PerturbedGradientDescent``:
    ``p -= lr (grad + mu (p - p_global))``, ``p_global`` the received model."""
    trainer, _ = toy_trainer({W: [0.5, -1.0]}, DATA, lr=0.1, epochs=2, batch_size=3)

    _setup(FedProx(mu=0.7), [W]).local_update(trainer, {})

    p, g = t(0.5, -1.0), t(0.5, -1.0)
    for x in _order(DATA, 2, 3):
        p = p - 0.1 * ((p - x.mean()) + 0.7 * (p - g))
    torch.testing.assert_close(trainer.read()[W], p, rtol=0, atol=1e-6)


def test_scaffold_is_pfllibs_client_and_server():
    """PFLlib ``clients/clientscaffold.py`` (``SCAFFOLDOptimizer``: ``p -= lr (grad + c - c_i)``; ``update_yc``:
    ``c_i <- c_i - c + (x - y) / (K lr)``; ``delta_yc``) and ``servers/serverscaffold.py::aggregate_parameters``
    (``x += dy / num_join_clients * server_lr``, ``c += dc / num_clients``)."""
    # Prepare: 4 clients in the federation, clients 0 and 2 train from x = (0.5, -1) with c = (0.1, -0.2).
    x, c = t(0.5, -1.0), t(0.1, -0.2)
    c_i = {0: t(0.3, 0.0), 2: t(-0.1, 0.4)}
    data = {0: DATA, 2: [2.0, 2.0, -3.0, 1.0]}
    algo = _setup(SCAFFOLD(server_lr=0.8), [W], clients=4, initial={W: x.clone()})
    algo._c = {W: c.clone()}
    uploads = {}
    for cid in (0, 2):
        state = algo.init_client_state({W: x.clone()}, cid)
        state["algo/scaffold/c/" + W], state["algo/scaffold/c_i/" + W] = c.clone(), c_i[cid].clone()
        trainer, _ = toy_trainer({W: x.tolist()}, data[cid], lr=0.1, epochs=2, batch_size=3)
        algo.local_update(trainer, state)
        uploads[cid] = algo.upload({**state, W: trainer.read()[W]})

    # Execute
    received = algo.aggregate(uploads, {0: 7, 2: 4})

    # Assert: the reference, client by client, then its server step.
    new_x, new_c = x.clone(), c.clone()
    for cid in (0, 2):
        y = x.clone()
        batches = _order(data[cid], 2, 3)
        for xb in batches:
            y = y - 0.1 * ((y - xb.mean()) + c - c_i[cid])
        new_ci = c_i[cid] - c + 1 / len(batches) * 1 / 0.1 * (x - y)  # 1 / num_batches / epochs / lr, K = batches
        dy, dc = y - x, new_ci - c_i[cid]
        torch.testing.assert_close(uploads[cid][W], y, rtol=0, atol=1e-6)
        new_x += dy / 2 * 0.8
        new_c += dc / 4
    torch.testing.assert_close(received[0][W], new_x, rtol=0, atol=1e-6)
    torch.testing.assert_close(received[2]["algo/scaffold/c/" + W], new_c, rtol=0, atol=1e-6)


def test_fednova_is_fedrepos_normalized_averaging():
    """FedRepo ``algorithms/fednova.py``: ``NovaOptimizer`` counts ``local_counter = local_counter * momentum + 1``,
    ``local_normalizing_vec += local_counter`` per step; ``get_local_grad_`` sends ``ratio (x - y) / a``;
    ``update_global`` sets ``x -= sum_k (ratio_k a_k) * sum_k local_grad_k`` (``gmf = 0``)."""
    # Prepare: clients with 3, 5 and 2 SGD-momentum (0.5) steps, sample ratios 0.2, 0.5, 0.3.
    steps, ratios = {0: 3, 1: 5, 2: 2}, {0: 2, 1: 5, 2: 3}
    ys = {0: t(1.0, -2.0), 1: t(-0.5, 0.25), 2: t(3.0, 1.0)}
    x = t(0.2, 0.4)
    algo = _setup(FedNova(), [W], initial={W: x.clone()})
    uploads = {c: {W: ys[c], "algo/fednova/tau": torch.tensor(fednova_norm(steps[c], 0.5), dtype=torch.float64)}
               for c in ys}

    received = algo.aggregate(uploads, ratios)

    expected_tau, grads = 0.0, []
    for c in ys:
        counter, vec = 0.0, 0.0
        for _ in range(steps[c]):
            counter = counter * 0.5 + 1
            vec += counter
        ratio = ratios[c] / 10
        grads.append(ratio * (x - ys[c]) / vec)
        expected_tau += vec * ratio
    torch.testing.assert_close(received[0][W], x - expected_tau * sum(grads), rtol=0, atol=1e-6)


def test_moon_is_pfllibs_contrastive_loss():
    """PFLlib ``clients/clientmoon.py::train``: ``loss += mu * mean(-log(exp(cos(rep, rep_g) / tau) /
    (exp(cos(rep, rep_g) / tau) + exp(cos(rep, rep_old) / tau))))`` with ``rep_g`` and ``rep_old`` from the global and
    the previous model (fixed during the round); plain SGD."""
    data = [1.0, 2.0, -1.5, 0.5, 3.0]
    algo = _setup(MOON(mu=0.8, temperature=0.5), [W])
    state = algo.init_client_state({W: t(1.0, 0.5)}, 0)
    state["algo/moon/prev/" + W] = t(-0.5, 2.0)
    trainer, _ = toy_trainer({W: [1.0, 0.5]}, data, lr=0.1, epochs=2, batch_size=2)

    algo.local_update(trainer, state)

    p = torch.nn.Parameter(t(1.0, 0.5))
    glob, old = t(1.0, 0.5), t(-0.5, 2.0)
    optimizer = torch.optim.SGD([p], lr=0.1)
    for x in _order(data, 2, 2):
        rep, rep_g, rep_old = x[:, None] * p[None, :], x[:, None] * glob[None, :], x[:, None] * old[None, :]
        pos = torch.exp(torch.nn.functional.cosine_similarity(rep, rep_g) / 0.5)
        neg = torch.exp(torch.nn.functional.cosine_similarity(rep, rep_old) / 0.5)
        loss = _toy_loss([p], x) + 0.8 * torch.mean(-torch.log(pos / (pos + neg)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.testing.assert_close(trainer.read()[W], p.detach(), rtol=0, atol=1e-6)


def test_apfl_is_fedtorchs_personal_step_at_fixed_alpha():
    """FedTorch ``fedtorch/comms/trainings/federated/apfl.py`` (the authors' code): every batch ``w`` takes an SGD
    step on its loss and ``v`` one on the loss of ``inference_personal`` (``eval.py``: the output mix
    ``alpha v(x) + (1 - alpha) w(x)``; the toy's output is its parameter, so the mix is parameter-wise), both at
    ``lr``; ``alpha`` fixed (``fed_adaptive_alpha`` off). The personal forward uses ``w`` before its step, as the
    paper's Algorithm 1 (FedTorch's uses it after)."""
    data = [1.0, 2.0, -1.5, 0.5, 3.0]
    algo = _setup(APFL(alpha=0.3, adapt_alpha=False), [W])
    state = algo.init_client_state({W: t(0.0, 1.0)}, 0)
    state["algo/apfl/v/" + W] = t(2.0, -1.0)
    trainer, _ = toy_trainer({W: [0.0, 1.0]}, data, lr=0.1, epochs=2, batch_size=2)

    algo.local_update(trainer, state)

    w, v = torch.nn.Parameter(t(0.0, 1.0)), torch.nn.Parameter(t(2.0, -1.0))
    opt_w, opt_v = torch.optim.SGD([w], lr=0.1), torch.optim.SGD([v], lr=0.1)
    for x in _order(data, 2, 2):
        opt_v.zero_grad()
        _toy_loss([0.3 * v + 0.7 * w.detach()], x).backward()
        opt_w.zero_grad()
        _toy_loss([w], x).backward()
        opt_w.step()
        opt_v.step()
    torch.testing.assert_close(trainer.read()[W], w.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(state["algo/apfl/v/" + W], v.detach(), rtol=0, atol=1e-6)


def test_ditto_is_pfllibs_ptrain_and_train():
    """PFLlib ``clients/clientditto.py``: ``ptrain`` (the personal model with ``PerturbedGradientDescent``, mu =
    lam, pulled toward the received global model) and ``train`` (plain SGD on the global copy)."""
    data = [1.0, 2.0, -1.5, 0.5, 3.0]
    algo = _setup(Ditto(lam=0.6), [W])
    state = algo.init_client_state({W: t(0.0, 1.0)}, 0)
    state["algo/ditto/v/" + W] = t(2.0, -1.0)
    trainer, _ = toy_trainer({W: [0.0, 1.0]}, data, lr=0.1, epochs=1, batch_size=2)

    algo.local_update(trainer, state)

    order = _order(data, 2, 2)  # the global epoch first, then the personal one (fedhb's order)
    w, v, g = t(0.0, 1.0), t(2.0, -1.0), t(0.0, 1.0)
    for x in order[:3]:
        w = w - 0.1 * (w - x.mean())
    for x in order[3:]:
        v = v - 0.1 * ((v - x.mean()) + 0.6 * (v - g))
    torch.testing.assert_close(trainer.read()[W], w, rtol=0, atol=1e-6)
    torch.testing.assert_close(state["algo/ditto/v/" + W], v, rtol=0, atol=1e-6)


def test_fedper_and_fedrep_are_pfllibs():
    """PFLlib ``clients/clientper.py::train`` (every tensor, plain SGD) and ``servers/serverper.py::receive_models``
    (only ``model.base`` uploaded, weighted by training samples); ``clients/clientrep.py::train`` (``plocal_epochs``
    on the head with the base frozen, then the local epochs on the base with the head frozen)."""
    data = [1.0, 2.0, -1.5, 0.5, 3.0]
    per, _ = toy_trainer({BODY: [0.0, 1.0], W: [2.0, 0.0]}, data, lr=0.1, epochs=1, batch_size=2)
    rep, _ = toy_trainer({BODY: [0.0, 1.0], W: [2.0, 0.0]}, data, lr=0.1, epochs=1, batch_size=2)

    _setup(FedPer(), [BODY, W]).local_update(per, {})
    _setup(FedRep(head_epochs=2), [BODY, W]).local_update(rep, {})
    received = FedPer().aggregate({0: {BODY: t(1.0, 0.0)}, 1: {BODY: t(4.0, 3.0)}}, {0: 1, 1: 2})

    order = _order(data, 3, 2)
    body, head = t(0.0, 1.0), t(2.0, 0.0)
    for x in order[:3]:
        body, head = body - 0.1 * (body - x.mean()), head - 0.1 * (head - x.mean())
    torch.testing.assert_close(per.read()[BODY], body, rtol=0, atol=1e-6)
    torch.testing.assert_close(per.read()[W], head, rtol=0, atol=1e-6)
    body, head = t(0.0, 1.0), t(2.0, 0.0)
    for x in order[:6]:
        head = head - 0.1 * (head - x.mean())
    for x in order[6:]:
        body = body - 0.1 * (body - x.mean())
    torch.testing.assert_close(rep.read()[W], head, rtol=0, atol=1e-6)
    torch.testing.assert_close(rep.read()[BODY], body, rtol=0, atol=1e-6)
    torch.testing.assert_close(received[0][BODY], (1 * t(1.0, 0.0) + 2 * t(4.0, 3.0)) / 3, rtol=0, atol=1e-7)


def test_fedsa_lora_and_ffa_lora_are_fedsa_loras_code():
    """FedSA-LoRA ``federatedscope/glue/yamls/fedsa-lora.yaml`` (``personalization.local_param: ['lora_B',
    'classifier']``: B and head never leave the client) with ``core/aggregators/clients_avg_aggregator.py::
    _para_weighted_avg`` (sample-weighted); FFA-LoRA is the same code with ``federate.freeze_A`` (``glue/model/
    model_builder.py``: A not trained) and nothing local."""
    gen = torch.Generator().manual_seed(0)
    states = {c: {A: torch.randn(2, 3, generator=gen), B: torch.randn(3, 2, generator=gen),
                  W: torch.randn(2, generator=gen)} for c in range(3)}
    sizes = {0: 5, 1: 2, 2: 9}

    def para_weighted_avg(models, keys):
        total = sum(n for n, _ in models)
        return {k: sum(m[k] * (n / total) for n, m in models) for k in keys}

    sa = FedSALoRA().aggregate({c: FedSALoRA().upload(s) for c, s in states.items()}, sizes)
    ffa = FFALoRA().aggregate({c: FFALoRA().upload(s) for c, s in states.items()}, sizes)

    models = [(sizes[c], states[c]) for c in range(3)]
    for k, v in para_weighted_avg(models, [A]).items():
        torch.testing.assert_close(sa[0][k], v, rtol=0, atol=1e-6)
    for k, v in para_weighted_avg(models, [B, W]).items():
        torch.testing.assert_close(ffa[0][k], v, rtol=0, atol=1e-6)
    assert set(sa[0]) == {A} and set(ffa[0]) == {B, W}
    trainer, _ = toy_trainer({A: [1.0], B: [0.0], W: [0.0]}, [2.0])
    _setup(FFALoRA(), [A, B, W]).local_update(trainer, {})
    assert torch.equal(trainer.read()[A], t(1.0))  # freeze_A


def test_flora_is_federatedllms_stacking():
    """FederatedLLM ``fed_utils/model_aggregation.py::FedAvg`` with ``stacking=True``: A matrices stacked along the
    rank with each client's sample weight, B matrices stacked unweighted; the server's merged update
    ``B_stack @ A_stack`` at the stacked adapter's scaling (``lora_alpha * num_clients / (lora_r * num_clients)``,
    ``main.py``), equal ranks."""
    gen = torch.Generator().manual_seed(1)
    initial = {A: torch.randn(2, 4, generator=gen), B: torch.zeros(3, 2), W: torch.zeros(2)}
    uploads = {c: {A: torch.randn(2, 4, generator=gen), B: torch.randn(3, 2, generator=gen), W: torch.randn(2,
                   generator=gen)} for c in range(3)}
    sizes = {0: 5, 1: 2, 2: 9}
    algo = _setup(FLoRA(), [A, B, W], initial=initial)

    algo.aggregate(uploads, sizes)

    weights = torch.nn.functional.normalize(torch.tensor([5.0, 2.0, 9.0]), p=1, dim=0)
    stacked_a = torch.cat([uploads[c][A] * weights[c] for c in range(3)], dim=0)
    stacked_b = torch.cat([uploads[c][B] for c in range(3)], dim=1)
    torch.testing.assert_close(algo.merged_update("enc.q").float(), stacked_b @ stacked_a, rtol=0, atol=1e-6)


def test_epfl_is_fhbenchs_similarity_matrix_and_a_mixing():
    """FHBench ``ViT_Lora/core/comm.py``: ``cal_sim_mat`` (``1 / mean_layers ||B_i - B_j||``, rows normalised,
    times ``1 - model_momentum``, ``model_momentum`` on the diagonal; ``layers_part``) and the ``EPFL`` branch of
    ``global_aggregate`` (every client's A = ``sum_j weight_m[i, j] A_j``)."""
    gen = np.random.default_rng(0)
    n = 4
    uploads = {c: {k: torch.from_numpy(gen.standard_normal(shape).astype(np.float32)) for k, shape in
                   ((A, (2, 3)), (B, (3, 2)), (A2, (2, 3)), (B2, (3, 2)))} for c in range(n)}
    for layers_part, layers in (("all", [B, B2]), ("first_half", [B]), ("second_half", [B2])):
        received = EPFL(lam=0.3, layers=layers_part).aggregate(uploads, dict.fromkeys(range(n), 1))

        weight_m = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                if i != j:
                    l2 = [np.linalg.norm((uploads[i][k] - uploads[j][k]).float().numpy()) for k in layers]
                    weight_m[i, j] = 1 / np.mean(l2)
        weight_m = weight_m / np.sum(weight_m, axis=1)[:, np.newaxis] * (1 - 0.3)
        for i in range(n):
            weight_m[i, i] = 0.3
        for cl in range(n):
            for key in (A, A2):
                temp = sum(weight_m[cl, j] * uploads[j][key].double() for j in range(n))
                torch.testing.assert_close(received[cl][key].double(), temp, rtol=0, atol=1e-6)
    assert math.isclose(float(weight_m.sum(1)[0]), 1.0)


def test_scaffold_reference_agrees_with_the_trainer_under_plain_sgd_only():
    # The PFLlib control variate is option II's formula; fedhb keeps it exactly under plain SGD.
    optim = OptimArgs(name="sgd", lr=0.1, momentum=0.0, schedule="constant", min_lr=0.0)
    algo = _setup(SCAFFOLD(), [W], initial={W: t(0.0, 0.0)})
    state = algo.init_client_state({W: t(0.0, 0.0)}, 0)
    trainer, _ = toy_trainer({W: [0.0, 0.0]}, DATA, lr=0.1, epochs=1, batch_size=3, optim=optim)

    algo.local_update(trainer, state)

    steps = len(_order(DATA, 1, 3))
    expected = (t(0.0, 0.0) - trainer.read()[W]) / (steps * 0.1)
    torch.testing.assert_close(state["algo/scaffold/c_i/" + W], expected, rtol=0, atol=0)
