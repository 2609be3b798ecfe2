"""Flower's strategy tests, ported: FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad (and the robust aggregations of
FedAvg's server step) against Flower's expected arrays or a line-by-line re-derivation of Flower's update.

Reference: adap/flower at commit fdef7afb1dca3030553be302366cfd285ed6632c, ``framework/py/flwr/server/strategy/`` and
``framework/py/flwr/serverapp/strategy/``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedhb.algorithms import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi

W, W2 = "head.1.weight", "head.1.bias"


def _setup(algo, initial):
    algo.setup(list(initial), {k: torch.as_tensor(v) for k, v in initial.items()}, 4)
    return algo


def _uploads(*clients):
    """``{client: {name: tensor}}`` from ``(arrays, num_examples)`` pairs, as Flower's mock replies."""
    return ({c: {k: torch.as_tensor(v) for k, v in arrays.items()} for c, (arrays, _) in enumerate(clients)},
            {c: n for c, (_, n) in enumerate(clients)})


# -- FedAvg: flwr/server/strategy/aggregate.py aggregate() --------------------------------------------------------
def test_fedavg_is_flowers_weighted_average():
    """Re-derives ``aggregate()`` of ``framework/py/flwr/server/strategy/aggregate.py`` (commit fdef7afb):
    ``reduce(np.add, [layer * n_k]) / sum n_k``."""
    gen = np.random.default_rng(0)
    results = [({W: gen.standard_normal((3, 2)).astype(np.float32), W2: gen.standard_normal(2).astype(np.float32)},
                n) for n in (5, 2, 9)]
    uploads, samples = _uploads(*results)

    received = FedAvg().aggregate(uploads, samples)

    total = sum(n for _, n in results)
    for k in (W, W2):
        expected = sum(arrays[k] * n for arrays, n in results) / total
        np.testing.assert_allclose(received[0][k].numpy(), expected, rtol=1e-6)


# -- FedAvgM: serverapp/strategy/fedavgm_test.py ----------------------------------------------------------------------
def _fedavgm_case():
    weights0 = {W: np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32), W2: np.array([7, 8, 9, 10], dtype=np.float32)}
    weights1 = {W: np.array([[29, 23, 19], [17, 13, 11]], dtype=np.float32),
                W2: np.array([7, 5, 3, 2], dtype=np.float32)}
    expected = {k: (weights0[k] * 1 + weights1[k] * 2) / 3 for k in (W, W2)}
    initial = {W: np.zeros((2, 3), dtype=np.float32), W2: np.zeros(4, dtype=np.float32)}
    return _uploads((weights0, 1), (weights1, 2)), expected, initial


def test_fedavgm_near_one_server_lr_and_no_momentum():
    """Flower's ``test_aggregate_fit_using_near_one_server_lr_and_no_momentum`` (serverapp/strategy/fedavgm_test.py,
    commit fdef7afb)."""
    (uploads, samples), expected, initial = _fedavgm_case()
    algo = _setup(FedAvgM(momentum=0.0, server_lr=1.0 + 1e-9), initial)

    received = algo.aggregate(uploads, samples)

    for k in (W, W2):
        np.testing.assert_almost_equal(received[0][k].numpy(), expected[k], decimal=5)


def test_fedavgm_server_learning_rate_and_momentum_two_rounds():
    """Flower's ``test_aggregate_fit_server_learning_rate_and_momentum`` (fedavgm_test.py, commit fdef7afb): the
    same replies twice, momentum 1e-9."""
    (uploads, samples), expected, initial = _fedavgm_case()
    algo = _setup(FedAvgM(momentum=1e-9, server_lr=1.0 + 1e-9), initial)

    algo.aggregate(uploads, samples)
    received = algo.aggregate(uploads, samples)

    for k in (W, W2):
        np.testing.assert_almost_equal(received[0][k].numpy(), expected[k], decimal=5)


