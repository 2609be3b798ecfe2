"""Sample-level differential privacy: DP-SGD inside each client (Abadi et al., "Deep Learning with Differential
Privacy", arXiv 1607.00133), with per-sample gradients from opacus' hooks.

:class:`SampleDP` wraps an algorithm and hands its ``local_update`` a :class:`PrivateTrainer` in place of the
``LocalTrainer``: the same tensors and phases, but ``fit`` draws each batch by Poisson sampling (every training sample
independently with probability ``q = batch size / samples``), takes the per-sample gradients of the trainable tensors
(LoRA and head; opacus' ``GradSampleHooks`` attach to the one backbone for this client's round and detach after it,
so the swapped client states never see them), clips each sample's gradient to L2 norm ``clip`` jointly over the
tensors, adds Gaussian noise of std ``noise_multiplier * clip`` to their sum and divides by the expected batch size
``q n``. An extra loss term's gradient that does not flow through the model's layers (FedProx's and Ditto's pull, a
function of the weights only) and a ``before_step`` correction (SCAFFOLD's control variates) are applied as they are:
neither reads the data. A local procedure that reads the data outside ``fit`` (``gradients``, ``features``, ``step``,
``batches``: FedALA, MOON, APFL, APPLE) is refused at its first call, since those reads would not be private.

Each client's ε is its own: the accountant composes its DP steps at its sampling rate, only in the rounds whose
update it released; with ``--privacy.target_epsilon`` each client's noise multiplier is set for its planned steps
(the rounds it is selected in times ``--federation.local_epochs`` times ``round(samples / batch size)``). The round's
record carries the largest and the mean ε over the clients; ``summary.json`` each client's.

DP-SGD protects each training sample in everything the client's model and uploads reveal, its personalised part
included; it does not hide which client took part, nor properties of a client's data as a whole.

Client state: ``algo/dpsgd/account``: ``[DP steps of the last round, noise multiplier]``, uploaded in the clear (it
depends on the sample count and the schedule only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fedhb import seeds
from fedhb.algorithms._ops import State
from fedhb.algorithms.base import Aggregate, Algorithm, algo_key
from fedhb.mapped import gather
from fedhb.privacy.accounting import epsilon, noise_for_epsilon

if TYPE_CHECKING:
    from fedhb.algorithms.trainer import BeforeStep, ExtraLoss, LocalTrainer
    from fedhb.config import PrivacyArgs

ACCOUNT = algo_key("dpsgd", "account")


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    return max(1, int(round(num_samples / batch_size)))


@functools.lru_cache(maxsize=1024)
def _calibrated(target: float, delta: float, rate: float, steps: int, kind: str) -> float:
    return noise_for_epsilon(target, delta, rate, steps, kind)


class PrivateTrainer:
    """A ``LocalTrainer`` whose ``fit`` is DP-SGD; everything else but the non-private data reads is the trainer's.

    Args:
        trainer: The client's trainer this round.
        clip: Per-sample gradient bound.
        noise_multiplier: Noise std over ``clip``.
        rate: Poisson sampling rate.
        seed: Seed of the batches and the noise (the client's and round's stream).
    """

    def __init__(self, trainer: LocalTrainer, clip: float, noise_multiplier: float, rate: float, seed: int) -> None:
        self._trainer = trainer
        self.clip, self.noise_multiplier, self.rate = clip, noise_multiplier, rate
        self.sampling = torch.Generator().manual_seed(seed)
        device = trainer.device
        self.noise = torch.Generator(device=device).manual_seed(seeds.derive(seed, 1))
        self.dp_steps = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trainer, name)

    def _refuse(self, what: str) -> None:
        raise ValueError(f"--privacy.mode sample: the local update calls trainer.{what}, which reads the client's data "
                         "outside DP-SGD's noised steps; DP-SGD supports local procedures built on trainer.fit")

    def gradients(self, *args: Any, **kwargs: Any) -> State:
        self._refuse("gradients()")
        raise AssertionError

    def features(self, *args: Any, **kwargs: Any) -> Tensor:
        self._refuse("features()")
        raise AssertionError

    def step(self, *args: Any, **kwargs: Any) -> Tensor:
        self._refuse("step()")
        raise AssertionError

    def batches(self, *args: Any, **kwargs: Any) -> Any:
        self._refuse("batches()")

    def record(self, *args: Any, **kwargs: Any) -> None:
        self._refuse("record()")

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        """opacus' per-sample gradient hooks on the process's model, for this client's round only."""
        try:
            from opacus.grad_sample import GradSampleHooks
        except ModuleNotFoundError:
            raise ModuleNotFoundError("--privacy.mode sample uses opacus: pip install 'fedhb[privacy]'") from None
        attached = GradSampleHooks(self._trainer.client_module, batch_first=True, loss_reduction="mean", strict=False)
        try:
            yield
        finally:
            attached.cleanup()

    def _noise_like(self, p: Tensor) -> Tensor:
        return torch.randn(p.shape, generator=self.noise, device=p.device, dtype=p.dtype) * (
            self.noise_multiplier * self.clip)

    def _privatize(self, params: dict[str, torch.nn.Parameter], batch: int, then: BeforeStep | None,
                   extra: Any = None) -> None:
        """Replace each trainable tensor's gradient by the clipped, noised sum of its per-sample gradients over the
        expected batch, plus the gradient of ``extra()`` (the extra loss term recomputed on detached model outputs,
        so that only its direct dependence on the weights counts: FedProx's and Ditto's pull)."""
        direct: dict[str, Tensor] = {}
        if extra is not None:
            with torch.enable_grad():
                term = extra()
            if term is not None and term.requires_grad:
                grads = torch.autograd.grad(term, list(params.values()), allow_unused=True)
                direct = {n: g for n, g in zip(params, grads) if g is not None}
        samples = {}
        for name, p in params.items():
            gs = getattr(p, "grad_sample", None)
            if isinstance(gs, list):
                gs = torch.stack(gs).sum(0)
            if gs is None:
                raise ValueError(f"--privacy.mode sample: no per-sample gradient for {name} (a trainable tensor "
                                 "outside a layer opacus supports)")
            if gs.shape[0] != batch:
                raise ValueError(f"--privacy.mode sample: {name}'s per-sample gradients have {gs.shape[0]} rows for a "
                                 f"batch of {batch} (the backbone folds the batch, e.g. one row per channel); DP-SGD "
                                 "needs one row per sample")
            samples[name] = gs
        squares = [gs.reshape(batch, -1).to(torch.float64).pow(2).sum(1) for gs in samples.values()]
        norms = torch.stack(squares).sum(0).sqrt()
        factor = (self.clip / (norms + 1e-12)).clamp(max=1.0)
        expected = self.rate * self._trainer.num_samples
        for name, p in params.items():
            gs = samples[name]
            clipped = torch.einsum("i,i...->...", factor.to(gs.dtype), gs)
            p.grad = (clipped + self._noise_like(p)) / expected
            if name in direct:
                p.grad += direct[name]
            setattr(p, "grad_sample", None)  # noqa: B010 (opacus' attribute, not the Parameter's)
        if then is not None:
            then(params)

    def _noise_only(self, then: BeforeStep | None) -> None:
        """A step on an empty Poisson batch: the update is the noise alone."""
        t = self._trainer
        params = t.trainable()
        expected = self.rate * t.num_samples
        for p in params.values():
            p.grad = self._noise_like(p) / expected
        if then is not None:
            then(params)
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)

    def fit(self, epochs: int | None = None, trainable: Any = None, loss: ExtraLoss | None = None,
            fraction: float = 1.0, before_step: BeforeStep | None = None, lr: float | None = None) -> float:
        """DP-SGD for ``epochs`` (default ``--federation.local_epochs``) of ``round(n / batch size)`` steps each, at
        learning rate ``lr`` (default: the round's)."""
        t = self._trainer
        if fraction != 1.0:
            self._refuse(f"fit(fraction={fraction})")
        epochs = t.epochs if epochs is None else epochs
        n = t.num_samples
        losses = []
        t.reset_optimizer(lr)
        t.module.train()
        with t.only(trainable):
            for _ in range(epochs * steps_per_epoch(n, t.batch_size) if n else 0):
                self.dp_steps += 1
                rows = (torch.rand(n, generator=self.sampling) < self.rate).nonzero().flatten()
                if len(rows) == 0:
                    self._noise_only(before_step)
                    continue
                samples = torch.from_numpy(t.index[rows.numpy()])
                batch = gather(t.fabric, t.tensors, samples)
                size, seen = len(rows), {}  # type: tuple[int, dict[str, Any]]

                def tracked(batch: dict[str, Tensor], out: dict[str, Tensor], rows: Tensor, seen: dict = seen) -> Any:
                    seen["args"] = (batch, {k: v.detach() for k, v in out.items()}, rows)
                    return loss(batch, out, rows)  # type: ignore[misc]

                def again(seen: dict = seen) -> Any:
                    return loss(*seen["args"])  # type: ignore[misc]

                def privatize(params: dict[str, torch.nn.Parameter], size: int = size, again: Any = again) -> None:
                    self._privatize(params, size, before_step, again if loss is not None else None)

                value = t.step(batch, rows, tracked if loss is not None else None, privatize)
                losses.append(float(value))
        return sum(losses) / len(losses) if losses else math.nan


