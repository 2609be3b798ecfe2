"""Fusion: how a client model combines the features of its modalities' encoders into one vector for the task head.

A fusion module maps ``{modality: (B, d_m) features}`` to ``(B, out_features)``. With one modality the features pass
through unchanged (:class:`Single`); multimodal fusions are files of their own beside this one.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn


class Fusion(nn.Module):
    """Base class: ``forward(features)`` with ``features`` keyed by modality; ``out_features`` its width."""

    out_features: int

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:  # type: ignore[override]
        raise NotImplementedError


class Single(Fusion):
    """One modality: its encoder's features, unchanged (no parameters)."""

    def __init__(self, modality: str, in_features: int) -> None:
        super().__init__()
        self.modality, self.out_features = modality, in_features

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:  # type: ignore[override]
        return features[self.modality]
