"""Ditto."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fedhb.algorithms._ops import State
from fedhb.algorithms.base import algo_key
from fedhb.algorithms.fedavg import FedAvg

if TYPE_CHECKING:
    from fedhb.algorithms.trainer import LocalTrainer

PERSONAL = algo_key("ditto", "v/")


class Ditto(FedAvg):
    """Ditto (Li et al., "Ditto: Fair and Robust Federated Learning Through Personalization", arXiv 2012.04221).

    Each client keeps a personal model ``v`` next to its copy of the global model. In a round it trains the global model
    from the received ``w_t`` as FedAvg does (that is what it uploads), and trains ``v`` for ``personal_epochs`` on
    ``loss(v) + lam / 2 * ||v - w_t||^2``. Clients are evaluated with ``v``; the global model is the FedAvg average.

    Deliberate differences: the proximal term covers the trainable tensors (LoRA and head); the global update runs
    before the personal one (both start from ``w_t``, so only the data order differs from the paper's listing, and the
    global model is then exactly FedAvg's).

    Client state: ``algo/ditto/v/*``.

    Under ``--federation.client_batch`` it trains one client at a time (it trains the personal model in a second pass).
    """

    client_batchable = False

    def __init__(self, lam: float = 0.1, personal_epochs: int | None = None) -> None:
        """
        Args:
            lam: Weight of the pull of the personal model toward the global one (the paper tries 0.05 to 2).
            personal_epochs: Local epochs of the personal model (default: ``--federation.local_epochs``).
        """
        if lam < 0:
            raise ValueError(f"--algorithm.lam must be >= 0, got {lam!r}")
        if personal_epochs is not None and personal_epochs < 1:
            raise ValueError(f"--algorithm.personal_epochs must be >= 1, got {personal_epochs!r}")
        super().__init__()
        self.lam, self.personal_epochs = lam, personal_epochs

    def init_client_state(self, state: State, client: int) -> State:
        state.update({PERSONAL + k: v.clone() for k, v in self.model_part(state).items()})
        return state

    def personalized_model(self, state: State) -> State:
        return {k: state[PERSONAL + k] for k in self.names}

    def local_update(self, trainer: LocalTrainer, state: State) -> None:
        w_t = trainer.read()
        trainer.fit()
        w_new = trainer.read()

        def pull(batch: dict, out: dict, rows: torch.Tensor) -> torch.Tensor:
            return 0.5 * self.lam * torch.stack([(p - w_t[n]).pow(2).sum() for n, p in trainer.params.items()]).sum()

        trainer.load({k: state[PERSONAL + k] for k in self.names})
        trainer.fit(self.personal_epochs, loss=pull)
        state.update({PERSONAL + k: t.cpu() for k, t in trainer.read().items()})
        trainer.load(w_new)
