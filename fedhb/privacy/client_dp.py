"""Client-level differential privacy: DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent Language
Models", arXiv 1710.06963), with adaptive clipping as an option (Andrew et al., "Differentially Private Learning with
Adaptive Clipping", arXiv 1905.03871).

:class:`ClientDP` wraps an algorithm. Each client clips its update, what it uploads minus what it received, to L2 norm
``clip`` (jointly over every uploaded tensor) before it leaves the client; the server adds Gaussian noise to the mean
of the round's clipped updates and hands the result to the wrapped algorithm's own server step, which, for the
algorithms accepted here, reads the uploads only through their mean. What each client receives, and the global model,
is then post-processing of one Gaussian mechanism per round, and the accountant composes those.

Which server steps qualify (:func:`server_step`):

- **an average of the uploads** (FedAvg, FedProx, FedAvgM, FedAdam/FedYogi/FedAdagrad, FedSA-LoRA, FFA-LoRA, FedPer,
  FedRep, Ditto's and APFL's global model, MOON, FedALA; SCAFFOLD's model and control variate): central noise of std
  ``noise_multiplier * clip * max_k p_k`` on the weighted mean ``sum_k p_k clip(update_k)``, i.e.
  ``noise_multiplier * clip / m`` for ``m`` clients of equal weight. With unequal sample weights the largest weight
  sets the noise (the sum of ``p_k / max p`` times the clipped updates has sensitivity ``clip``), which is larger than
  ``noise_multiplier * clip / m``: sample counts are treated as public, as fedhb writes them to ``partition.json``.
  The noise is one draw per round from the ``(seed, aggregation)`` stream, identical on every rank.
- **EPFL's A mix**: each client's A matrices are mixed with weights from the distances between every client's own B
  matrices, so the server needs each upload, not a mean, and each client's mix weighs the others differently. fedhb
  makes each upload a Gaussian mechanism of its own instead: the client adds noise of std ``noise_multiplier * clip``
  to its clipped update (A and B) itself, and the server's distances and mixes are post-processing of the noised
  uploads. B never comes back from the server, so its update is taken against the last B the client released (kept
  in its state), not against its private B. The accounting is the same as for the mean; the noise in a mix of ``m``
  clients is about ``sqrt(m)`` times that of FedAvg's mean, which is what personalised mixing costs under DP.

Refused, with the reason: Local (nothing leaves a client), Centralized (pools raw data), FedNova (each update is
rescaled by its client's step count), APPLE (sends each client's own core model to every other client), FLoRA (the
server merges products ``B_k A_k``, which clipping A and B does not bound as one update), FedAvg's robust server steps
(a median or Krum is not a mean), and any algorithm whose server step fedhb does not know (it recognises the step by
the class that defines ``aggregate``: a subclass that overrides it must be added to :func:`server_step`).

Client-level DP protects what leaves a client: a personalised part that never leaves it (EPFL's B and head, a
personal model) is trained on its data without noise; sample-level DP-SGD (:mod:`fedhb.privacy.dpsgd`) protects that.

Client state: ``algo/dp/release/*`` (this round's clipped, for EPFL noised, upload), ``algo/dp/shadow/*`` (EPFL: the
last released B), ``algo/dp/unclipped`` (adaptive clipping: 1 when the update was not clipped).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fedhb import seeds
from fedhb.algorithms._ops import State
from fedhb.algorithms.base import ALGO_PREFIX, Aggregate, Algorithm, algo_key
from fedhb.privacy.accounting import Accountant, adaptive_noise, noise_for_epsilon

if TYPE_CHECKING:
    from fedhb.algorithms.trainer import LocalTrainer
    from fedhb.config import PrivacyArgs

RELEASE = algo_key("dp", "release/")
SHADOW = algo_key("dp", "shadow/")
UNCLIPPED = algo_key("dp", "unclipped")


@dataclass(frozen=True)
class ServerStep:
    """How a server step uses the uploads, as far as privacy is concerned.

    Attributes:
        kind: ``mean`` (reads the uploads through their weighted mean) or ``mix`` (EPFL: per-client mixes of
            individual uploads).
        weights: ``samples`` (sample-weighted mean) or ``uniform``.
        received: For ``mix``: which uploaded tensors the server sends back (EPFL's A); the others' updates are taken
            against the client's last release.
    """

    kind: str
    weights: str = "samples"
    received: Callable[[str], bool] | None = None


def _refusals() -> dict[type, str]:
    from fedhb.algorithms import APPLE, Centralized, FedNova, FLoRA, Local

    return {
        Local: "Local communicates nothing, so there is no client-level release to protect",
        Centralized: "Centralized pools every client's raw training data on one client; client-level DP cannot "
                     "protect data that has left its client",
        FedNova: "FedNova rescales each update by its client's number of local steps before averaging, so the "
                 "sensitivity of its mean to one client is not the clip",
        APPLE: "APPLE sends every client's own core model to every other client: each upload is released on its own, "
               "not through a mean",
        FLoRA: "FLoRA merges the products B_k A_k of every client into the backbone; clipping the uploaded A and B "
               "does not bound the merged update one client contributes",
    }


def server_step(algorithm: Algorithm, what: str = "--privacy.mode client") -> ServerStep:
    """What ``algorithm``'s server step is (see the module docstring), or a ``ValueError`` saying why ``what``
    cannot wrap it soundly."""
    from fedhb.algorithms import EPFL, SCAFFOLD, FedAvg, FedAvgM
    from fedhb.algorithms.fedopt import FedOpt
    from fedhb.models.lora import is_lora_a

    name = type(algorithm).__name__
    for cls, why in _refusals().items():
        if isinstance(algorithm, cls):
            raise ValueError(f"{what} cannot wrap {name}: {why}")
    aggregate = type(algorithm).aggregate
    robust = getattr(algorithm, "aggregation", "mean")
    if robust != "mean":
        raise ValueError(f"{what} cannot wrap {name} with --algorithm.aggregation {robust}: a robust server step is "
                         "not an average of the uploads, so the noise could not be calibrated to one client's share")
    if aggregate in (FedAvg.aggregate, FedAvgM.aggregate, FedOpt.aggregate):
        return ServerStep("mean", "samples")
    if aggregate is SCAFFOLD.aggregate:
        return ServerStep("mean", "uniform")
    if aggregate is EPFL.aggregate:
        return ServerStep("mix", received=is_lora_a)
    raise ValueError(f"{what} cannot wrap {name}: its server step is not one fedhb knows to be an average of the "
                     "uploads (FedAvg and its variants, FedOpt, SCAFFOLD) or EPFL's mix, so the noise could not be "
                     "calibrated to it")


def gaussian(like: Mapping[str, Tensor], std: float, seed: int) -> State:
    """Independent ``N(0, std^2)`` float64 tensors shaped as ``like``, drawn from ``seed`` in ``like``'s order (on
    CPU, so every rank and device draws the same numbers)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) * std for k, v in like.items()}


