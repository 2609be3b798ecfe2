"""MOON."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fedhb.algorithms._ops import State, model_contrastive_loss
from fedhb.algorithms.base import algo_key
from fedhb.algorithms.fedavg import FedAvg

if TYPE_CHECKING:
    from fedhb.algorithms.trainer import LocalTrainer

PREVIOUS = algo_key("moon", "prev/")


class MOON(FedAvg):
    """Model-Contrastive Federated Learning (Li, He and Song, arXiv 2103.16257).

    Local training adds ``mu * l_con`` to the loss, where ``l_con`` pulls the representation ``z`` of each sample
    toward ``z_glob``, that of the global model the client received, and away from ``z_prev``, that of the client's
    own model after its previous round: ``-log(e^{cos(z, z_glob)/t} / (e^{cos(z, z_glob)/t} + e^{cos(z, z_prev)/t}))``.
    The server averages like FedAvg.

    Deliberate differences: the representation is the backbone's pooled feature (the input of the classification head)
    rather than the output of an added projection head; ``z_glob`` and ``z_prev`` come from models that do not change
    during the round, so they are computed once per round for the client's training samples (in eval mode, without
    dropout) instead of by two extra forward passes per step; one previous model is kept (the paper's buffer size 1).
    Before a client's first round its previous model is the initial model, as in the paper's code.

    Client state: ``algo/moon/prev/*`` (the model after the client's last local training).

    Under ``--federation.client_batch`` it trains one client at a time (its contrastive term needs passes of the global
    and previous models).
    """

    client_batchable = False

    def __init__(self, mu: float = 1.0, temperature: float = 0.5) -> None:
        """
        Args:
            mu: Weight of the model-contrastive term (the paper uses 0.1 to 10; 1 or 5 on most tasks).
            temperature: Temperature ``t`` of the cosine similarities.
        """
        if mu < 0:
            raise ValueError(f"--algorithm.mu must be >= 0, got {mu!r}")
        if temperature <= 0:
            raise ValueError(f"--algorithm.temperature must be > 0, got {temperature!r}")
        super().__init__()
        self.mu, self.temperature = mu, temperature

    def init_client_state(self, state: State, client: int) -> State:
        state.update({PREVIOUS + k: v.clone() for k, v in self.model_part(state).items()})
        return state

    def local_update(self, trainer: LocalTrainer, state: State) -> None:
        received = trainer.read()
        z_glob = trainer.features()
        z_prev = trainer.features({k: state[PREVIOUS + k] for k in self.names})
        trainer.load(received)

        def contrastive(batch: dict, out: dict, rows: torch.Tensor) -> torch.Tensor:
            rows = rows.to(z_glob.device)
            return self.mu * model_contrastive_loss(out["features"].float(), z_glob[rows], z_prev[rows],
                                                    self.temperature)

        trainer.fit(loss=contrastive)
        state.update({PREVIOUS + k: t.cpu() for k, t in trainer.read().items()})
