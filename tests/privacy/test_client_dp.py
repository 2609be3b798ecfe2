"""Client-level DP: without noise and with an unreachable clip it is the wrapped algorithm exactly; clipping bounds
every update; the noise is the calibrated Gaussian, drawn from the run's stream; what it cannot wrap it refuses."""

from __future__ import annotations

import math

import pytest
import torch

from fedhb import seeds
from fedhb.algorithms import EPFL, SCAFFOLD, FedAdam, FedAvg, FFALoRA
from fedhb.config import PrivacyArgs
from fedhb.privacy.accounting import epsilon
from fedhb.privacy.client_dp import RELEASE, SHADOW, ClientDP, clip_update, server_step
from fedhb.privacy.stack import wrap_privacy


def norm(tensors: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(v.to(torch.float64).pow(2).sum()) for v in tensors.values()))


def no_noise(clip: float = 1e9) -> PrivacyArgs:
    return PrivacyArgs(mode="client", clip=clip, noise_multiplier=0.0)


@pytest.mark.parametrize("make", [FedAvg, SCAFFOLD, FedAdam, FFALoRA, lambda: EPFL(lam=0.5)],
                         ids=["FedAvg", "SCAFFOLD", "FedAdam", "FFALoRA", "EPFL"])
def test_no_noise_and_an_unreachable_clip_is_the_algorithm_exactly(make_loop, make):
    plain = make_loop(make(), clients=3)
    private = make_loop(ClientDP(make(), no_noise(), seed=0, rounds=2), clients=3)

    for r in (1, 2):
        plain.run_round(r)
        private.run_round(r)

    for c, state in plain.states.items():
        for k, v in state.items():
            assert torch.equal(v, private.states[c][k]), (c, k)
    assert private.server_metrics["epsilon"] == math.inf  # no noise: no guarantee, and the record says so


def test_clipped_updates_never_exceed_the_clip_and_neither_does_the_mean(make_loop):
    clip = 1e-3
    algo = ClientDP(FedAvg(), no_noise(clip), seed=0, rounds=1)
    loop = make_loop(algo, clients=3)
    initial = {k: v.clone() for k, v in loop.states[0].items() if not k.startswith(RELEASE)}

    trained = loop.train(1, loop.select(1))
    for c, upload in trained.uploads.items():
        assert norm({k: upload[k].double() - initial[k].double() for k in upload}) <= clip, c
        raw = {k: loop.client_module.trainable()[k] for k in upload} if c == 2 else None  # the last one trained
        if raw is not None:  # the client's own model moved far further than what it released
            assert norm({k: raw[k].detach() - initial[k] for k in upload}) > 10 * clip
    result = loop.aggregate(1, trained.uploads)
    assert norm({k: v.double() - initial[k].double() for k, v in result[0].items()}) <= clip * (1 + 1e-6)


def test_clip_update_scales_only_updates_beyond_the_clip():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        ref = {"a": torch.randn(4, 3, generator=gen), "b": torch.randn(5, generator=gen)}
        after = {k: v + torch.randn(v.shape, generator=gen) * float(torch.rand((), generator=gen)) for k, v in
                 ref.items()}
        clip = float(torch.rand((), generator=gen)) * 3
        out, measured = clip_update(after, ref, clip)

        assert measured == pytest.approx(norm({k: after[k].double() - ref[k].double() for k in ref}), rel=1e-12)
        if measured <= clip:
            assert all(torch.equal(out[k], after[k]) for k in ref)
        else:
            delta = {k: out[k] - ref[k] for k in ref}
            assert clip * (1 - 1e-5) <= norm({k: out[k].double() - ref[k].double() for k in ref}) <= clip
            cos = sum(float((delta[k] * (after[k] - ref[k])).sum()) for k in ref) / (norm(delta) * measured)
            assert cos == pytest.approx(1.0, abs=1e-5)  # same direction


