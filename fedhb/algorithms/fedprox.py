"""FedProx."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fedhb.algorithms._ops import State
from fedhb.algorithms.fedavg import FedAvg

if TYPE_CHECKING:
    from fedhb.algorithms.trainer import LocalTrainer


class FedProx(FedAvg):
    """FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", arXiv 1812.06127).

    Local training minimizes ``loss + mu / 2 * ||w - w_t||^2``, where ``w_t`` is the model the client started the round
    from (the global model it received); the server averages like FedAvg (sample-weighted).

    Deliberate differences: the proximal term covers the trainable tensors only (LoRA matrices and head; the frozen
    backbone is identical everywhere), and every client runs the same number of local epochs (the paper's partial work
    of stragglers is not simulated). With ``mu = 0`` the numbers are exactly FedAvg's.
    """

    client_batchable = True  # each client's proximal term is computed on its own rows of a shared pass

    def __init__(self, mu: float = 0.01) -> None:
        """
        Args:
            mu: Weight of the proximal term (the paper tries 0.001 to 1).
        """
        if mu < 0:
            raise ValueError(f"--algorithm.mu must be >= 0, got {mu!r}")
        super().__init__()
        self.mu = mu

    def local_update(self, trainer: LocalTrainer, state: State) -> None:
        anchor = trainer.read()  # w_t: the model the client starts the round from

        def proximal(batch: dict[str, Tensor], out: dict[str, Tensor], rows: Tensor) -> Tensor:
            # Tensors frozen in a phase are absent from trainable(); they do not move, so their term is constant.
            terms = [(p - anchor[n]).pow(2).sum() for n, p in trainer.trainable().items()]
            return 0.5 * self.mu * torch.stack(terms).sum()

        trainer.fit(loss=proximal)
