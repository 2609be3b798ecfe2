"""``LocalTrainer``: the client-side tool for one client's local training, and nothing else.

The loop builds one per client and round and hands it to the algorithm's ``local_update``. The trainer knows nothing
of algorithms: plain methods call ``trainer.fit()``; methods with their own local procedure (Ditto's personal model,
APFL's mixture, FedRep's alternating phases, FedALA's weight learning, MOON's representations of other models, APPLE's
core mixture) compose the same few operations: load tensors into the model, run epochs with a loss and a set of
trainable tensors, take gradients, read tensors back. Per-step behaviour comes in as closures: ``loss`` (a term added
to the task loss: FedProx, MOON) and ``before_step`` (a gradient correction: SCAFFOLD). The loop still owns seeds, data
order, devices and failure handling.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from fedhb.algorithms._ops import State
from fedhb.mapped import gather

if TYPE_CHECKING:
    from lightning.fabric import Fabric
    from torch import nn

    from fedhb.client import ClientModule
    from fedhb.config import OptimArgs

#: ``loss(batch, out, rows)``: a term added to the task loss; ``rows`` are the batch's positions in the client's
#: training split (what :meth:`LocalTrainer.features` is indexed by).
ExtraLoss = Callable[[dict[str, Tensor], dict[str, Tensor], Tensor], "Tensor | None"]
#: ``before_step(params)``: called after backward, before the optimizer step, with the tensors being trained by name
#: (their ``.grad`` hold true gradients, the fp16 loss scale already divided out).
BeforeStep = Callable[[dict[str, "nn.Parameter"]], None]


class Diverged(RuntimeError):
    """Local training produced a non-finite loss; the loop restores the client's state and reports the reason."""


