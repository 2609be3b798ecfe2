"""Late fusion by concatenated projections, Med-MMFL's fusion (Chhetri et al., arXiv 2602.04416).

Each modality's pooled features are projected to ``dim`` by a linear map of its own and the projections are
concatenated for the head. A modality a sample lacks is replaced by a learned placeholder vector of that modality (a
"missing" token, as BERT's ``[MASK]`` or MOMENT's mask embedding): the head sees a value learned to mean "absent", never
the projection of placeholder input (zeros, an empty string) passed off as data, and the encoder never runs on it
(:meth:`fedhb.client.ClientModule.features`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fedhb.models.fusion import Fusion


class LateFusion(Fusion):
    """``[P_1 x_1 | ... | P_M x_M]``, with a learned placeholder for each absent ``x_m``.

    Args:
        in_features: ``{modality: feature width}``, in fusion order.
        dim: Width of each projection; the output is ``dim * len(in_features)`` wide.
    """

    masked = True

    def __init__(self, in_features: Mapping[str, int], dim: int) -> None:
        super().__init__()
        if not in_features:
            raise ValueError("late fusion needs at least one modality")
        self.modalities = list(in_features)
        self.proj = nn.ModuleDict({m: nn.Linear(d, dim) for m, d in in_features.items()})
        # Small random values as for a mask token: distinct per modality from the start.
        self.placeholder = nn.ParameterDict({m: nn.Parameter(torch.randn(dim) * 0.02) for m in in_features})
        self.out_features = dim * len(self.modalities)

    def forward(self, features: Mapping[str, Tensor],  # type: ignore[override]
                present: Mapping[str, Tensor] | None = None) -> Tensor:
        parts = []
        for m in self.modalities:
            z = self.proj[m](features[m])
            if present is not None and m in present:
                z = torch.where(present[m].bool()[:, None], z, self.placeholder[m].to(z.dtype))
            parts.append(z)
        return torch.cat(parts, dim=1)