def test_fedavgm_scalar_weights():
    """Flower's ``test_aggregate_fit_with_scalar_weights`` (fedavgm_test.py, commit fdef7afb)."""
    algo = _setup(FedAvgM(momentum=0.0, server_lr=1.0 + 1e-9), {W: np.array(0.0, dtype=np.float32)})
    uploads, samples = _uploads(({W: np.array(1.0, dtype=np.float32)}, 1), ({W: np.array(3.0, dtype=np.float32)}, 2))

    received = algo.aggregate(uploads, samples)

    assert received[0][W].shape == ()
    np.testing.assert_allclose(received[0][W].numpy(), np.array(7.0 / 3.0), rtol=1e-6)


# -- FedOpt: server/strategy/fedadagrad_test.py and serverapp/strategy/fedopt_test.py ---------------------------------
def test_fedadagrad_flower_variant_gives_flowers_expected_array():
    """Flower's ``fedadagrad_test.py::test_aggregate_fit`` (framework/py/flwr/server/strategy, commit fdef7afb):
    eta 0.1, tau 0.5, x = 0.1, clients at 0.2 and 1.0 with 5 examples each: exactly 0.15."""
    initial = {W: np.array([0.1, 0.1, 0.1, 0.1], dtype=np.float32)}
    uploads, samples = _uploads(({W: np.array([0.2] * 4, dtype=np.float32)}, 5),
                                ({W: np.array([1.0] * 4, dtype=np.float32)}, 5))
    expected = np.array([0.15, 0.15, 0.15, 0.15], dtype=np.float32)

    flower = _setup(FedAdagrad(server_lr=0.1, tau=0.5, variant="flower"), initial).aggregate(uploads, samples)
    paper = _setup(FedAdagrad(server_lr=0.1, tau=0.5, beta1=0.0), initial).aggregate(uploads, samples)
    default_beta1 = _setup(FedAdagrad(server_lr=0.1, tau=0.5), initial).aggregate(uploads, samples)

    assert (flower[0][W].numpy() == expected).all()
    # Issue #18, defect 3: the paper's v_0 = tau^2 gives 0.1 + 0.1 * 0.5 / (sqrt(0.5) + 0.5) = 0.1414 at beta1 = 0,
    # and 0.1 + 0.1 * 0.05 / (sqrt(0.5) + 0.5) = 0.1041 at beta1 = 0.9 (Flower's FedAdagrad forces beta1 = 0).
    np.testing.assert_allclose(paper[0][W].numpy(), 0.1 + 0.05 / (np.sqrt(0.5) + 0.5), rtol=1e-6)
    np.testing.assert_allclose(default_beta1[0][W].numpy(), 0.1 + 0.005 / (np.sqrt(0.5) + 0.5), rtol=1e-6)


def _flower_fedopt(rule, x, rounds, eta, beta_1, beta_2, tau):
    """Flower's ``aggregate_fit`` of FedAdam / FedYogi / FedAdagrad (framework/py/flwr/server/strategy/fedadam.py,
    fedyogi.py, fedadagrad.py, commit fdef7afb), line by line, over ``rounds``: ``[(aggregated, server_round)]``."""
    m_t = v_t = None
    current = x
    for aggregated, server_round in rounds:
        delta_t = aggregated - current
        m_t = np.zeros_like(delta_t) if m_t is None else m_t
        m_t = np.multiply(beta_1, m_t) + (1 - beta_1) * delta_t
        v_t = np.zeros_like(delta_t) if v_t is None else v_t
        if rule == "adam":
            v_t = beta_2 * v_t + (1 - beta_2) * np.multiply(delta_t, delta_t)
            eta_norm = eta * np.sqrt(1 - np.power(beta_2, server_round + 1.0)) / (1 - np.power(beta_1,
                                                                                              server_round + 1.0))
            current = current + eta_norm * m_t / (np.sqrt(v_t) + tau)
        elif rule == "yogi":
            v_t = v_t - (1.0 - beta_2) * np.multiply(delta_t, delta_t) * np.sign(v_t - np.multiply(delta_t, delta_t))
            current = current + eta * m_t / (np.sqrt(v_t) + tau)
        else:
            v_t = v_t + np.multiply(delta_t, delta_t)
            current = current + eta * m_t / (np.sqrt(v_t) + tau)
    return current


