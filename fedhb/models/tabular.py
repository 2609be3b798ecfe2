"""Tabular features: a small MLP trained from scratch (there is no pretrained backbone to adapt with LoRA).

Every parameter of the MLP is trainable and belongs to the client's state, like the head; the LoRA methods (EPFL,
FedSA-LoRA, FFA-LoRA, FLoRA) treat it as they treat the head. ``--model.backbones {tabular: mlp}`` picks a preset:
``mlp`` (two hidden layers of 128, about 20k parameters on PadChest's 19 features) or ``tiny-mlp`` (one of 16, for
tests and ``--fast_dev_run``).

The dataset turns its columns into finite floats of similar scale (PadChest: fixed log and linear rescalings plus a
missing-value indicator per column, see :mod:`fedhb.data.padchest`), so the encoder applies no statistics of its own:
normalising with statistics pooled over clients would move data across them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from fedhb.data.base import Samples
from fedhb.models.base import Encoder, check_preset_modality

#: Hidden widths of each preset; the last is the feature width.
TABULAR_PRESETS: dict[str, tuple[int, ...]] = {"mlp": (128, 128), "tiny-mlp": (16,)}


class TabularEncoder(Encoder):
    """``Linear -> GELU`` blocks over a ``(B, features)`` float batch; features are the last block's output.

    Args:
        in_features: Columns per sample.
        hidden: Width of each block.
        dropout: Dropout after each block.
    """

    def __init__(self, in_features: int, hidden: tuple[int, ...] = (128, 128), dropout: float = 0.0) -> None:
        super().__init__()
        if in_features < 1 or not hidden or min(hidden) < 1:
            raise ValueError(f"a tabular encoder needs >= 1 input column and positive widths, got {in_features} "
                             f"columns and widths {hidden}")
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(dropout)]
            width = h
        self.model = nn.Sequential(*layers)
        self.in_features = in_features
        self.hidden_size = width

    def prepare(self, samples: Samples) -> dict[str, Tensor]:
        values = np.asarray(samples.inputs)
        if values.ndim != 2 or values.shape[1] != self.in_features:
            raise ValueError(f"tabular inputs must be a (samples, {self.in_features}) array, got shape {values.shape}")
        if not np.isfinite(values).all():
            bad = int((~np.isfinite(values)).any(1).sum())
            raise ValueError(f"tabular inputs of {bad} samples are not finite; the dataset must encode missing values "
                             f"(e.g. a value and a missing indicator per column)")
        return {"values": torch.as_tensor(values, dtype=torch.float32)}

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model(batch["values"].float())


def build_tabular_encoder(backbone: str, samples: Samples) -> TabularEncoder:
    """A preset (``mlp``, ``tiny-mlp``) for ``samples`` (``(N, features)`` floats)."""
    check_preset_modality(backbone, "tabular")
    if backbone not in TABULAR_PRESETS:
        raise ValueError(f"--model.backbones: tabular backbone {backbone!r} is not one of "
                         f"{', '.join(TABULAR_PRESETS)}")
    shape = tuple(getattr(samples.inputs, "shape", ()))
    if len(shape) != 2:
        raise ValueError(f"tabular inputs must be a (samples, features) array, got shape {shape}")
    return TabularEncoder(int(shape[1]), TABULAR_PRESETS[backbone])