def private_fedavg(sigma: float, clip: float, seed: int = 7, **kwargs) -> ClientDP:
    algo = ClientDP(FedAvg(), PrivacyArgs(mode="client", clip=clip, noise_multiplier=sigma, **kwargs), seed=seed,
                    rounds=10)
    algo.setup(["w"], {"w": torch.zeros(20_000)}, num_clients=4)
    return algo


def test_the_server_adds_one_gaussian_of_std_sigma_clip_over_m_to_the_mean():
    algo = private_fedavg(sigma=1.5, clip=0.4)
    uploads = {c: {"w": torch.full((20_000,), 0.1 * (c + 1))} for c in range(4)}

    received = algo.aggregate(uploads, {c: 10 for c in range(4)})

    gen = torch.Generator().manual_seed(seeds.derive(7, 1, seeds.Stream.DP_NOISE))  # (seed, aggregation 1)
    noise = torch.randn(20_000, generator=gen, dtype=torch.float64) * (1.5 * 0.4 / 4)
    expected = (torch.full((20_000,), 0.25, dtype=torch.float64) + noise).to(torch.float32)
    assert torch.allclose(received[0]["w"], expected, atol=1e-7)
    assert float((received[0]["w"] - 0.25).std()) == pytest.approx(1.5 * 0.4 / 4, rel=0.02)
    assert all(torch.equal(received[c]["w"], received[0]["w"]) for c in range(4))  # one draw for everyone
    assert received.metrics["epsilon"] == pytest.approx(epsilon([(1.5, 1.0, 1)], 1e-5))


def test_with_unequal_sample_weights_the_largest_weight_sets_the_noise():
    algo = private_fedavg(sigma=1.0, clip=1.0)
    uploads = {c: {"w": torch.zeros(20_000)} for c in range(3)}

    received = algo.aggregate(uploads, {0: 10, 1: 10, 2: 80})

    assert float(received[0]["w"].std()) == pytest.approx(1.0 * 1.0 * 80 / 100, rel=0.02)


def test_the_noise_is_a_function_of_the_seed_and_the_aggregation_only():
    uploads = {c: {"w": torch.zeros(20_000)} for c in range(2)}
    a, b, other = private_fedavg(1.0, 1.0), private_fedavg(1.0, 1.0), private_fedavg(1.0, 1.0, seed=8)

    first = [a.aggregate(uploads, {0: 1, 1: 1})[0]["w"] for _ in range(2)]
    again = b.aggregate(uploads, {0: 1, 1: 1})[0]["w"]

    assert torch.equal(first[0], again) and not torch.equal(first[0], first[1])
    assert not torch.equal(other.aggregate(uploads, {0: 1, 1: 1})[0]["w"], first[0])


def test_adaptive_clipping_follows_the_noised_count_of_unclipped_clients():
    from fedhb.privacy.client_dp import UNCLIPPED

    algo = private_fedavg(sigma=0.05, clip=2.0, adaptive_clip=True, target_quantile=0.5, clip_lr=0.2)
    uploads = {c: {"w": torch.zeros(20_000), UNCLIPPED: torch.tensor(1.0 if c < 3 else 0.0)} for c in range(4)}

    result = algo.aggregate(uploads, {c: 1 for c in range(4)})

    gen = torch.Generator().manual_seed(seeds.derive(7, 1, 1, seeds.Stream.DP_NOISE))
    unclipped = (3 + float(torch.randn((), generator=gen, dtype=torch.float64)) * 4 / 20) / 4
    assert result.metrics["dp_unclipped"] == pytest.approx(unclipped)
    assert algo.clip == pytest.approx(2.0 * math.exp(-0.2 * (unclipped - 0.5)))
    assert result.metrics["dp_clip"] == 2.0  # the clip this round's clients used
    assert UNCLIPPED not in result[0]
    assert algo.update_noise > algo.noise_multiplier == 0.05  # part of the budget went to the count


