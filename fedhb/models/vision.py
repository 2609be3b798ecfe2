"""Image backbones: ViT and friends through transformers' ``AutoModel``, with named tiny presets for tests."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fedhb.data.base import Samples
from fedhb.models.base import Encoder, check_preset_modality, load_pretrained

# Random-init configs of the real model classes: CPU tests and smoke runs. ``tiny-vit`` has ~150k parameters.
VISION_PRESETS: dict[str, dict] = {
    "tiny-vit": dict(image_size=28, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=128),
    "small-vit": dict(image_size=28, patch_size=4, num_channels=3, hidden_size=192, num_hidden_layers=6,
                      num_attention_heads=3, intermediate_size=768),
}


class ImageEncoder(Encoder):
    """A transformers image model; images are resized and channel-matched to what it expects, then normalized.

    Features are the final ``[CLS]`` token (ViT, DeiT) or the pooled output where the model has no ``[CLS]``.
    """

    def __init__(self, model: torch.nn.Module, image_size: int, channels: int, mean: list[float] | None = None,
                 std: list[float] | None = None) -> None:
        super().__init__()
        self.model = model
        self.image_size = image_size
        self.channels = channels
        self.hidden_size = int(self.model.config.hidden_size)
        mean, std = mean or [0.5] * channels, std or [0.5] * channels
        self.mean: Tensor
        self.std: Tensor
        self.register_buffer("mean", torch.tensor(mean[:channels]).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std[:channels]).view(-1, 1, 1), persistent=False)

    def prepare(self, samples: Samples) -> dict[str, Tensor]:
        # np.asarray: an array-like over image files (fedhb.data.image_cache.CachedImages) opens its on-disk cache here,
        # a memmap that stays one: (N, H, W) or channels-first (N, C, H, W) need neither a permute nor a copy.
        images = torch.from_numpy(np.asarray(samples.inputs))
        channels_first = getattr(samples.inputs, "channels_first", False)
        images = images.unsqueeze(1) if images.ndim == 3 else images if channels_first else images.permute(0, 3, 1, 2)
        return {"pixels": images.contiguous()}  # uint8: a 224-px set stays 4x smaller than in float

    def pixel_values(self, pixels: Tensor) -> Tensor:
        x = pixels.float().div_(255.0)
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1) if x.shape[1] == 1 else x.mean(1, keepdim=True)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        out = self.model(pixel_values=self.pixel_values(batch["pixels"]))
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None and "vit" not in self.model.config.model_type:
            return pooled.flatten(1)
        return out.last_hidden_state[:, 0]


def build_image_encoder(backbone: str) -> ImageEncoder:
    """A preset name, a hub id or a local folder."""
    from transformers import AutoConfig, AutoModel, ViTConfig, ViTModel

    check_preset_modality(backbone, "image")

    if backbone in VISION_PRESETS:
        config = ViTConfig(**VISION_PRESETS[backbone])
        model = ViTModel(config, add_pooling_layer=False)
    else:
        kwargs = {"add_pooling_layer": False} if _is_vit(backbone, AutoConfig) else {}
        model = load_pretrained(AutoModel, backbone, **kwargs)
    config = model.config
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    mean, std = (None, None) if backbone in VISION_PRESETS else _processor_stats(backbone)
    return ImageEncoder(model, image_size=size, channels=config.num_channels, mean=mean, std=std)


def _is_vit(backbone: str, auto_config) -> bool:
    try:
        return auto_config.from_pretrained(backbone).model_type == "vit"
    except (OSError, ValueError):
        return False


def _processor_stats(backbone: str) -> tuple[list[float] | None, list[float] | None]:
    """The per-channel mean/std the backbone was pretrained with; ``None`` (ViT's 0.5) if it ships none."""
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(backbone)
        return list(proc.image_mean), list(proc.image_std)
    except Exception:  # noqa: BLE001 - a missing or odd processor file means "use the ViT default"
        return None, None
