"""Client-batched local training (``--federation.client_batch K``): K clients of a process take their local steps
together.

The clients a process trains in a round share one frozen backbone, so a step of K clients is one forward and one
backward pass over their K batches concatenated: each sample goes through its own client's LoRA factors (one batched
matmul over the stacked adapters, :class:`fedhb.models.lora.RoutedAdapters`, as multi-LoRA serving does in Punica,
arXiv 2310.18547, and S-LoRA, arXiv 2311.03285) and its own client's head. Each client's loss is the mean over its own
batch, and the pass differentiates their sum, so every client gets exactly the gradient of its own loss; each client
then steps its own optimizer (fresh state, as :meth:`~fedhb.algorithms.trainer.LocalTrainer.fit` starts it) on its
own copies of its tensors. Data order, learning rate and step count are each client's own, so the numbers are those
of sequential training up to float rounding. A client whose batches run out stops stepping (its optimizer is left
alone) while the others go on; a client whose loss is not finite fails alone, as it would sequentially.

Which clients may share a pass:

- the algorithm declares :attr:`~fedhb.algorithms.base.Algorithm.client_batchable`: its ``local_update`` makes one
  ``trainer.fit`` call (any ``epochs``, ``trainable``, ``fraction``, ``lr``) whose ``loss`` / ``before_step``
  closures read only their arguments and the trainer's tensors (FedProx's proximal term), and nothing after it;
- the model: one modality (no fusion of present/absent modalities), the task's default ``forward`` (the head on the
  features), trainable tensors only in the LoRA factors and the head, no batch norm (it mixes samples);
- the precision: no fp16 loss scaler (``16-mixed`` scales and skips steps for the whole pass);
- no client runs its adapters at a rank of its own (FLoRA, HetLoRA).

Anything else trains one client at a time, as with ``client_batch 1``. Dropout masks are drawn for the concatenated
batch, so with dropout the numbers differ from sequential training's (same distribution); without, they are equal.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fedhb.algorithms.trainer import BeforeStep, ExtraLoss, LocalTrainer
from fedhb.client import lr_at
from fedhb.models.lora import RANK_KEY, RoutedAdapters, RoutingError, is_lora
from fedhb.seeds import client_seed
from fedhb.tasks.base import Task

__all__ = ["ClientBatcher"]

#: The head's tensors are named ``head.<...>`` (see :mod:`fedhb.algorithms._ops`).
_HEAD = "head."


class _Fallback(Exception):
    """The clients cannot share this pass after all (found before any of them stepped): train them one by one."""


@dataclass
class _Fit:
    """The arguments of a client's one ``trainer.fit`` call."""

    epochs: int
    trainable: list[str] | None
    loss: ExtraLoss | None
    fraction: float
    before_step: BeforeStep | None
    lr: float | None


class _ClientTrainer(LocalTrainer):
    """One client's :class:`LocalTrainer` within a batch: it holds the client's own copies of its trainable tensors
    (what the shared pass trains) and records the algorithm's ``fit`` call instead of running it."""

    def __init__(self, *args: Any, tensors_of_client: dict[str, nn.Parameter], algorithm: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params = tensors_of_client
        self.names = list(tensors_of_client)
        self.plan: _Fit | None = None
        self._algorithm = algorithm

    def fit(self, epochs: int | None = None, trainable: Any = None, loss: ExtraLoss | None = None,
            fraction: float = 1.0, before_step: BeforeStep | None = None, lr: float | None = None) -> float:
        if self.plan is not None:
            self._refuse("fit twice")
        self.plan = _Fit(self.epochs if epochs is None else epochs, None if trainable is None else list(trainable),
                         loss, fraction, before_step, lr)
        return math.nan  # the batch trains later; no client_batchable algorithm reads this

    def _refuse(self, what: str) -> None:
        raise RuntimeError(f"{self._algorithm} sets client_batchable = True, but its local_update calls "
                           f"trainer.{what}; set client_batchable = False on it (use --federation.client_batch 1)")

    def step(self, *args: Any, **kwargs: Any) -> Tensor:
        self._refuse("step")
        raise AssertionError

    def gradients(self, *args: Any, **kwargs: Any) -> Any:
        self._refuse("gradients")

    def features(self, *args: Any, **kwargs: Any) -> Tensor:
        self._refuse("features")
        raise AssertionError

    def record(self, *args: Any, **kwargs: Any) -> None:
        self._refuse("record")

    def count(self, loss: float) -> None:
        """One local step with ``loss`` (as :meth:`LocalTrainer.step` records it)."""
        self.last_loss = loss
        self._loss_sum += loss
        self.steps += 1


class _RoutedHead(nn.Module):
    """The head, each client's rows through its own client's head tensors."""

    def __init__(self, head: nn.Module, clients: Sequence[Mapping[str, Tensor]], sizes: list[int]) -> None:
        super().__init__()
        self.inner = head
        self.clients, self.sizes = clients, sizes

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] != sum(self.sizes):
            raise RoutingError(f"the head saw {x.shape[0]} rows for {sum(self.sizes)} samples")
        parts = x.split(self.sizes)
        return torch.cat([torch.func.functional_call(self.inner, dict(own), (part,))
                          for own, part in zip(self.clients, parts)])


