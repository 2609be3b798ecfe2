"""EPFL from FHBench."""

from __future__ import annotations

import torch

from fedhb.algorithms._ops import State, inverse_distance_weights, pairwise_distance
from fedhb.algorithms.base import Algorithm
from fedhb.models.lora import is_lora, lora_pairs, select_layers


class EPFL(Algorithm):
    """Efficient Personalized FL (FHBench, arXiv 2504.10817): similarity-weighted mixing of LoRA A matrices.

    Each client uploads its LoRA A and B matrices. For clients ``i`` and ``j`` the server computes ``d_ij``, the mean
    over the selected LoRA layers of ``||B_i - B_j||_F``, turns ``1/d_ij`` into weights ``w_ij`` normalized over
    ``j != i``, and sends client ``i`` the new A matrices ``lam * A_i + (1 - lam) * sum_{j != i} w_ij A_j``. B matrices
    and the head never leave the client.

    This is what FHBench's released code (wph6/FHBench, ``ViT_Lora/core/comm.py``, ``NLP_Lora/core/comm.py`` and
    ``Audio_Lora/core/comm.py``: ``cal_sim_mat`` and the ``EPFL`` branch of ``global_aggregate``) computes, with
    ``lam`` its ``model_momentum``. Its time-series branch (``Timeseries_Lora/core/comm.py``) differs: every client
    receives the same uniform mean of the A matrices, and its ``moment_lora_fed.py`` calls ``cal_sim_mat`` with one
    of its two arguments, so that branch does not run as released. For three clients with B distances
    ``d_01 = 5``, ``d_02 = 1``, ``d_12 = sqrt(18)`` and ``lam = 0.5``, client 0 gets
    ``0.5 A_0 + 0.5 (A_1 / 6 + 5 A_2 / 6)`` here and in the ViT branch, ``(A_0 + A_1 + A_2) / 3`` in the time-series
    one; fedhb follows the paper and the three branches that agree.

    Deliberate differences from the released code: ``d_ij = 0`` (identical B) gives equal weight to the identical
    clients (the code's ``if l2_distance == 0`` compares a list with 0, so it divides by zero and the row becomes
    NaN), and ``layers`` selects which layers' B matrices enter the distance while every A matrix is mixed, as the
    code's ``layers_part``.
    """

    client_batchable = True  # plain local SGD: --federation.client_batch trains clients together

    def __init__(self, lam: float = 0.5, layers: str = "all", distance: str = "frobenius") -> None:
        """
        Args:
            lam: Weight of a client's own A matrices (1: no mixing, which equals Local).
            layers: LoRA layers whose B matrices enter the distance: all, first_half or second_half.
            distance: ``frobenius`` (the paper) or ``cosine``.
        """
        if not 0 <= lam <= 1:
            raise ValueError(f"--algorithm.lam must be in [0, 1], got {lam!r}")
        if layers not in ("all", "first_half", "second_half"):
            raise ValueError(f"--algorithm.layers must be all, first_half or second_half; got {layers!r}")
        if distance not in ("frobenius", "cosine"):
            raise ValueError(f"--algorithm.distance must be frobenius or cosine; got {distance!r}")
        self.lam, self.layers, self.distance = lam, layers, distance

    def upload(self, state: State) -> State:
        return self.model_part(state, keep=is_lora)

    def distances(self, uploads: dict[int, State]) -> torch.Tensor:
        """``d_ij`` for the uploading clients in sorted id order."""
        ids = sorted(uploads)
        pairs = select_layers(lora_pairs(list(uploads[ids[0]])), self.layers)
        total = torch.zeros(len(ids), len(ids), dtype=torch.float64)
        for _, b in pairs:  # each layer's distances are added into total block by block: no second (n, n) matrix
            pairwise_distance(torch.stack([uploads[i][b].flatten() for i in ids]), self.distance, add_to=total)
        return total.div_(max(1, len(pairs)))

    def aggregate(self, uploads: dict[int, State], num_samples: dict[int, int]) -> dict[int, State]:
        ids = sorted(uploads)
        weights = inverse_distance_weights(self.distances(uploads))
        out: dict[int, State] = {i: {} for i in ids}
        for a, _ in lora_pairs(list(uploads[ids[0]])):
            stacked = torch.stack([uploads[i][a] for i in ids]).to(torch.float64)
            mixed = torch.tensordot(weights, stacked, dims=1)
            for k, i in enumerate(ids):
                lam = self.lam if len(ids) > 1 else 1.0
                out[i][a] = (lam * stacked[k] + (1 - lam) * mixed[k]).to(uploads[i][a].dtype)
        return out
