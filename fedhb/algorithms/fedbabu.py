"""FedBABU."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fedhb.algorithms._ops import State, is_head
from fedhb.algorithms.base import algo_key
from fedhb.algorithms.fedavg import FedAvg

if TYPE_CHECKING:
    from fedhb.algorithms.trainer import LocalTrainer

#: What fine-tuning added to the client's model: its personalized model is its model plus this.
DELTA = algo_key("fedbabu", "delta/")


class FedBABU(FedAvg):
    """FedBABU (Oh et al., "FedBABU: Towards Enhanced Representation for Federated Image Classification",
    arXiv 2106.06042).

    The head stays at its random initialisation (the same on every client) for the whole federated training: clients
    train the body only and upload it; the server averages the bodies (sample-weighted, as FedAvg). A client is
    scored after fine-tuning: ``fine_tune_epochs`` epochs of the whole model (``fine_tune="all"``, the paper's and
    PFLlib's ``clientbabu.py::fine_tune`` default) or of the head alone (``"head"``). Here the body is the LoRA
    adapter of the frozen backbone and the head the classification head.

    Deliberate difference: the paper fine-tunes the final global model; fedhb scores a client with what
    :meth:`personalized_model` derives from its state without training, so each client fine-tunes right after its
    local training and keeps what fine-tuning changed, ``delta``; its personalized model is its current model plus
    ``delta``. Scored right after local training (``--federation.eval_protocol fhbench``) that is the fine-tuned
    local model; scored after aggregation it is the new global body with the client's fine-tuning step on top. The
    fine-tuning steps count in the reported training loss. The global model is the averaged body with the initial
    head.

    Client state: ``algo/fedbabu/delta/*``.

    Under ``--federation.client_batch`` it trains one client at a time (it trains the body and then fine-tunes the head,
    in two phases).
    """

    client_batchable = False

    def __init__(self, fine_tune_epochs: int = 1, fine_tune: str = "all") -> None:
        """
        Args:
            fine_tune_epochs: Epochs of fine-tuning that give the personalized model (the paper uses 1 to 5).
            fine_tune: ``all`` (body and head) or ``head``.
        """
        if fine_tune_epochs < 0:
            raise ValueError(f"--algorithm.fine_tune_epochs must be >= 0, got {fine_tune_epochs!r}")
        if fine_tune not in ("all", "head"):
            raise ValueError(f"--algorithm.fine_tune must be all or head, got {fine_tune!r}")
        super().__init__()
        self.fine_tune_epochs, self.fine_tune = fine_tune_epochs, fine_tune
        self._head: State = {}

    def setup(self, names: list[str], initial: State | None = None, num_clients: int | None = None) -> None:
        super().setup(names, initial, num_clients)
        if initial is None:
            raise ValueError("FedBABU needs the initial model in setup() to keep its random head")
        self._head = {k: v.clone() for k, v in initial.items() if is_head(k)}

    def init_client_state(self, state: State, client: int) -> State:
        state.update({DELTA + k: torch.zeros_like(v) for k, v in self.model_part(state).items()})
        return state

    def upload(self, state: State) -> State:
        return self.model_part(state, keep=lambda name: not is_head(name))

    def personalized_model(self, state: State) -> State:
        return {k: state[k] + state[DELTA + k] for k in self.names}

    def local_update(self, trainer: LocalTrainer, state: State) -> None:
        body = [n for n in trainer.names if not is_head(n)]
        trainer.fit(trainable=body)
        trained = trainer.read()
        tuned = trained
        if self.fine_tune_epochs > 0:
            trainer.fit(self.fine_tune_epochs,
                        trainable=None if self.fine_tune == "all" else [n for n in trainer.names if is_head(n)])
            tuned = trainer.read()
            trainer.load(trained)  # what the client keeps and uploads: the body trained under the initial head
        state.update({DELTA + k: (tuned[k] - trained[k]).cpu() for k in self.names})

    def global_state(self) -> State | None:
        return None if self._global is None else {**self._global, **self._head}