#: A client's outcome of a shared pass: ``(mean loss, steps, failure)``, as :class:`fedhb.loop.ClientStatus` holds it.
Outcome = tuple[float, int, "str | None"]


class ClientBatcher:
    """Trains a process's clients in groups of up to ``--federation.client_batch`` (see the module docstring).

    Args:
        loop: The :class:`~fedhb.loop.FederatedLoop` whose clients it trains (this module does not import the loop,
            which imports it).
    """

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self.size = int(getattr(loop.args, "client_batch", 1))
        self.adapters = RoutedAdapters(loop.client_module)
        self._reason: str | None | bool = False  # False: not checked yet
        self.fell_back = 0  # groups that turned out not to fit one pass (after the checks said they would)

    # -- which clients ------------------------------------------------------------------------------------------------
    def unsupported(self) -> str | None:
        """Why this run's clients train one at a time (``None``: they may share passes). Checked once."""
        if self._reason is False:
            self._reason = self._check()
        return self._reason  # type: ignore[return-value]

    def _check(self) -> str | None:
        loop = self.loop
        if self.size <= 1:
            return "--federation.client_batch 1"
        if not getattr(loop.algorithm, "client_batchable", False):
            return f"{type(loop.algorithm).__name__}'s local update trains one client at a time"
        scaler = getattr(loop.fabric.strategy.precision, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            return "the fp16 loss scaler (--fabric.precision 16-mixed) scales and skips the whole pass"
        module = loop.client_module
        if module.multimodal:
            return "a multimodal model"
        if type(module.task).forward is not Task.forward:
            return f"{type(module.task).__name__} has its own forward"
        others = [n for n in module.trainable() if not (is_lora(n) or n.startswith(_HEAD))]
        if others:
            return f"trainable tensors outside the LoRA factors and the head ({others[0]}, ...)"
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
            return "batch norm mixes the samples of a batch"
        inner = getattr(loop.optimizer, "optimizer", loop.optimizer)
        if len(inner.param_groups) != 1:
            return "an optimizer with several parameter groups"
        return self.adapters.unsupported()

    def groups(self, clients: list[int]) -> list[list[int]]:
        """``clients`` (this rank's) in groups that train together, or one each when they cannot.

        Groups are runs of up to ``client_batch`` clients in order of training-set size, largest first, so that
        clients with about as many local steps share passes and few passes run with a group's last clients alone.
        Clients are independent, so the grouping changes no number.
        """
        if self.unsupported() is not None:
            return [[c] for c in clients]
        order = sorted(clients, key=lambda c: (-self.loop.num_train[c], c))
        return [order[i:i + self.size] for i in range(0, len(order), self.size)]

    # -- training -------------------------------------------------------------------------------------------------
    def train(self, clients: list[int], rnd: int) -> dict[int, Outcome] | None:
        """Local training of ``clients`` (one group) in shared passes: each client's outcome as
        :meth:`FederatedLoop.train_client` reports it, and each state updated as it would update it; ``None`` when
        they must train one at a time after all (the loop then trains them itself)."""
        if len(clients) == 1 or any(RANK_KEY in self.loop.states[c] for c in clients):
            return None
        try:
            return self._train_together(clients, rnd)
        except _Fallback as why:
            self.fell_back += 1
            self._reason = str(why)  # the model does not route: the next rounds train one at a time at once
            return None

    def _trainer(self, cid: int, rnd: int) -> _ClientTrainer:
        loop, args = self.loop, self.loop.args
        params = loop.client_module.trainable()
        state = loop.states[cid]
        own = {n: nn.Parameter(state[n].detach().to(device=p.device, dtype=p.dtype, copy=True))
               for n, p in params.items()}
        return _ClientTrainer(
            loop.fabric, loop.module, loop.client_module, loop.optimizer, loop.tensors, loop.splits[cid].train,
            epochs=args.local_epochs, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
            lr=lr_at(loop.optim, rnd, args.rounds), optim=loop.optim, seed=client_seed(loop.seed, rnd, cid),
            round=rnd, rounds=args.rounds, client=cid, tensors_of_client=own,
            algorithm=type(loop.algorithm).__name__)

    def _optimizer(self, trainer: _ClientTrainer, plan: _Fit) -> torch.optim.Optimizer:
        """A fresh optimizer like the process's, over the client's own tensors (what ``reset_optimizer`` gives)."""
        inner = getattr(self.loop.optimizer, "optimizer", self.loop.optimizer)
        options = {k: v for k, v in inner.param_groups[0].items() if k != "params"}
        kind: Any = type(inner)
        optimizer: torch.optim.Optimizer = kind(list(trainer.params.values()), lr=trainer.lr)
        optimizer.param_groups[0].update(options)
        optimizer.param_groups[0]["lr"] = trainer.lr if plan.lr is None else plan.lr
        return optimizer

    def _train_together(self, clients: list[int], rnd: int) -> dict[int, Outcome]:
        from contextlib import ExitStack

        loop = self.loop
        trainers = [self._trainer(c, rnd) for c in clients]
        for cid, trainer in zip(clients, trainers):
            loop.algorithm.local_update(trainer, loop.states[cid])
            if trainer.plan is None:
                trainer._refuse("nothing (no fit)")
        plans = [t.plan for t in trainers]
        assert all(p is not None for p in plans)
        optimizers = [self._optimizer(t, p) for t, p in zip(trainers, plans)]  # type: ignore[arg-type]
        # Dropout masks come from the global RNG, seeded as for the group's last client trained alone (they differ
        # from sequential training's anyway: drawn for the whole pass).
        torch.manual_seed(client_seed(loop.seed, rnd, clients[-1]))
        loop.module.train()
        failures: dict[int, str] = {}
        with ExitStack() as stack:
            for t, p in zip(trainers, plans):
                stack.enter_context(t.only(p.trainable))  # type: ignore[union-attr]
            streams: list[Iterator[tuple[Tensor, dict[str, Tensor]]] | None] = [
                t.batches(p.epochs, p.fraction) for t, p in zip(trainers, plans)]  # type: ignore[union-attr]
            first = True
            while True:
                parts = []
                for k, stream in enumerate(streams):
                    if stream is None:
                        continue
                    item = next(stream, None)
                    if item is None:
                        streams[k] = None
                        continue
                    parts.append((k, *item))
                if not parts:
                    break
                try:
                    failed = self._step(trainers, plans, optimizers, parts)  # type: ignore[arg-type]
                except RoutingError as err:
                    if not first:
                        raise
                    raise _Fallback(f"the model's layers do not see one row per sample ({err})") from None
                first = False
                for k in failed:
                    failures[k] = f"non-finite loss at step {trainers[k].steps}"
                    streams[k] = None
        out: dict[int, Outcome] = {}
        for k, (cid, trainer) in enumerate(zip(clients, trainers)):
            new = trainer.params
            failure = failures.get(k)
            if failure is None and not all(torch.isfinite(v).all() for v in new.values()):
                failure = "non-finite parameters after training"
            if failure is not None:  # the state is untouched: training changed only the client's own copies
                out[cid] = (math.nan, trainer.steps, failure)
                continue
            state = loop.states[cid]
            with torch.no_grad():
                for name, value in new.items():  # into the state's own buffers, as the loop's store() writes
                    state[name].copy_(value)
            out[cid] = (trainer.mean_loss, trainer.steps, None)
        # The model as sequential training leaves it: the last client's model as it is scored.
        last = loop.states[clients[-1]]
        loop.load(loop.algorithm.personalized_model(last) if failures.get(len(clients) - 1) is None else last)
        return out

    def _step(self, trainers: list[_ClientTrainer], plans: list[_Fit], optimizers: list[torch.optim.Optimizer],
              parts: list[tuple[int, Tensor, dict[str, Tensor]]]) -> list[int]:
        """One optimizer step of every client in ``parts`` (``(client position, rows, batch)``) in one pass; returns
        the positions whose loss was not finite (they do not step)."""
        loop = self.loop
        module = loop.client_module
        keys = list(parts[0][2])
        batch = {key: torch.cat([b[key] for _, _, b in parts]) for key in keys}
        sizes = [len(rows) for _, rows, _ in parts]
        own = [trainers[k].params for k, _, _ in parts]
        heads = [{n[len(_HEAD):]: v for n, v in p.items() if n.startswith(_HEAD)} for p in own]
        head = module.head
        values: list[Tensor] = []
        try:
            module.head = _RoutedHead(head, heads, sizes)
            with self.adapters.route(own, sizes), loop.fabric.autocast():
                out = loop.module.training_step(batch)
                start = 0
                for (k, rows, b), size in zip(parts, sizes):
                    rows_of = slice(start, start + size)
                    mine = {"logits": out["logits"][rows_of], "features": out["features"][rows_of]}
                    value = mine["loss"] = module.task.loss(mine["logits"], module.task.targets(b))
                    plan = plans[k]
                    if plan.loss is not None:
                        extra = plan.loss(b, mine, rows)
                        if extra is not None:
                            value = value + extra
                    values.append(value)
                    start += size
        finally:
            module.head = head
        losses = torch.stack([v.detach().float() for v in values]).tolist()  # one device sync per step
        finite = [math.isfinite(x) for x in losses]
        total = sum(v for v, ok in zip(values, finite) if ok)
        if isinstance(total, Tensor):
            loop.fabric.backward(total)
        failed = []
        for (k, _, _), loss, ok in zip(parts, losses, finite):
            if not ok:
                failed.append(k)
                continue
            trainer, plan = trainers[k], plans[k]
            if plan.before_step is not None:
                plan.before_step(trainer.trainable())
            optimizers[k].step()
            optimizers[k].zero_grad(set_to_none=True)
            trainer.count(loss)
        return failed
