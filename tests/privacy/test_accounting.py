"""The accountant against ε derived independently: the Gaussian mechanism's RDP in closed form, the sampled Gaussian
mechanism's RDP by its binomial expansion at integer orders, and the exact privacy curve of composed Gaussians."""

from __future__ import annotations

import math

import pytest
import torch

from fedhb.privacy.accounting import Accountant, adaptive_noise, epsilon, noise_for_epsilon


def rdp_to_eps(rdp: list[float], orders: list[float], delta: float) -> float:
    """Balle et al. (arXiv 1905.09982, Proposition 12): ``eps = rdp - (log delta + log a) / (a - 1) + log((a-1)/a)``,
    minimised over the orders."""
    return min(r - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a) for r, a in zip(rdp, orders))


def sampled_gaussian_rdp(q: float, sigma: float, order: int) -> float:
    """Mironov, Talwar and Zhang (arXiv 1908.10530, section 3.3) at an integer order ``a``:
    ``log(sum_k C(a, k) (1 - q)^(a - k) q^k exp((k^2 - k) / (2 sigma^2))) / (a - 1)``, summed in log space."""
    terms = [math.lgamma(order + 1) - math.lgamma(k + 1) - math.lgamma(order - k + 1)
             + (order - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma ** 2)
             for k in range(order + 1)]
    top = max(terms)
    return (top + math.log(sum(math.exp(t - top) for t in terms))) / (order - 1)


INTEGER_ORDERS = list(range(2, 257))


@pytest.mark.parametrize(("sigma", "steps"), [(1.0, 1), (2.0, 10), (0.8, 50)])
def test_without_sampling_eps_is_the_gaussian_mechanisms_closed_form(sigma, steps):
    orders = [1 + x / 10 for x in range(1, 100)] + list(range(12, 64)) + [64, 80, 96, 128, 192, 256, 384, 512, 1024]
    expected = rdp_to_eps([steps * a / (2 * sigma ** 2) for a in orders], orders, 1e-5)

    assert epsilon([(sigma, 1.0, steps)], 1e-5) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(("q", "sigma", "steps"), [(0.01, 1.1, 1000), (0.1, 1.5, 100), (0.25, 2.0, 40),
                                                  (0.02, 0.9, 500)])
def test_with_poisson_sampling_eps_matches_the_binomial_expansion(q, sigma, steps):
    independent = rdp_to_eps([steps * sampled_gaussian_rdp(q, sigma, a) for a in INTEGER_ORDERS], INTEGER_ORDERS,
                             1e-5)

    eps = epsilon([(sigma, q, steps)], 1e-5)

    # The accountant also searches fractional orders, so it may only be tighter, and by little.
    assert independent * 0.97 <= eps <= independent * (1 + 1e-9)


def exact_gaussian_eps(mu: float, delta: float) -> float:
    """Balle and Wang (arXiv 1805.06530, Theorem 8): a Gaussian mechanism of sensitivity/std ratio ``mu`` is
    (eps, delta)-DP with ``delta = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``; solved for eps by bisection."""
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        d = phi(-mid / mu + mu / 2) - math.exp(mid) * phi(-mid / mu - mu / 2)
        lo, hi = (mid, hi) if d > delta else (lo, mid)
    return hi


@pytest.mark.parametrize(("sigma", "steps"), [(2.0, 4), (5.0, 100)])
def test_the_prv_accountant_gives_the_exact_curve_of_composed_gaussians(sigma, steps):
    # T compositions of a Gaussian mechanism with multiplier sigma are one with sigma / sqrt(T).
    exact = exact_gaussian_eps(math.sqrt(steps) / sigma, 1e-5)

    prv = epsilon([(sigma, 1.0, steps)], 1e-5, "prv")
    rdp = epsilon([(sigma, 1.0, steps)], 1e-5, "rdp")

    assert prv == pytest.approx(exact, abs=0.05)
    assert rdp > exact  # RDP's conversion is an upper bound, looser than the exact curve


def test_no_release_costs_nothing_and_no_noise_costs_everything():
    assert epsilon([], 1e-5) == 0.0
    assert epsilon([(1.0, 0.5, 0)], 1e-5) == 0.0
    assert epsilon([(0.0, 0.5, 3)], 1e-5) == math.inf


def test_the_noise_for_a_target_spends_it_and_barely_less_noise_overspends():
    sigma = noise_for_epsilon(4.0, 1e-5, 0.1, 200)

    assert epsilon([(sigma, 0.1, 200)], 1e-5) <= 4.0
    assert epsilon([(sigma * 0.99, 0.1, 200)], 1e-5) > 4.0 * 0.99
    with pytest.raises(ValueError, match="--privacy.target_epsilon 1e-06: unreachable"):
        noise_for_epsilon(1e-6, 1e-12, 1.0, 10_000)


def test_the_ledger_merges_equal_steps_and_round_trips_through_its_state():
    acc = Accountant(1e-5)
    for _ in range(30):
        acc.step(1.2, 0.2)
    acc.step(2.0, 0.2, steps=5)

    again = Accountant(1e-5)
    again.load_state_dict(acc.state_dict())

    assert acc.history == [(1.2, 0.2, 30), (2.0, 0.2, 5)]
    assert again.history == acc.history and again.epsilon == acc.epsilon
    assert acc.epsilon == pytest.approx(epsilon([(1.2, 0.2, 30), (2.0, 0.2, 5)], 1e-5))
    assert acc.state_dict()["history"].dtype == torch.float64


def test_adaptive_clippings_two_noises_cost_what_the_total_costs():
    # Andrew et al.: noise z on the updates and std s on the count cost as one Gaussian with (z^-2 + (2s)^-2)^-1/2.
    z = adaptive_noise(1.0, 2.5)

    assert (z ** -2 + (2 * 2.5) ** -2) ** -0.5 == pytest.approx(1.0)
    assert z > 1.0
    with pytest.raises(ValueError, match="--privacy.adaptive_clip"):
        adaptive_noise(5.0, 2.5)