class LocalTrainer:
    """One client's local training in one round.

    Args:
        fabric: The launched Fabric (devices, precision, backward).
        module: The process's model as set up by Fabric (its methods run under the precision plugin; Fabric's wrapper
            forwards the :class:`~fedhb.client.ClientModule`'s methods).
        client_module: The unwrapped :class:`~fedhb.client.ClientModule`.
        optimizer: The process's optimizer over every trainable tensor; its state is reset by :meth:`fit`.
        tensors: Every sample's prepared inputs and ``labels``, indexed by sample, on CPU.
        index: The client's training sample indices.
        epochs: ``--federation.local_epochs``.
        batch_size: ``--federation.batch_size``.
        eval_batch_size: ``--federation.eval_batch_size`` (used by :meth:`features`).
        lr: Learning rate of this round.
        optim: ``--optim.*`` (name, momentum, ...).
        seed: Seed of this client and round; the data order comes from it.
        round: This round (1-based).
        rounds: Rounds in the run.
        client: Client id.
    """

    def __init__(self, fabric: Fabric, module: ClientModule, client_module: ClientModule,
                 optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], index: np.ndarray, *, epochs: int,
                 batch_size: int, eval_batch_size: int, lr: float, optim: OptimArgs, seed: int, round: int, rounds: int,
                 client: int) -> None:
        self.fabric, self.module, self.client_module = fabric, module, client_module
        self.optimizer, self.tensors, self.index = optimizer, tensors, index
        self.epochs, self.batch_size, self.eval_batch_size = epochs, batch_size, eval_batch_size
        self.lr, self.optim, self.round, self.rounds, self.client = lr, optim, round, rounds, client
        self.order = torch.Generator().manual_seed(seed)
        self.params = client_module.trainable()  # every trainable tensor, whatever a phase freezes
        self.names = list(self.params)
        self.steps = 0
        self.last_loss = float("nan")  # loss of the latest step or gradient evaluation
        self._loss_sum = 0.0

    # -- tensors --------------------------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return len(self.index)

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def to_device(self, tensors: State) -> State:
        """``tensors`` on the model's device (copies only where they are elsewhere)."""
        return {k: v.to(self.device) for k, v in tensors.items()}

    @torch.no_grad()
    def load(self, tensors: State) -> None:
        """Copy ``tensors`` (any subset of the model's trainable tensors) into the model."""
        unknown = [k for k in tensors if k not in self.params]
        if unknown:
            raise KeyError(f"tensors the model does not have: {unknown[:5]}")
        for name, value in tensors.items():
            self.params[name].copy_(value)

    def trainable(self) -> dict[str, nn.Parameter]:
        """The tensors being trained now, by name: every trainable tensor but those a phase (:meth:`only`) froze."""
        return {n: p for n, p in self.params.items() if p.requires_grad}

    def read(self, names: Iterable[str] | None = None) -> State:
        """Detached copies of the model's trainable tensors (or of ``names``), on the model's device."""
        names = self.names if names is None else list(names)
        return {n: self.params[n].detach().clone() for n in names}

    # -- data -----------------------------------------------------------------------------------------------------
    def batches(self, epochs: int = 1, fraction: float = 1.0,
                rows: Tensor | None = None) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """``(rows, batch)`` over the client's training split, reshuffled every epoch from the client's seed.

        Args:
            epochs: Passes over the data.
            fraction: Use only the first ``fraction`` of each epoch's shuffled order (at least one sample).
            rows: Instead, these positions of the split, in this order, every epoch (see :meth:`window`).
        """
        n = len(self.index)
        for _ in range(epochs):
            if rows is not None:
                order = rows
            else:
                order = torch.randperm(n, generator=self.order)
                if fraction < 1:
                    order = order[:max(1, int(fraction * n))]
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                samples = torch.from_numpy(self.index[batch.numpy()])
                yield batch, gather(self.fabric, self.tensors, samples)

    def window(self, fraction: float) -> Tensor:
        """A random contiguous run of ``max(1, int(fraction * n))`` positions of the client's training split, its
        start drawn from the client's seed: a fixed subset to pass as :meth:`batches`' ``rows``."""
        n = len(self.index)
        size = min(n, max(1, int(fraction * n)))
        start = int(torch.randint(0, n - size + 1, (1,), generator=self.order))
        return torch.arange(start, start + size)

    # -- training -------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def only(self, trainable: Iterable[str] | None) -> Iterator[None]:
        """Within the block only ``trainable`` tensors get gradients (``None``: all); the others are untouched by
        optimizer steps and cost no backward pass."""
        if trainable is None:
            yield
            return
        keep = set(trainable)
        unknown = keep - set(self.params)
        if unknown:
            raise KeyError(f"trainable names the model does not have: {sorted(unknown)[:5]}")
        frozen = [p for n, p in self.params.items() if n not in keep]
        for p in frozen:
            p.requires_grad_(False)
            p.grad = None
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def reset_optimizer(self, lr: float | None = None) -> None:
        """Clear the optimizer's state (momentum, Adam moments) and set its learning rate (default: this round's)."""
        self.optimizer.state.clear()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr if lr is None else lr
        self.optimizer.zero_grad(set_to_none=True)

    def _check(self, loss: Tensor) -> None:
        if not torch.isfinite(loss):
            raise Diverged(f"non-finite loss at step {self.steps}")

    def _record(self, loss: Tensor) -> None:
        self.last_loss = float(loss.detach())
        self._loss_sum += self.last_loss
        self.steps += 1

    def step(self, batch: dict[str, Tensor], rows: Tensor | None = None, loss: ExtraLoss | None = None,
             before_step: BeforeStep | None = None) -> Tensor:
        """One optimizer step on ``batch``: task loss plus ``loss(batch, out, rows)``, backward,
        ``before_step(trainable tensors)``, step. Returns the loss."""
        # The module is not wrapped (fedhb parallelises over clients), so --fabric.precision applies through here.
        with self.fabric.autocast():
            out = self.module.training_step(batch)
            value = out["loss"]
            if loss is not None:
                extra = loss(batch, out, rows if rows is not None else torch.arange(len(batch["labels"])))
                if extra is not None:
                    value = value + extra
        self._check(value)
        self.fabric.backward(value)
        # Under --fabric.precision 16-mixed the gradients are multiplied by the loss scale: divide it out first, so
        # before_step sees (and corrects) true gradients; the scaler's step then does not divide again.
        self.fabric.strategy.precision.unscale_gradients(getattr(self.optimizer, "optimizer", self.optimizer))
        if before_step is not None:
            before_step(self.trainable())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._record(value)
        return value.detach()

    def fit(self, epochs: int | None = None, trainable: Iterable[str] | None = None, loss: ExtraLoss | None = None,
            fraction: float = 1.0, before_step: BeforeStep | None = None, lr: float | None = None) -> float:
        """Train for ``epochs`` (default ``--federation.local_epochs``) with a fresh optimizer state.

        Args:
            epochs: Passes over the client's training split.
            trainable: Tensor names that are updated (default: all trainable tensors).
            loss: Extra loss term ``loss(batch, out, rows)`` added at every step.
            fraction: Fraction of each epoch's shuffled order to use.
            before_step: Gradient correction ``before_step(trainable tensors)`` at every step.
            lr: Learning rate of this call (default: the round's).

        Returns:
            The mean loss of this call's steps (NaN without data).
        """
        epochs = self.epochs if epochs is None else epochs
        steps, total = self.steps, self._loss_sum
        self.reset_optimizer(lr)
        self.module.train()
        with self.only(trainable):
            for rows, batch in self.batches(epochs, fraction):
                self.step(batch, rows, loss, before_step)
        done = self.steps - steps
        return (self._loss_sum - total) / done if done else float("nan")

    def gradients(self, batch: dict[str, Tensor], names: Iterable[str] | None = None, record: bool = True,
                  keep_rng: bool = False) -> State:
        """Gradients of the task loss on ``batch`` at the current tensors, without an optimizer step; under an fp16
        loss scaler they are computed on the scaled loss and unscaled, and an overflow gives zero gradients (a skipped
        step) and a lower scale, as in :meth:`step`.

        Args:
            batch: A batch from :meth:`batches`.
            names: Tensors to differentiate (default: all trainable ones); the others cost no backward pass.
            record: Count this as a local step in the reported loss and step count.
            keep_rng: Leave the global RNG (dropout masks) as it was, so that an auxiliary pass does not change the
                masks the main training sees.
        """
        names = self.names if names is None else list(names)
        rng = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []) if keep_rng \
            else contextlib.nullcontext()
        # Under --fabric.precision 16-mixed, differentiate the loss times the scaler's scale (as step()'s backward
        # does), so that small fp16 gradients do not underflow, and divide it out again.
        scaler = getattr(self.fabric.strategy.precision, "scaler", None)
        scaler = scaler if scaler is not None and scaler.is_enabled() else None
        with rng, self.only(names):
            with self.fabric.autocast():
                value = self.module.training_step(batch)["loss"]
            self._check(value)
            self.last_loss = float(value.detach())
            grads = torch.autograd.grad(value if scaler is None else scaler.scale(value),
                                        [self.params[n] for n in names], allow_unused=True)
        scale = 1.0 if scaler is None else float(scaler.get_scale())
        if record:
            self._record(value)
        out = {n: torch.zeros_like(self.params[n]) if g is None else g.detach() for n, g in zip(names, grads)}
        if scaler is not None:
            out = {n: g / scale for n, g in out.items()}
            if not all(bool(torch.isfinite(g).all()) for g in out.values()):
                # The scale overflowed: as the scaler's step would, skip (zero gradients) and lower the scale.
                scaler.update(scale * scaler.get_backoff_factor())
                out = {n: torch.zeros_like(g) for n, g in out.items()}
        return out

    def record(self, loss: Tensor) -> None:
        """Count one local step with ``loss`` (for updates an algorithm applies itself)."""
        self._check(loss)
        self._record(loss)

    @torch.no_grad()
    def features(self, tensors: State | None = None) -> Tensor:
        """Pooled features ``(n, hidden)`` of every training sample in split order, in eval mode, without gradients,
        under ``tensors`` if given (they stay loaded: reload the ones you train)."""
        if tensors is not None:
            self.load(tensors)
        was_training = self.module.training
        self.module.eval()
        out = []
        for start in range(0, len(self.index), self.eval_batch_size):
            samples = torch.from_numpy(self.index[start:start + self.eval_batch_size])
            batch = gather(self.fabric, self.tensors, samples)
            with self.fabric.autocast():
                out.append(self.client_module.features(batch).float())
        self.module.train(was_training)
        if not out:
            return torch.zeros(0, self.client_module.feature_size, device=self.device)
        return torch.cat(out)

    @property
    def mean_loss(self) -> float:
        """Mean loss over every recorded step of this client's round (0 without steps, as for an empty split)."""
        return self._loss_sum / max(1, self.steps)