@pytest.mark.parametrize(("cls", "rule", "eta", "beta_1", "beta_2"), [
    # Flower's serverapp defaults for each strategy; FedAdagrad passes beta_1 = beta_2 = 0 to FedOpt.
    (FedAdam, "adam", 0.1, 0.9, 0.99), (FedYogi, "yogi", 1e-2, 0.9, 0.99), (FedAdagrad, "adagrad", 0.1, 0.0, 0.0),
])
def test_flower_variant_reproduces_flowers_fedopt_over_three_rounds(cls, rule, eta, beta_1, beta_2):
    """Flower's ``test_fedopt_strategies_aggregate_scalar_arrays`` (serverapp/strategy/fedopt_test.py, commit
    fdef7afb: x = 0, replies 1.0 with 1 example and 3.0 with 2) extended to three rounds and a 3-vector, against the
    re-derivation of Flower's update above."""
    x0 = np.array([0.0, 0.5, -1.0])
    replies = [[(np.array([1.0, 0.0, 2.0]), 1), (np.array([3.0, 1.0, -4.0]), 2)],
               [(np.array([2.0, 0.5, 1.0]), 3), (np.array([-1.0, 2.0, 0.0]), 1)],
               [(np.array([0.5, 0.5, 0.5]), 1), (np.array([1.5, -0.5, 2.5]), 1)]]
    algo = _setup(cls(server_lr=eta, beta1=0.9 if rule == "adagrad" else beta_1, beta2=beta_2 or 0.5, tau=1e-3,
                      variant="flower"), {W: x0})

    got = [algo.aggregate(*_uploads(*[({W: v}, n) for v, n in r]))[0][W].numpy() for r in replies]

    averaged = [sum(v * n for v, n in r) / sum(n for _, n in r) for r in replies]
    for t in range(1, 4):
        expected = _flower_fedopt(rule, x0, [(a, s) for a, s in zip(averaged[:t], range(1, t + 1))], eta, beta_1,
                                  beta_2, 1e-3)
        np.testing.assert_allclose(got[t - 1], expected, rtol=1e-12, atol=1e-15)
    assert algo.hparams()["variant"] == "flower"


def test_fedopt_variant_is_checked():
    with pytest.raises(ValueError, match="--algorithm.variant must be paper or flower"):
        FedAdam(variant="fedlab")


# -- robust aggregation: serverapp/strategy/fedmedian_test.py, fedtrimmedavg_test.py, multikrum_test.py ----------------
def test_median_is_flowers_fedmedian():
    """Flower's ``fedmedian_test.py::test_aggregate_fit`` and ``test_aggregate_fit_with_scalar_weights`` (serverapp,
    commit fdef7afb)."""
    uploads, samples = _uploads(({W: np.array([1.0, 0.2, 0.5, 1.0])}, 5), ({W: np.array([0.2, 0.5, 1.0, 0.2])}, 2),
                                ({W: np.array([0.5, 1.0, 0.2, 0.5])}, 9))
    scalars, ones = _uploads(({W: np.array(1.0)}, 1), ({W: np.array(3.0)}, 1), ({W: np.array(2.0)}, 1))

    received = FedAvg(aggregation="median").aggregate(uploads, samples)
    scalar = FedAvg(aggregation="median").aggregate(scalars, ones)

    np.testing.assert_equal(received[0][W].numpy(), np.array([0.5, 0.5, 0.5, 0.5]))
    assert scalar[0][W].shape == () and float(scalar[0][W]) == 2.0
    even, counts = _uploads(*[({W: np.array([v])}, 1) for v in (1.0, 4.0, 2.0, 8.0)])
    assert float(FedAvg(aggregation="median").aggregate(even, counts)[0][W]) == 3.0  # numpy's median: mean of 2, 4


