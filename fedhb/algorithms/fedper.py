"""FedPer."""

from __future__ import annotations

from fedhb.algorithms._ops import State, is_head
from fedhb.algorithms.fedavg import FedAvg


class FedPer(FedAvg):
    """FedPer (Arivazhagan et al., "Federated Learning with Personalization Layers", arXiv 1912.00818).

    Base layers are shared and averaged like FedAvg (sample-weighted); the personalization layers never leave the
    client. Both are trained together in every local step. Here the base is the LoRA adapter of the frozen backbone and
    the personalization layer is the classification head, so the averaged adapter is not a complete model and there is
    no global accuracy.
    """

    has_global_model = False

    def upload(self, state: State) -> State:
        return self.model_part(state, keep=lambda name: not is_head(name))
