"""Fusion: how a client model combines the features of its modalities' encoders into one vector for the task head.

A fusion module maps ``{modality: (B, d_m) features}`` to ``(B, out_features)``. With one modality the features pass
through unchanged (:class:`Single`); multimodal fusions are files of their own beside this one
(:mod:`fedhb.models.late_fusion`, :mod:`fedhb.models.gated_fusion`). A fusion whose ``masked`` is true also receives
``present``, ``{modality: (B,) bool}``, and must not treat an absent modality's features (zeros the encoder never
computed) as data.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn


class Fusion(nn.Module):
    """Base class: ``forward(features, present)`` with both keyed by modality; ``out_features`` its width."""

    out_features: int
    #: Whether the client model feeds this fusion multimodal batches: tensors keyed ``<modality>/<name>`` and a
    #: presence mask per modality (``<modality>/present``).
    masked: bool = False

    def forward(self, features: Mapping[str, Tensor],  # type: ignore[override]
                present: Mapping[str, Tensor] | None = None) -> Tensor:
        raise NotImplementedError


class Single(Fusion):
    """One modality: its encoder's features, unchanged (no parameters)."""

    def __init__(self, modality: str, in_features: int) -> None:
        super().__init__()
        self.modality, self.out_features = modality, in_features

    def forward(self, features: Mapping[str, Tensor],  # type: ignore[override]
                present: Mapping[str, Tensor] | None = None) -> Tensor:
        return features[self.modality]
