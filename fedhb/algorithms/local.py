"""Local training only."""

from __future__ import annotations

from fedhb.algorithms._ops import State
from fedhb.algorithms.base import Algorithm


class Local(Algorithm):
    """Each client trains alone and nothing is communicated: the floor every federated method must beat."""

    client_batchable = True  # plain local SGD: --federation.client_batch trains clients together

    def upload(self, state: State) -> State:
        return {}

    def aggregate(self, uploads: dict[int, State], num_samples: dict[int, int]) -> dict[int, State]:
        return {}