def test_trimmed_mean_is_flowers_fedtrimmedavg():
    """Flower's ``fedtrimmedavg_test.py::test_aggregate_fit`` and ``test_aggregate_fit_with_scalar_weights``
    (serverapp, commit fdef7afb), ``beta = 0.25``."""
    uploads, samples = _uploads(({W: np.array([0.5, 0.5, 0.5, 0.5])}, 1), ({W: np.array([1.0, 0.2, 0.5, 1.0])}, 5),
                                ({W: np.array([0.2, 0.5, 1.0, 0.2])}, 2), ({W: np.array([0.5, 1.0, 0.2, 0.5])}, 9))
    scalars, ones = _uploads(*[({W: np.array(v)}, 1) for v in (0.5, 1.0, 2.0, 100.0)])

    received = FedAvg(aggregation="trimmed_mean", trim=0.25).aggregate(uploads, samples)
    scalar = FedAvg(aggregation="trimmed_mean", trim=0.25).aggregate(scalars, ones)

    np.testing.assert_equal(received[0][W].numpy(), np.array([0.5, 0.5, 0.5, 0.5]))
    assert scalar[0][W].shape == () and float(scalar[0][W]) == 1.5


def test_krum_and_multikrum_are_flowers():
    """Flower's ``multikrum_test.py::test_aggregate_train_krum`` and ``test_aggregate_train_multikrum`` (serverapp,
    commit fdef7afb), ``num_malicious_nodes = 1``; Multi-Krum keeps 2."""
    krum_up, samples = _uploads(*[({W: np.array([v] * 4, dtype=np.float32)}, 5) for v in (0.2, 0.7, 1.0)])
    multi_up, _ = _uploads(*[({W: np.array([v] * 4, dtype=np.float32)}, 5) for v in (0.2, 0.5, 1.0)])

    krum = FedAvg(aggregation="krum", num_malicious=1).aggregate(krum_up, samples)
    multi = FedAvg(aggregation="krum", num_malicious=1, krum_keep=2).aggregate(multi_up, samples)

    np.testing.assert_equal(krum[0][W].numpy(), np.array([0.7] * 4, dtype=np.float32))
    np.testing.assert_allclose(multi[0][W].numpy(), np.array([0.35] * 4, dtype=np.float32), rtol=1e-6)


@pytest.mark.parametrize("aggregation", ["median", "trimmed_mean", "krum"])
def test_one_poisoned_hospital_of_ten_moves_a_robust_aggregate_less_than_the_mean(aggregation):
    # Prepare: nine honest uploads near 1 (noise 0.1) and one poisoned upload at -50, each client with 10 samples.
    gen = torch.Generator().manual_seed(0)
    honest = {c: {W: 1 + 0.1 * torch.randn(6, 4, generator=gen)} for c in range(9)}
    poisoned = {**honest, 9: {W: torch.full((6, 4), -50.0)}}
    samples = dict.fromkeys(range(10), 10)
    clean = FedAvg().aggregate(honest, dict.fromkeys(range(9), 10))[0][W]

    # Execute
    mean = FedAvg().aggregate(poisoned, samples)[0][W]
    robust = FedAvg(aggregation=aggregation, trim=0.1).aggregate(poisoned, samples)[0][W]

    # Assert: the mean moves by 5.1 per entry; the robust steps stay within the honest clients' spread.
    shift_mean, shift_robust = float((mean - clean).abs().max()), float((robust - clean).abs().max())
    assert shift_mean == pytest.approx(5.1, abs=0.05)
    assert shift_robust < 0.25 and shift_robust < shift_mean / 20