def test_epfl_clients_noise_their_own_release_and_b_is_taken_against_its_last_release(make_loop):
    sigma, clip = 0.5, 0.01
    algo = ClientDP(EPFL(lam=0.5), PrivacyArgs(mode="client", clip=clip, noise_multiplier=sigma), seed=3, rounds=2)
    loop = make_loop(algo, clients=3)
    before = {k: v.clone() for k, v in loop.states[1].items()}

    trained = loop.train(1, loop.select(1))

    state = loop.states[1]
    released = trained.uploads[1]
    shadows = [k for k in state if k.startswith(SHADOW)]
    assert shadows and all(torch.equal(state[k], released[k[len(SHADOW):]]) for k in shadows)
    noise = torch.cat([(released[k].to(torch.float64) - before[k].to(torch.float64)).flatten() for k in released])
    # A clipped update of norm <= 0.01 spread over the coordinates, plus N(0, (sigma * clip)^2) per coordinate.
    assert float(noise.std()) == pytest.approx(sigma * clip, rel=0.05)
    assert algo.placement == "client"


class OwnServerStep(FedAvg):
    def aggregate(self, uploads, num_samples):
        return super().aggregate(uploads, num_samples)


@pytest.mark.parametrize(("name", "reason"), [
    ("Local", "Local communicates nothing"),
    ("Centralized", "pools every client's raw training data"),
    ("FedNova", "rescales each update by its client's number of local steps"),
    ("APPLE", "sends every client's own core model to every other client"),
    ("FLoRA", "merges the products B_k A_k"),
])
def test_what_it_cannot_wrap_soundly_it_refuses_saying_why(name, reason):
    import fedhb.algorithms as algorithms

    with pytest.raises(ValueError, match=f"--privacy.mode client cannot wrap {name}: .*{reason}"):
        ClientDP(getattr(algorithms, name)(), no_noise(), seed=0, rounds=1)


def test_an_unknown_or_robust_server_step_is_refused_rather_than_guessed():
    with pytest.raises(ValueError, match="cannot wrap OwnServerStep: its server step is not one fedhb knows"):
        server_step(OwnServerStep())
    with pytest.raises(ValueError, match="cannot wrap FedAvg with --algorithm.aggregation median: a robust"):
        server_step(FedAvg(aggregation="median"))


def test_the_record_carries_epsilon_after_the_loops_own_fields(make_loop):
    from fedhb.record import tensorboard_scalars

    algo = ClientDP(FedAvg(), PrivacyArgs(mode="client", clip=0.5, noise_multiplier=1.0), seed=0, rounds=2)
    loop = make_loop(algo, clients=3, rounds=2)

    loop.run(None)

    record = loop.history[-1]
    keys = list(record)
    assert keys.index("failures") < keys.index("epsilon") < keys.index("client_acc")
    assert record["epsilon"] == pytest.approx(epsilon([(1.0, 1.0, 2)], 1e-5))
    assert tensorboard_scalars(record, loop.task.fields)["privacy/epsilon"] == record["epsilon"]


def test_target_epsilon_sets_the_noise_for_the_planned_rounds_at_the_client_sampling_rate():
    from fedhb.config import FederationArgs, SecureAggregationArgs

    privacy = PrivacyArgs(mode="client", clip=1.0, target_epsilon=3.0, delta=1e-5)
    algo = wrap_privacy(FedAvg(), privacy, SecureAggregationArgs(), seed=0,
                        federation=FederationArgs(rounds=50, fraction=0.2), num_clients=100)
    algo.setup(["w"], {"w": torch.zeros(3)}, num_clients=100)

    assert algo.sample_rate == 0.2
    assert epsilon([(algo.noise_multiplier, 0.2, 50)], 1e-5) == pytest.approx(3.0, rel=0.01)
    assert epsilon([(algo.noise_multiplier, 0.2, 50)], 1e-5) <= 3.0
