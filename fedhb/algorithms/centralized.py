"""Centralized training: the reference every federated method is measured against."""

from __future__ import annotations

from fedhb.algorithms._ops import State
from fedhb.algorithms.fedavg import FedAvg


class Centralized(FedAvg):
    """All clients' training data pooled on one model: the upper bound next to :class:`~fedhb.algorithms.Local`.

    Client 0 trains on the union of every client's training split (in sample-index order, shuffled each epoch like
    any client's data); the other clients train on nothing. After each round every client receives client 0's model,
    so each client's test split scores the centrally trained model and the global accuracy is that model's accuracy
    on the union of the test splits. Validation and test splits are the federation's, so the numbers compare directly.
    With one client it is plain training on that client's data.

    Not a federated method: ``bytes_up``/``bytes_down`` only count the copies of the model handed to the clients for
    evaluation. Use it with ``--federation.fraction 1`` (rounds where client 0 is not selected train nothing) and the
    default ``after_aggregation`` evaluation protocol.
    """

    pools_training_data = True  # fedhb.build.training_splits moves every training split to client 0

    def aggregate(self, uploads: dict[int, State], num_samples: dict[int, int]) -> dict[int, State]:
        if 0 not in uploads:
            return {}
        self._global = {k: v.clone() for k, v in uploads[0].items()}
        return {i: self._global for i in sorted(uploads)}
