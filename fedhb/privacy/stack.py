"""``wrap_privacy``: the algorithm a run trains, from ``--privacy.*`` and ``--secure_aggregation.*``.

Client-level DP (or sample-level DP-SGD) wraps the algorithm, and secure aggregation wraps that: on a client the
update is trained (with DP-SGD), clipped (and, for distributed noise, noised), then quantised and masked; on the server
the sum is unmasked, noised and handed to the algorithm's own server step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedhb.algorithms.base import Algorithm
from fedhb.config import FederationArgs, PrivacyArgs, SecureAggregationArgs


def wrap_privacy(algorithm: Algorithm, privacy: PrivacyArgs, secure_aggregation: SecureAggregationArgs, *, seed: int,
                 federation: FederationArgs, num_clients: int) -> Algorithm:
    """``algorithm`` as the run trains it; itself when no privacy option is on.

    Raises:
        ValueError: an algorithm a mode cannot wrap soundly, or options that do not fit together (naming the flag).
    """
    from fedhb.privacy.client_dp import ClientDP
    from fedhb.privacy.dpsgd import SampleDP
    from fedhb.privacy.secagg import SecureAggregation, tolerated_dropouts

    wrapped = algorithm
    secure = secure_aggregation.enabled
    if secure_aggregation.noise == "distributed" and (not secure or privacy.mode != "client"):
        raise ValueError("--secure_aggregation.noise distributed needs --secure_aggregation.enabled true and "
                         f"--privacy.mode client (got enabled={secure}, mode={privacy.mode})")
    if privacy.mode == "client":
        noise = None
        min_reporting = None
        if secure:
            noise = secure_aggregation.noise
            per_round = num_clients if federation.fraction >= 1 else max(1, int(round(federation.fraction *
                                                                                    num_clients)))
            min_reporting = per_round - tolerated_dropouts(secure_aggregation, per_round)
        wrapped = ClientDP(algorithm, privacy, seed=seed, rounds=federation.rounds, fraction=federation.fraction,
                           noise=noise, min_reporting=min_reporting)
    elif privacy.mode == "sample":
        wrapped = SampleDP(algorithm, privacy, seed=seed, rounds=federation.rounds, fraction=federation.fraction,
                           batch_size=federation.batch_size, local_epochs=federation.local_epochs)
    if secure:
        wrapped = SecureAggregation(wrapped, secure_aggregation, seed=seed, fraction=federation.fraction)
        per_round = num_clients if federation.fraction >= 1 else max(1, int(round(federation.fraction * num_clients)))
        if per_round < 2:
            raise ValueError("--secure_aggregation.enabled needs at least 2 clients per round (--federation.fraction x "
                             f"--partition.num_clients = {per_round}): one client's sum is its own upload")
        tolerated_dropouts(secure_aggregation, per_round)  # a threshold too large is refused before any work
    return wrapped


def privacy_summary(trained: Algorithm, server_metrics: Mapping[str, float]) -> dict[str, Any]:
    """``summary.json``'s ``privacy`` block: the guarantee reached (ε at δ, per client for DP-SGD), the noise and
    clip that gave it, and secure aggregation's settings."""
    from fedhb.privacy.client_dp import ClientDP
    from fedhb.privacy.dpsgd import SampleDP
    from fedhb.privacy.secagg import SecureAggregation

    out: dict[str, Any] = {"mode": "none", "epsilon": None}
    layer: Any = trained
    if isinstance(layer, SecureAggregation):
        assert layer.protocol is not None
        out["secure_aggregation"] = {"bits": layer.args.bits, "clip_range": layer.args.clip_range,
                                     "threshold": layer.protocol.threshold, "neighbors": layer.args.neighbors,
                                     "ring_bits": layer.protocol.ring, "noise": layer.args.noise}
        layer = layer.inner
    if isinstance(layer, ClientDP):
        out.update(mode="client", epsilon=layer.accountant.epsilon, delta=layer.privacy.delta,
                   accountant=layer.privacy.accountant, noise_multiplier=layer.noise_multiplier,
                   update_noise_multiplier=layer.update_noise, clip=layer.clip, noise=layer.placement,
                   sample_rate=layer.sample_rate, releases=sum(n for _, _, n in layer.accountant.history))
    elif isinstance(layer, SampleDP):
        eps = layer.epsilons()
        out.update(mode="sample", epsilon=max(eps, default=0.0), epsilon_mean=sum(eps) / max(1, len(eps)),
                   delta=layer.privacy.delta, accountant=layer.privacy.accountant, clip=layer.privacy.clip,
                   epsilon_by_client={str(c): e for c, e in enumerate(eps)},
                   noise_multiplier_by_client={str(c): float(s) for c, s in enumerate(layer._sigma)},
                   steps_by_client={str(c): int(n) for c, n in enumerate(layer._steps)})
    if out["epsilon"] is None and "epsilon" in server_metrics:
        out["epsilon"] = server_metrics["epsilon"]
    return out