class SampleDP(Algorithm):
    """Sample-level DP-SGD around ``inner`` (see the module docstring).

    Args:
        inner: The wrapped algorithm.
        privacy: ``--privacy.*`` (``mode`` must be ``sample``).
        seed: The run seed.
        rounds: Planned rounds.
        fraction: ``--federation.fraction`` (which rounds each client is planned to train in).
        batch_size: ``--federation.batch_size``: the expected Poisson batch.
        local_epochs: ``--federation.local_epochs``.
    """

    def __init__(self, inner: Algorithm, privacy: PrivacyArgs, *, seed: int, rounds: int, fraction: float,
                 batch_size: int, local_epochs: int) -> None:
        if privacy.mode != "sample":
            raise ValueError(f"SampleDP needs --privacy.mode sample, got {privacy.mode!r}")
        if inner.pools_training_data:
            raise ValueError(f"--privacy.mode sample cannot wrap {type(inner).__name__}: it pools raw data from every "
                             "client onto one")
        self.inner, self.privacy, self.seed, self.rounds = inner, privacy, seed, rounds
        self.fraction, self.batch_size, self.local_epochs = fraction, batch_size, local_epochs
        self._steps = torch.zeros(0, dtype=torch.float64)
        self._sigma = torch.zeros(0, dtype=torch.float64)
        self._rate = torch.zeros(0, dtype=torch.float64)
        # What the loop asks of the algorithm, as the wrapped one answers it.
        self.has_global_model = inner.has_global_model
        self.pools_training_data = inner.pools_training_data

    def hparams(self) -> dict[str, Any]:
        return self.inner.hparams()

    def setup(self, names: list[str], initial: State | None = None, num_clients: int | None = None) -> None:
        super().setup(names, initial, num_clients)
        self.inner.setup(names, initial, num_clients)
        n = num_clients or 0
        if len(self._steps) != n:
            self._steps = torch.zeros(n, dtype=torch.float64)
            self._sigma = torch.zeros(n, dtype=torch.float64)
            self._rate = torch.zeros(n, dtype=torch.float64)

    def init_client_state(self, state: State, client: int) -> State:
        state = self.inner.init_client_state(state, client)
        state[ACCOUNT] = torch.zeros(2, dtype=torch.float64)
        return state

    def personalized_model(self, state: State) -> State:
        return self.inner.personalized_model(state)

    def global_state(self) -> State | None:
        return self.inner.global_state()

    def rate(self, num_samples: int) -> float:
        return min(1.0, self.batch_size / max(1, num_samples))

    def planned_rounds(self, client: int) -> int:
        from fedhb.loop import select_clients

        return sum(client in select_clients(self.seed, r, self.num_clients or 1, self.fraction)
                   for r in range(1, self.rounds + 1))

    def noise_multiplier(self, client: int, num_samples: int) -> float:
        p = self.privacy
        if p.noise_multiplier is not None:
            return float(p.noise_multiplier)
        assert p.target_epsilon is not None
        steps = self.planned_rounds(client) * self.local_epochs * steps_per_epoch(num_samples, self.batch_size)
        return _calibrated(p.target_epsilon, p.delta, self.rate(num_samples), steps, p.accountant)

    def local_update(self, trainer: LocalTrainer, state: State) -> None:
        sigma = self.noise_multiplier(trainer.client, trainer.num_samples)
        private = PrivateTrainer(trainer, self.privacy.clip, sigma, self.rate(trainer.num_samples),
                                 seeds.derive(self.seed, trainer.round, trainer.client, seeds.Stream.DPSGD))
        with private.hooks():
            self.inner.local_update(private, state)  # type: ignore[arg-type]
        state[ACCOUNT] = torch.tensor([float(private.dp_steps), sigma], dtype=torch.float64)

    def upload(self, state: State) -> State:
        return {**self.inner.upload(state), ACCOUNT: state[ACCOUNT]}

    def epsilons(self) -> list[float]:
        """Each client's ε so far (0 for a client that has released nothing)."""
        return [epsilon([(float(s), float(q), int(n))], self.privacy.delta, self.privacy.accountant)
                for s, q, n in zip(self._sigma, self._rate, self._steps)]

    def aggregate(self, uploads: dict[int, State], num_samples: dict[int, int]) -> Aggregate:
        for i, up in uploads.items():
            steps, sigma = (float(x) for x in up[ACCOUNT])
            self._steps[i] += steps
            self._sigma[i] = sigma
            self._rate[i] = self.rate(num_samples[i])
        plain = {i: {k: v for k, v in up.items() if k != ACCOUNT} for i, up in uploads.items()}
        result = Aggregate.of(self.inner.aggregate(plain, num_samples))
        eps = self.epsilons()
        metrics = {"epsilon": max(eps, default=0.0), "epsilon_mean": sum(eps) / max(1, len(eps))}
        return dataclasses.replace(result, metrics={**result.metrics, **metrics})

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "steps": self._steps, "sigma": self._sigma, "rate": self._rate}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self._steps, self._sigma, self._rate = (state[k].clone() for k in ("steps", "sigma", "rate"))