def _norm(tensors: Mapping[str, Tensor]) -> float:
    return math.sqrt(sum(float(d.pow(2).sum()) for d in tensors.values()))


def clip_update(after: Mapping[str, Tensor], ref: Mapping[str, Tensor], clip: float) -> tuple[State, float]:
    """``ref + min(1, clip / ||after - ref||) (after - ref)``, the norm taken jointly over every tensor (in float64),
    and the norm. Tensors come back as ``after`` itself, unchanged, when the norm is within ``clip``.

    The bound holds for the tensors as released, in their own dtype: rounding ``ref + factor * delta`` to float32 can
    push the difference past ``clip``, so the factor shrinks until it does not (and the update is dropped, in the
    degenerate case where the dtype cannot represent any step that small)."""
    ref64 = {k: ref[k].detach().cpu().to(torch.float64) for k in after}
    delta = {k: after[k].detach().cpu().to(torch.float64) - ref64[k] for k in after}
    norm = _norm(delta)
    if norm <= clip:
        return {k: v.detach().cpu().clone() for k, v in after.items()}, norm
    factor = clip / norm
    for _ in range(20):
        out = {k: (ref64[k] + factor * d).to(after[k].dtype) for k, d in delta.items()}
        released = _norm({k: out[k].to(torch.float64) - ref64[k] for k in out})
        if released <= clip:
            return out, norm
        factor *= clip / released * (1 - 1e-6)
    return {k: ref[k].detach().cpu().to(after[k].dtype).clone() for k in after}, norm


def references(upload: Mapping[str, Tensor], state: Mapping[str, Tensor],
               received: Callable[[str], bool] | None = None) -> State:
    """What each uploaded tensor's update is taken against: a model tensor's value as the round starts (what the
    client received), an ``algo/...`` tensor's zero (SCAFFOLD's control-variate change is an update already), and,
    when ``received`` is given, a model tensor the server never sends back against its last release (its shadow)."""
    out = {}
    for k, v in upload.items():
        if k.startswith(ALGO_PREFIX):
            out[k] = torch.zeros_like(v)
        elif received is not None and not received(k):
            out[k] = state[SHADOW + k]
        else:
            out[k] = state[k]
    return out


