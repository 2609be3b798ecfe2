"""Backbones, one builder per modality; ``build_encoder`` picks the one matching the dataset."""

from __future__ import annotations

from fedhb.config import ModelArgs
from fedhb.data.base import Samples
from fedhb.models.base import Encoder
from fedhb.models.lora import apply_lora, resolve_target_modules


def build_encoder(args: ModelArgs, samples: Samples) -> Encoder:
    """The frozen backbone for ``samples.modality`` with LoRA injected per ``args.lora``."""
    if samples.modality == "image":
        from fedhb.models.vision import build_image_encoder

        encoder: Encoder = build_image_encoder(args.backbone)
    elif samples.modality == "text":
        from fedhb.models.text import build_text_encoder

        encoder = build_text_encoder(args.backbone, args.max_length)
    elif samples.modality == "signal":
        from fedhb.models.timeseries import build_signal_encoder

        encoder = build_signal_encoder(args.backbone, samples)
    elif samples.modality == "audio":
        from fedhb.models.audio import build_audio_encoder

        encoder = build_audio_encoder(args.backbone)
    else:
        raise ValueError(f"no backbone builder for the {samples.modality!r} modality yet")
    encoder.model = apply_lora(encoder.model, args.lora)
    return encoder


def build_encoders(args: ModelArgs, samples: Samples) -> dict[str, Encoder]:
    """``{modality: encoder}`` of the client model: one frozen backbone with LoRA per modality of ``samples``."""
    return {samples.modality: build_encoder(args, samples)}


__all__ = ["Encoder", "apply_lora", "build_encoder", "build_encoders", "resolve_target_modules"]
