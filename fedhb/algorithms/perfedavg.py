"""Per-FedAvg."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fedhb.algorithms._ops import State
from fedhb.algorithms.base import algo_key
from fedhb.algorithms.fedavg import FedAvg

if TYPE_CHECKING:
    from fedhb.algorithms.trainer import LocalTrainer

Batch = dict[str, Tensor]
#: The client's one adaptation step ``-alpha * grad``: its personalized model is its model plus this.
DELTA = algo_key("perfedavg", "delta/")


class PerFedAvg(FedAvg):
    """Per-FedAvg (Fallah et al., "Personalized Federated Learning: A Meta-Learning Approach", arXiv 2002.07948),
    first-order version (Per-FedAvg (FO)), as PFLlib's ``clientperavg.py`` runs it.

    Each local step takes two batches ``D, D'``: ``w' = w - alpha grad f(w; D)`` (the inner, adaptation step), then
    ``w <- w - beta grad f(w'; D')`` (the first-order meta-step: the gradient at the adapted point, applied to
    ``w``). The server averages like FedAvg (sample-weighted). A client's personalized model is its model after one
    more adaptation step, ``w - alpha grad f(w; D'')`` on a fresh batch, as PFLlib's ``train_one_step`` before it
    evaluates.

    Deliberate differences: the two batches of a step are two consecutive batches of ``--federation.batch_size``
    of the epoch's order (PFLlib draws one batch of twice the size and halves it, the same thing); an unpaired last
    batch is split in two halves (a batch of one sample is used for both). Both steps are plain SGD whatever
    ``--optim.name`` says, as PFLlib's ``PerAvgOptimizer``, each counted as a local step in the reported loss (the
    loss of ``D``). The adaptation step is taken right after local training and kept as ``delta = -alpha grad``;
    the personalized model is the client's current model plus ``delta`` (after aggregation: the new global model
    with the client's last adaptation step, whose gradient was taken at the client's model).

    Client state: ``algo/perfedavg/delta/*``.

    Under ``--federation.client_batch`` it trains one client at a time (its meta-gradient steps take gradients at
    several points).
    """

    client_batchable = False

    def __init__(self, alpha: float | None = None, beta: float | None = None) -> None:
        """
        Args:
            alpha: Step size of the adaptation step (default: the round's learning rate, as PFLlib).
            beta: Step size of the meta-step (default: the round's learning rate, as PFLlib).
        """
        for flag, value in (("alpha", alpha), ("beta", beta)):
            if value is not None and value <= 0:
                raise ValueError(f"--algorithm.{flag} must be > 0, got {value!r}")
        super().__init__()
        self.alpha, self.beta = alpha, beta

    def init_client_state(self, state: State, client: int) -> State:
        state.update({DELTA + k: torch.zeros_like(v) for k, v in self.model_part(state).items()})
        return state

    def personalized_model(self, state: State) -> State:
        return {k: state[k] + state[DELTA + k] for k in self.names}

    def local_update(self, trainer: LocalTrainer, state: State) -> None:
        alpha = trainer.lr if self.alpha is None else self.alpha
        beta = trainer.lr if self.beta is None else self.beta
        trainer.module.train()
        for _ in range(trainer.epochs):
            for inner, outer in _pairs(batch for _, batch in trainer.batches(1)):
                w = trainer.read()
                g = trainer.gradients(inner)
                trainer.load({k: w[k] - alpha * g[k] for k in trainer.names})
                g = trainer.gradients(outer, record=False)
                trainer.load({k: w[k] - beta * g[k] for k in trainer.names})
        fresh = next(trainer.batches(1), None)
        if fresh is None:
            return
        g = trainer.gradients(fresh[1], record=False)
        state.update({DELTA + k: (-alpha * g[k]).cpu() for k in self.names})


def _pairs(batches: Iterable[Batch]) -> Iterator[tuple[Batch, Batch]]:
    """An epoch's batches two by two; an unpaired last batch is halved (or used twice when it has one sample)."""
    pending = None
    for batch in batches:
        if pending is None:
            pending = batch
            continue
        yield pending, batch
        pending = None
    if pending is not None:
        n = len(pending["labels"])
        half = max(1, n // 2)
        first = {k: v[:half] for k, v in pending.items()}
        yield first, ({k: v[half:] for k, v in pending.items()} if n > 1 else first)