class ClientDP(Algorithm):
    """Client-level DP around ``inner`` (see the module docstring).

    Args:
        inner: The wrapped algorithm.
        privacy: ``--privacy.*`` (``mode`` must be ``client``).
        seed: The run seed (noise streams).
        rounds: Planned rounds (for ``target_epsilon``).
        fraction: ``--federation.fraction``: clients per round over clients, the sampling rate of the accountant.
        noise: ``server`` (central noise on the mean), ``distributed`` (each client adds its share before secure
            aggregation masks it) or ``None``: by the server step (``server`` for a mean, each client its own for
            EPFL's mix).
        min_reporting: With ``distributed``: the fewest clients whose noise reaches the sum (the clients per round
            less the dropouts secure aggregation tolerates); each adds ``1 / min_reporting`` of the variance.
    """

    def __init__(self, inner: Algorithm, privacy: PrivacyArgs, *, seed: int, rounds: int, fraction: float = 1.0,
                 noise: str | None = None, min_reporting: int | None = None) -> None:
        if privacy.mode != "client":
            raise ValueError(f"ClientDP needs --privacy.mode client, got {privacy.mode!r}")
        self.inner, self.privacy, self.seed, self.rounds, self.fraction = inner, privacy, seed, rounds, fraction
        self.step_kind = server_step(inner)
        placement = noise or ("server" if self.step_kind.kind == "mean" else "client")
        if self.step_kind.kind == "mix" and placement != "client":
            raise ValueError(f"--secure_aggregation cannot wrap {type(inner).__name__}: its server step mixes each "
                             "client's own upload, which secure aggregation hides")
        if placement == "distributed" and privacy.adaptive_clip:
            raise ValueError("--privacy.adaptive_clip does not work with --secure_aggregation.noise distributed: its "
                             "count of unclipped clients would need its own noise shares")
        if privacy.adaptive_clip and self.step_kind.kind == "mix":
            raise ValueError(f"--privacy.adaptive_clip does not work with {type(inner).__name__}: its clients noise "
                             "their own updates, so there is no noised count on the server to adapt the clip to")
        self.placement, self.min_reporting = placement, min_reporting
        self.clip = float(privacy.clip)
        self.noise_multiplier: float = 0.0  # the total, as accounted; set in setup
        self.update_noise: float = 0.0  # the updates' share of it (less than the total under adaptive clipping)
        self.count_std: float = 0.0
        self._aggregations = 0
        self.accountant = Accountant(privacy.delta, privacy.accountant)
        # What the loop asks of the algorithm, as the wrapped one answers it.
        self.has_global_model = inner.has_global_model
        self.pools_training_data = inner.pools_training_data

    # -- what the wrapped algorithm says ---------------------------------------------------------------------------
    def hparams(self) -> dict[str, Any]:
        return self.inner.hparams()

    @property
    def sample_rate(self) -> float:
        n = self.num_clients or 1
        return min(1.0, max(1, int(round(self.fraction * n))) / n) if self.fraction < 1 else 1.0

    @property
    def clients_per_round(self) -> int:
        n = self.num_clients or 1
        return n if self.fraction >= 1 else max(1, int(round(self.fraction * n)))

    def setup(self, names: list[str], initial: State | None = None, num_clients: int | None = None) -> None:
        super().setup(names, initial, num_clients)
        self.inner.setup(names, initial, num_clients)
        p = self.privacy
        if p.noise_multiplier is not None:
            total = float(p.noise_multiplier)
        else:
            assert p.target_epsilon is not None
            total = noise_for_epsilon(p.target_epsilon, p.delta, self.sample_rate, self.rounds, p.accountant)
        self.noise_multiplier = total
        if p.adaptive_clip:
            # Andrew et al. recommend a count noise of std m / 20 for m clients per round; a small federation needs
            # more (the count's share of the budget must stay below the total), at the price of a noisier count.
            self.count_std = max(self.clients_per_round / 20, total)
        self.update_noise = adaptive_noise(total, self.count_std) if p.adaptive_clip else total

    def init_client_state(self, state: State, client: int) -> State:
        state = self.inner.init_client_state(state, client)
        upload = self.inner.upload(state)
        state.update({RELEASE + k: v.clone() for k, v in upload.items()})
        received = self.step_kind.received
        if received is not None:
            state.update({SHADOW + k: v.clone() for k, v in upload.items() if not k.startswith(ALGO_PREFIX)
                          and not received(k)})
        if self.privacy.adaptive_clip:
            state[UNCLIPPED] = torch.zeros(())
        return state

    def personalized_model(self, state: State) -> State:
        return self.inner.personalized_model(state)

    def global_state(self) -> State | None:
        return self.inner.global_state()

    # -- the client ----------------------------------------------------------------------------------------------------
    def client_noise_std(self) -> float:
        """The std of the noise a client adds to its own clipped update (0 when the server adds it)."""
        if self.placement == "client":
            return self.update_noise * self.clip
        if self.placement == "distributed":
            return self.update_noise * self.clip / math.sqrt(max(1, self.min_reporting or self.clients_per_round))
        return 0.0

    def local_update(self, trainer: LocalTrainer, state: State) -> None:
        start = self.inner.upload(state)
        ref = {k: v.clone() for k, v in references(start, state, self.step_kind.received).items()}
        self.inner.local_update(trainer, state)
        # The trainer holds the model tensors (the loop stores them after this returns), the state the algo/ ones.
        after = self.inner.upload({**state, **{k: v.cpu() for k, v in trainer.read().items()}})
        release, norm = clip_update(after, ref, self.clip)
        std = self.client_noise_std()
        if std > 0:
            noise = gaussian(release, std, seeds.derive(self.seed, trainer.round, trainer.client,
                                                       seeds.Stream.DP_CLIENT_NOISE))
            release = {k: (v.to(torch.float64) + noise[k]).to(v.dtype) for k, v in release.items()}
        for k, v in release.items():
            state[RELEASE + k] = v
            if SHADOW + k in state:
                state[SHADOW + k] = v.clone()
        if self.privacy.adaptive_clip:
            state[UNCLIPPED] = torch.tensor(1.0 if norm <= self.clip else 0.0)

    def upload(self, state: State) -> State:
        out = {k[len(RELEASE):]: v for k, v in state.items() if k.startswith(RELEASE)}
        if self.privacy.adaptive_clip:
            out[UNCLIPPED] = state[UNCLIPPED]
        return out

    # -- the server ----------------------------------------------------------------------------------------------------
    def weights(self, ids: list[int], num_samples: dict[int, int]) -> list[float]:
        if self.step_kind.weights == "uniform":
            return [1 / len(ids)] * len(ids)
        total = sum(num_samples[i] for i in ids)
        if total <= 0:
            return [1 / len(ids)] * len(ids)
        return [num_samples[i] / total for i in ids]

    def aggregate(self, uploads: dict[int, State], num_samples: dict[int, int]) -> Aggregate:
        ids = sorted(uploads)
        self._aggregations += 1
        clip = self.clip
        bits = [float(uploads[i][UNCLIPPED]) for i in ids] if self.privacy.adaptive_clip else []
        plain = {i: {k: v for k, v in uploads[i].items() if k != UNCLIPPED} for i in ids}
        if self.placement == "server" and self.update_noise > 0 and ids:
            std = self.update_noise * clip * max(self.weights(ids, num_samples))
            noise = gaussian(plain[ids[0]], std, seeds.derive(self.seed, self._aggregations, seeds.Stream.DP_NOISE))
            # The same draw on every upload: the mean moves by exactly it, and the server step reads only the mean.
            plain = {i: {k: (v.to(torch.float64) + noise[k]).to(v.dtype) for k, v in s.items()}
                     for i, s in plain.items()}
        result = Aggregate.of(self.inner.aggregate(plain, num_samples))
        metrics: dict[str, float] = {"dp_clip": clip}
        if self.privacy.adaptive_clip and ids:
            gen = torch.Generator().manual_seed(seeds.derive(self.seed, self._aggregations, 1, seeds.Stream.DP_NOISE))
            count = sum(bits) + float(torch.randn((), generator=gen, dtype=torch.float64)) * self.count_std
            unclipped = count / len(ids)
            metrics["dp_unclipped"] = unclipped
            self.clip = clip * math.exp(-self.privacy.clip_lr * (unclipped - self.privacy.target_quantile))
        if ids:
            self.accountant.step(self.noise_multiplier, self.sample_rate)
        metrics["epsilon"] = self.accountant.epsilon
        return dataclasses.replace(result, metrics={**result.metrics, **metrics})

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "accountant": self.accountant.state_dict(), "clip": self.clip,
                "aggregations": self._aggregations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self.accountant.load_state_dict(state["accountant"])
        self.clip = float(state["clip"])
        self._aggregations = int(state["aggregations"])
