"""FedRep."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedhb.algorithms._ops import State, is_head
from fedhb.algorithms.fedavg import FedAvg

if TYPE_CHECKING:
    from fedhb.algorithms.trainer import LocalTrainer


class FedRep(FedAvg):
    """FedRep (Collins et al., "Exploiting Shared Representations for Personalized Federated Learning",
    arXiv 2102.07078).

    A shared representation and a local head, trained in alternation: each round a client first trains its head for
    ``head_epochs`` with the representation fixed, then the representation for ``--federation.local_epochs`` with the
    head fixed. Only the representation is uploaded and averaged (sample-weighted); the head never leaves the client, so
    there is no global accuracy.

    Deliberate differences: the representation is the LoRA adapter of the frozen backbone (the paper trains the whole
    body); ``head_epochs`` defaults to 1 (the paper uses up to 10 head epochs per round; raise it to match, at a cost
    of one forward pass per sample and head epoch).

    Under ``--federation.client_batch`` it trains one client at a time (it alternates head and representation phases).
    """

    client_batchable = False

    has_global_model = False

    def __init__(self, head_epochs: int = 1) -> None:
        """
        Args:
            head_epochs: Epochs of head-only training before the representation's epochs.
        """
        if head_epochs < 1:
            raise ValueError(f"--algorithm.head_epochs must be >= 1, got {head_epochs!r}")
        super().__init__()
        self.head_epochs = head_epochs

    def upload(self, state: State) -> State:
        return self.model_part(state, keep=lambda name: not is_head(name))

    def local_update(self, trainer: LocalTrainer, state: State) -> None:
        head = [n for n in trainer.names if is_head(n)]
        body = [n for n in trainer.names if not is_head(n)]
        trainer.fit(self.head_epochs, trainable=head)
        trainer.fit(trainable=body)
