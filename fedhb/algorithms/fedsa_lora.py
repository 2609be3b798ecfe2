"""FedSA-LoRA."""

from __future__ import annotations

from fedhb.algorithms._ops import State
from fedhb.algorithms.fedavg import FedAvg
from fedhb.models.lora import is_lora_a


class FedSALoRA(FedAvg):
    """FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning",
    arXiv 2410.01463).

    The paper finds that LoRA's A matrices learn what clients share and the B matrices what is specific to each, so
    only A is uploaded and averaged (sample-weighted); every client keeps its own B, which the server never sees or
    changes. Both are trained locally. The classification head stays local too (it is as client-specific as B and is
    treated like EPFL's), so there is no single global model.
    """

    has_global_model = False

    def upload(self, state: State) -> State:
        return self.model_part(state, keep=is_lora_a)
