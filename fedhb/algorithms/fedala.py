"""FedALA."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from fedhb.algorithms._ops import State, ala_weight_step
from fedhb.algorithms.base import algo_key
from fedhb.algorithms.fedavg import FedAvg

if TYPE_CHECKING:
    from fedhb.algorithms.trainer import LocalTrainer

LOCAL, WEIGHT, STARTED = algo_key("fedala", "local/"), algo_key("fedala", "weight/"), algo_key("fedala", "started")


class FedALA(FedAvg):
    """FedALA (Zhang et al., "FedALA: Adaptive Local Aggregation for Personalized Federated Learning",
    arXiv 2212.01197).

    Instead of overwriting its model with the global one, a client starts each round from
    ``theta = theta_local + (theta_global - theta_local) * W`` for its last ``layers`` trainable tensors (the lower
    ones take the global values), with element-wise weights ``W`` in [0, 1]. ``W`` starts at 1 and is learned on a
    random ``rand_percent`` % of the client's training data (one contiguous slice per round, drawn from the client's
    seed and visited in the same order every epoch, as the reference's ``utils/ALA.py``):
    ``W <- clip(W - eta * g * (theta_global - theta_local), 0, 1)`` with ``g`` the loss gradient at ``theta``;
    until the loss settles (standard deviation of the last ``num_pre_loss`` epoch losses below ``threshold``, at most
    ``max_start_epochs`` epochs) the first time, one epoch afterwards. Then the client trains as usual; the server
    averages like FedAvg. Clients are evaluated with their local models (after local training); the global model is
    evaluated on the union of test splits.

    Deliberate differences: tensors are counted over the trainable tensors (LoRA factors and head, in model order), so
    the default ``layers = 2`` adapts the head's weight and bias; the first weight learning is capped at
    ``max_start_epochs`` (the paper loops until the criterion holds); adaptive aggregation is skipped while the local
    and global models are equal (a client's first round), as in the paper's code.

    Client state: ``algo/fedala/local/*`` (the local model), ``algo/fedala/weight/*`` (``W``) and
    ``algo/fedala/started`` (whether the first, long weight learning is done).

    Under ``--federation.client_batch`` it trains one client at a time (it learns its aggregation weights in passes of
    its own).
    """

    client_batchable = False

    def __init__(self, layers: int = 2, eta: float = 1.0, rand_percent: int = 80, threshold: float = 0.1,
                 num_pre_loss: int = 10, max_start_epochs: int = 20) -> None:
        """
        Args:
            layers: Number of trainable tensors, counted from the end, that are aggregated adaptively.
            eta: Step size of the weight learning.
            rand_percent: Percentage of the client's training data used to learn the weights.
            threshold: Loss standard deviation under which the first weight learning stops.
            num_pre_loss: Number of recent epoch losses the standard deviation is taken over.
            max_start_epochs: Upper bound on the epochs of the first weight learning.
        """
        if layers < 1:
            raise ValueError(f"--algorithm.layers must be >= 1, got {layers!r}")
        if eta <= 0:
            raise ValueError(f"--algorithm.eta must be > 0, got {eta!r}")
        if not 0 < rand_percent <= 100:
            raise ValueError(f"--algorithm.rand_percent must be in (0, 100], got {rand_percent!r}")
        if threshold < 0 or num_pre_loss < 1 or max_start_epochs < 1:
            raise ValueError("--algorithm.threshold must be >= 0, --algorithm.num_pre_loss and "
                             f"--algorithm.max_start_epochs >= 1; got {threshold!r}, {num_pre_loss!r}, "
                             f"{max_start_epochs!r}")
        super().__init__()
        self.layers, self.eta, self.rand_percent = layers, eta, rand_percent
        self.threshold, self.num_pre_loss, self.max_start_epochs = threshold, num_pre_loss, max_start_epochs

    def adaptive(self, names: list[str]) -> list[str]:
        """The tensors aggregated adaptively: the last ``layers`` trainable ones."""
        return names[-self.layers:]

    def init_client_state(self, state: State, client: int) -> State:
        model = list(self.model_part(state))
        state.update({LOCAL + k: state[k].clone() for k in model})
        state.update({WEIGHT + k: torch.ones_like(state[k]) for k in self.adaptive(model)})
        state[STARTED] = torch.zeros((), dtype=torch.float64)
        return state

    def personalized_model(self, state: State) -> State:
        return {k: state[LOCAL + k] for k in self.names}

    def local_update(self, trainer: LocalTrainer, state: State) -> None:
        glob = trainer.read()
        local = trainer.to_device({k: state[LOCAL + k] for k in self.names})
        top = self.adaptive(self.names)
        if any(not torch.equal(glob[k], local[k]) for k in top):
            weights = trainer.to_device({k: state[WEIGHT + k] for k in top})
            weights = self.learn_weights(trainer, glob, local, weights, first=float(state[STARTED]) == 0)
            state.update({WEIGHT + k: w.cpu() for k, w in weights.items()})
            state[STARTED] = torch.ones((), dtype=torch.float64)
        trainer.fit()
        state.update({LOCAL + k: t.cpu() for k, t in trainer.read().items()})

    def learn_weights(self, trainer: LocalTrainer, glob: State, local: State, weights: State, first: bool) -> State:
        """Learn ``W`` and leave ``theta`` (global lower tensors, adaptively mixed top tensors) loaded."""
        top = list(weights)

        def mix() -> State:
            return {k: local[k] + (glob[k] - local[k]) * weights[k] for k in top}

        trainer.load(mix())  # the lower tensors already hold the global values
        losses: list[float] = []
        last = float("nan")
        # One random contiguous slice of the training split per round, in the same order every epoch, as the
        # reference's DataLoader(train_data[rand_idx:rand_idx + rand_num]) is.
        rows = trainer.window(self.rand_percent / 100)
        for _ in range(self.max_start_epochs if first else 1):
            for _, batch in trainer.batches(1, rows=rows):
                grads = trainer.gradients(batch, names=top, record=False)
                weights = {k: ala_weight_step(weights[k], grads[k], glob[k], local[k], self.eta) for k in top}
                trainer.load(mix())
                last = trainer.last_loss
            losses.append(last)
            if len(losses) > self.num_pre_loss and float(np.std(losses[-self.num_pre_loss:])) < self.threshold:
                break
        return weights
