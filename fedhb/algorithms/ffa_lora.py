"""FFA-LoRA."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedhb.algorithms._ops import State
from fedhb.algorithms.fedavg import FedAvg
from fedhb.models.lora import is_lora_a

if TYPE_CHECKING:
    from fedhb.algorithms.trainer import LocalTrainer


class FFALoRA(FedAvg):
    """FFA-LoRA (Sun et al., "Improving LoRA in Privacy-Preserving Federated Learning", arXiv 2403.12313).

    Every A matrix stays frozen at its random initial value (the same on every client, since the run seeds the
    initial model), so the model is linear in the trained B matrices and averaging B gives exactly the average LoRA
    update, which averaging A and B separately does not. Clients train B and the classification head; both are
    uploaded and averaged (sample-weighted) into one global model. A is never trained, sent or received.
    """

    client_batchable = True  # one fit with A frozen: --federation.client_batch trains clients together

    def upload(self, state: State) -> State:
        return self.model_part(state, keep=lambda name: not is_lora_a(name))

    def local_update(self, trainer: LocalTrainer, state: State) -> None:
        trainer.fit(trainable=[n for n in trainer.names if not is_lora_a(n)])
