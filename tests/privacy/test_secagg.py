"""Secure aggregation: the unmasked sum is the plain sum within the quantisation error, a masked upload alone says
nothing about the true one, recovery survives the threshold's dropouts and stops loudly at one more; Shamir's
shares; and in a federation it is the plain algorithm within the quantisation error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedhb.algorithms import SCAFFOLD, FedAvg
from fedhb.config import FederationArgs, PrivacyArgs, SecureAggregationArgs
from fedhb.privacy import shamir
from fedhb.privacy.client_dp import ClientDP
from fedhb.privacy.secagg import (
    MASKED,
    ROUND,
    Protocol,
    SecureAggregation,
    dequantize,
    harary_neighbours,
    quantize,
    ring_bits,
    tolerated_dropouts,
)
from fedhb.privacy.stack import wrap_privacy

PARTICIPANTS = tuple(range(7))


def masked_round(protocol: Protocol, values: dict[int, torch.Tensor], rnd: int = 1) -> dict[int, torch.Tensor]:
    return {u: protocol.mask(rnd, PARTICIPANTS, u, v) for u, v in values.items()}


def test_fixed_point_keeps_every_coordinate_within_half_a_step():
    x = torch.linspace(-1.5, 1.5, 10_001, dtype=torch.float64)
    step = 0.5 / (2 ** 11 - 1)

    back = dequantize(quantize(x, 0.5, 12), 0.5, 12)

    inside = x.abs() <= 0.5
    assert float((back[inside] - x[inside]).abs().max()) <= step / 2 + 1e-15
    assert float(back[~inside].abs().max()) == pytest.approx(0.5)  # beyond the range: clamped, never wrapped


def test_the_unmasked_sum_is_the_plain_sum_within_the_quantisation_error():
    gen = torch.Generator().manual_seed(0)
    x = {u: torch.rand(5_000, generator=gen, dtype=torch.float64) * 2 - 1 for u in PARTICIPANTS}
    bits, weights = 14, {u: u + 1 for u in PARTICIPANTS}
    protocol = Protocol(seed=1, threshold=3, degree=0, ring=ring_bits(bits, sum(weights.values())))
    q = {u: quantize(x[u], 1.0, bits) * weights[u] for u in PARTICIPANTS}

    total = protocol.unmask(1, PARTICIPANTS, masked_round(protocol, q))

    assert torch.equal(total, sum(q.values()))  # the integers are exact
    plain = sum(weights[u] * x[u] for u in PARTICIPANTS)
    step = 1.0 / (2 ** (bits - 1) - 1)
    assert float((dequantize(total, 1.0, bits) - plain).abs().max()) <= sum(weights.values()) * step / 2


def test_a_masked_upload_alone_is_independent_of_the_true_one():
    protocol = Protocol(seed=2, threshold=3, degree=0, ring=30)
    n = 20_000
    true = torch.arange(n, dtype=torch.int64) % 1000  # a strongly structured vector
    masked = protocol.mask(1, PARTICIPANTS, 3, true)
    zeros = protocol.mask(1, PARTICIPANTS, 3, torch.zeros(n, dtype=torch.int64))

    r = np.corrcoef(true.numpy().astype(np.float64), masked.numpy().astype(np.float64))[0, 1]
    assert abs(r) < 4 / math.sqrt(n)
    # Uniform on the ring whatever the input: the top 4 bits fall evenly in 16 buckets (chi-square, 15 dof).
    for sample in (masked, zeros):
        counts = np.bincount((sample.numpy() >> 26).astype(np.int64), minlength=16)
        chi2 = float(((counts - n / 16) ** 2 / (n / 16)).sum())
        assert chi2 < 37.7  # the 0.999 quantile
    # Across rounds, one coordinate's masked value does not follow its true value either.
    rounds = range(1, 401)
    truth = np.array([(7 * r) % 1000 for r in rounds], dtype=np.float64)
    seen = np.array([float(protocol.mask(r, PARTICIPANTS, 3, torch.tensor([int(t)]))[0]) for r, t in
                     zip(rounds, truth)])
    assert abs(np.corrcoef(truth, seen)[0, 1]) < 4 / math.sqrt(len(truth))


@pytest.mark.parametrize("degree", [0, 4])
def test_recovery_survives_the_thresholds_dropouts_and_stops_loudly_at_one_more(degree):
    threshold = 3 if degree == 0 else 2  # holders: 7 (all pairs) or 5 (4 neighbours and the client itself)
    protocol = Protocol(seed=3, threshold=threshold, degree=degree, ring=24)
    values = {u: torch.full((100,), u + 1, dtype=torch.int64) for u in PARTICIPANTS}
    masked = masked_round(protocol, values)

    survivors = {u: masked[u] for u in PARTICIPANTS[threshold:]}  # the first `threshold` dropped
    if degree:  # with a sparse graph, drop neighbours of one client so that its holders lose exactly `threshold`
        graph = protocol.graph(1, PARTICIPANTS)
        lost = graph[0][:threshold]
        survivors = {u: masked[u] for u in PARTICIPANTS if u not in lost}
    total = protocol.unmask(1, PARTICIPANTS, survivors)
    assert torch.equal(total, sum(values[u] for u in survivors))

    one_more = dict(survivors)
    if degree:
        extra = next(v for v in protocol.holders(1, PARTICIPANTS, 0) if v in one_more and v != 0)
    else:
        extra = min(one_more)
    del one_more[extra]
    with pytest.raises(RuntimeError, match=rf"dropped, more than --secure_aggregation.threshold={threshold}"):
        protocol.unmask(1, PARTICIPANTS, one_more)


def test_secagg_plus_graph_is_regular_and_symmetric():
    graph = harary_neighbours(list(range(11)), 4, seed=0, rnd=5)

    assert all(len(v) == 4 for v in graph.values())
    assert all(u in graph[v] for u in graph for v in graph[u])
    assert harary_neighbours(list(range(11)), 4, seed=0, rnd=6) != graph  # a fresh ring every round
    assert harary_neighbours(list(range(5)), 0, seed=0, rnd=1)[2] == [0, 1, 3, 4]


def test_shamir_any_threshold_of_shares_rebuilds_the_secret_and_fewer_do_not():
    secret = bytes(range(32))
    shares = shamir.split(secret, 4, [1, 2, 3, 4, 5, 6, 7])

    for chosen in ([0, 1, 2, 3], [6, 4, 2, 0], [3, 4, 5, 6]):
        assert shamir.combine([shares[i] for i in chosen], 4) == secret
    with pytest.raises(shamir.NotEnoughShares):
        shamir.combine(shares[:3], 4)
    # Three shares interpolated as if three were enough give another value, not the secret.
    try:
        assert shamir.combine(shares[:3], 3) != secret
    except ValueError:
        pass  # or no 32-byte value at all


def test_the_default_threshold_keeps_a_majority_of_holders_and_larger_ones_are_refused():
    assert tolerated_dropouts(SecureAggregationArgs(enabled=True), 7) == 3
    assert tolerated_dropouts(SecureAggregationArgs(enabled=True, neighbors=4), 20) == 2
    with pytest.raises(ValueError, match="--secure_aggregation.threshold must be at most 2"):
        tolerated_dropouts(SecureAggregationArgs(enabled=True, threshold=3), 6)


def run(loop, rounds):
    for r in rounds:
        loop.run_round(r)


def test_in_a_federation_the_server_sees_masked_vectors_and_gets_fedavg_within_the_quantisation_error(make_loop):
    args = SecureAggregationArgs(enabled=True, bits=16, clip_range=0.5)
    plain = make_loop(FedAvg(), clients=4)
    secure_algo = SecureAggregation(FedAvg(), args, seed=0)
    secure = make_loop(secure_algo, clients=4)

    trained = secure.train(1, secure.select(1))
    assert all(set(up) == {MASKED, ROUND} for up in trained.uploads.values())  # nothing else crosses
    assert all(up[MASKED].dtype == torch.int32 for up in trained.uploads.values())  # a 29-bit ring
    result = secure.aggregate(1, trained.uploads)
    plain_result = plain.aggregate(1, plain.train(1, plain.select(1)).uploads)

    step = 0.5 / (2 ** 15 - 1)
    for k, v in plain_result[0].items():
        assert float((result[0][k].double() - v.double()).abs().max()) <= step / 2 + 1e-6, k
    assert result.metrics["secagg_bytes"] == secure_algo.protocol.protocol_bytes(1, (0, 1, 2, 3), [0, 1, 2, 3])


def test_with_dropouts_the_masks_of_the_clients_that_dropped_are_recovered(make_loop):
    args = SecureAggregationArgs(enabled=True, bits=18, clip_range=0.5)
    plain, secure = make_loop(FedAvg(), clients=5), make_loop(SecureAggregation(FedAvg(), args, seed=0), clients=5)
    for loop in (plain, secure):
        loop.args.dropout = 0.3

    results = []
    for loop in (plain, secure):
        run(loop, (1, 2, 3))
        results.append(loop.algorithm.global_state())

    dropped = [r for r in range(1, 4) if plain.dropped(r, 0, plain.selected(r))]
    assert dropped  # the test exercises recovery
    assert all(float((results[1][k] - v).abs().max()) < 1e-3 for k, v in results[0].items())


def test_scaffold_control_variates_are_aggregated_as_a_sum_under_secure_aggregation(make_loop):
    args = SecureAggregationArgs(enabled=True, bits=20, clip_range=4.0)
    plain, secure = make_loop(SCAFFOLD(), clients=3), make_loop(SecureAggregation(SCAFFOLD(), args, seed=0), clients=3)

    run(plain, (1, 2))
    run(secure, (1, 2))

    a, b = plain.algorithm.global_state(), secure.algorithm.global_state()
    assert all(float((a[k] - b[k]).abs().max()) < 1e-4 for k in a)


def test_with_client_dp_the_noise_goes_on_the_sum_or_in_shares_at_the_clients():
    federation = FederationArgs(rounds=5)
    privacy = PrivacyArgs(mode="client", clip=1.0, noise_multiplier=2.0)
    server = wrap_privacy(FedAvg(), privacy, SecureAggregationArgs(enabled=True), seed=0, federation=federation,
                          num_clients=9)
    shared = wrap_privacy(FedAvg(), privacy, SecureAggregationArgs(enabled=True, noise="distributed"), seed=0,
                          federation=federation, num_clients=9)

    for algo in (server, shared):
        algo.setup(["w"], {"w": torch.zeros(3)}, num_clients=9)
    assert isinstance(server.inner, ClientDP) and server.inner.client_noise_std() == 0
    # Each of the 9 clients adds 1 / (9 - 4) of the variance: any round that unmasks (>= 5 reports) has it all.
    assert shared.inner.client_noise_std() == pytest.approx(2.0 / math.sqrt(9 - 4))
    assert shared.uniform and not server.uniform
    with pytest.raises(ValueError, match="--secure_aggregation.enabled cannot wrap EPFL"):
        from fedhb.algorithms import EPFL

        wrap_privacy(EPFL(), PrivacyArgs(), SecureAggregationArgs(enabled=True), seed=0, federation=federation,
                     num_clients=9)


def test_dp_sgd_under_secure_aggregation_sends_only_its_step_count_in_the_clear(make_loop):
    from fedhb.privacy.dpsgd import ACCOUNT, SampleDP

    privacy = PrivacyArgs(mode="sample", clip=1.0, noise_multiplier=1.0)
    inner = SampleDP(FedAvg(), privacy, seed=0, rounds=1, fraction=1.0, batch_size=32, local_epochs=1)
    loop = make_loop(SecureAggregation(inner, SecureAggregationArgs(enabled=True), seed=0), clients=3)

    trained = loop.train(1, loop.select(1))
    assert all(set(up) == {MASKED, ROUND, ACCOUNT} for up in trained.uploads.values())
    result = loop.aggregate(1, trained.uploads)

    assert result.metrics["epsilon"] == pytest.approx(max(inner.epsilons())) and result.metrics["epsilon"] > 0
    assert "secagg_bytes" in result.metrics
