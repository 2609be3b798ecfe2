"""The encoder contract: a frozen backbone with LoRA that maps a batch to pooled features."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from fedhb.data.base import Samples


class Encoder(nn.Module):
    """A backbone (with LoRA injected) plus what it needs to turn raw samples into its inputs.

    ``prepare`` runs once per run on the whole dataset (tokenizing text, stacking images) and returns tensors indexed
    by sample; batches are slices of them, so no worker processes or collate functions sit in the hot loop.
    ``forward`` maps a batch to ``(B, hidden_size)`` pooled features.
    """

    hidden_size: int
    model: Any  # the transformers model (LoRA is injected into it)

    def prepare(self, samples: Samples) -> dict[str, Tensor]:
        raise NotImplementedError

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError


def load_pretrained(loader, backbone: str, **kwargs):
    """``loader.from_pretrained(backbone)`` with an error that says what to do offline."""
    try:
        return loader.from_pretrained(backbone, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"--model.backbone {backbone!r} is not a preset, not a local folder with a config.json, and could not be "
            f"loaded from the Hugging Face hub ({type(err).__name__}: {str(err).splitlines()[0]}). On a machine with "
            f"network run `hf download {backbone} --local-dir DIR` and pass --model.backbone DIR."
        ) from err


#: Where each modality's named presets live (module, table); read lazily, since every module imports this one.
_PRESET_TABLES = {"image": ("fedhb.models.vision", "VISION_PRESETS"), "text": ("fedhb.models.text", "TEXT_PRESETS"),
                  "signal": ("fedhb.models.timeseries", "MOMENT_PRESETS"),
                  "audio": ("fedhb.models.audio", "AUDIO_PRESETS"),
                  "tabular": ("fedhb.models.tabular", "TABULAR_PRESETS")}


def presets() -> dict[str, list[str]]:
    """The preset names of every modality (``{"image": ["tiny-vit", ...], "text": [..., "minilm"], ...}``)."""
    out = {}
    for modality, (module, table) in _PRESET_TABLES.items():
        names = list(getattr(importlib.import_module(module), table))
        if modality == "text":
            names.append(importlib.import_module(module).MINILM)
        out[modality] = names
    return out


#: What a dataset of each modality holds, for messages.
_HOLDS = {"image": "images", "text": "text", "signal": "biosignals", "audio": "audio", "tabular": "tabular features"}


def check_preset_modality(backbone: str, modality: str) -> None:
    """Refuse another modality's preset (``tiny-vit`` for a text dataset) before it is taken for a hub id."""
    if Path(backbone).expanduser().exists():
        return  # a local folder that happens to share a preset's name
    table = presets()
    for other, names in table.items():
        if other != modality and backbone in names:
            holds = _HOLDS.get(modality, modality)
            raise ValueError(
                f"--model.backbone {backbone!r} is {_a(other)} preset, but this dataset holds {holds}: pass "
                f"{_a(modality)} preset ({', '.join(table.get(modality, []))}), or a hub id or local folder of "
                f"{_a(modality)} model"
            )


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"
