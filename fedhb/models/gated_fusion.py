"""Gated fusion: the gated multimodal unit (GMU) of Arevalo et al., "Gated Multimodal Units for Information Fusion",
ICLR workshop 2017, arXiv 1702.01992, extended to any number of modalities and to absent ones.

Each modality gives ``h_m = tanh(W_m x_m)``; gate logits ``g_m = U_m [p_1; ...; p_M]`` (one per feature and modality)
read every modality's ``p_m``, which is ``h_m`` or, where the sample lacks modality ``m``, a learned placeholder; the
output is ``sum_m w_m * h_m`` with ``w = softmax_m(g)`` taken over the modalities the sample holds, feature by feature.
With two modalities both present, ``w_1 = sigmoid(g_1 - g_2)``: the paper's ``z * h_v + (1 - z) * h_t``. An absent
modality gets weight exactly 0, so nothing of its placeholder input reaches the output except through the gates of
the others, and a sample with a single modality present passes that modality's ``h_m`` through unchanged.

Difference from the paper: its gate reads the raw inputs ``[x_v; x_t]``; here it reads the projected ``h_m`` (or the
placeholder), so that an absent modality's raw input (zeros, an empty string) never enters the gate.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fedhb.models.fusion import Fusion


class GatedFusion(Fusion):
    """A gated multimodal unit over ``M`` modalities; output width ``dim``.

    Args:
        in_features: ``{modality: feature width}``, in fusion order.
        dim: Width of each ``h_m`` and of the output.
    """

    masked = True

    def __init__(self, in_features: Mapping[str, int], dim: int) -> None:
        super().__init__()
        if not in_features:
            raise ValueError("gated fusion needs at least one modality")
        self.modalities = list(in_features)
        self.proj = nn.ModuleDict({m: nn.Linear(d, dim) for m, d in in_features.items()})
        self.gate = nn.Linear(dim * len(self.modalities), dim * len(self.modalities))
        self.placeholder = nn.ParameterDict({m: nn.Parameter(torch.randn(dim) * 0.02) for m in in_features})
        self.dim = dim
        self.out_features = dim

    def forward(self, features: Mapping[str, Tensor],  # type: ignore[override]
                present: Mapping[str, Tensor] | None = None) -> Tensor:
        h = torch.stack([torch.tanh(self.proj[m](features[m])) for m in self.modalities], dim=1)  # (B, M, dim)
        batch = h.shape[0]
        if present is None:
            mask = torch.ones(batch, len(self.modalities), dtype=torch.bool, device=h.device)
        else:
            mask = torch.stack([present[m].bool() if m in present else
                                torch.ones(batch, dtype=torch.bool, device=h.device) for m in self.modalities], 1)
        placeholder = torch.stack([self.placeholder[m] for m in self.modalities]).to(h.dtype)  # (M, dim)
        p = torch.where(mask[:, :, None], h, placeholder)
        logits = self.gate(p.reshape(batch, -1)).reshape(batch, len(self.modalities), self.dim)
        logits = logits.masked_fill(~mask[:, :, None], float("-inf"))
        # A sample with no modality at all (Samples refuses them) would be 0/0: weigh nothing instead.
        weights = torch.nan_to_num(torch.softmax(logits.float(), dim=1), nan=0.0).to(h.dtype)
        return (weights * torch.where(mask[:, :, None], h, torch.zeros_like(h))).sum(1)
