"""Backbones, one builder per modality; ``build_encoders`` builds one per modality of the dataset, ``build_fusion``
the step that combines them."""

from __future__ import annotations

from collections.abc import Mapping

from fedhb.config import ModelArgs
from fedhb.data.base import Samples
from fedhb.models.base import Encoder
from fedhb.models.fusion import Fusion, Single
from fedhb.models.lora import apply_lora, resolve_target_modules

#: The random-init preset of each modality's family that ``--fast_dev_run`` swaps in for every backbone.
TINY_PRESETS = {"image": "tiny-vit", "text": "tiny-bert", "signal": "tiny-moment", "audio": "tiny-wav2vec2",
                "tabular": "tiny-mlp"}
#: What a modality gets when ``--model.backbones`` leaves it out (only tabular has a default: it is trained from
#: scratch, so there is no checkpoint to choose).
DEFAULT_BACKBONES = {"tabular": "mlp"}


def build_encoder(args: ModelArgs, samples: Samples, backbone: str | None = None) -> Encoder:
    """The frozen backbone for ``samples.modality`` (``backbone``, default ``args.backbone``) with LoRA injected per
    ``args.lora``; the tabular MLP is trained whole and gets no LoRA."""
    backbone = args.backbone if backbone is None else backbone
    if samples.modality == "image":
        from fedhb.models.vision import build_image_encoder

        encoder: Encoder = build_image_encoder(backbone)
    elif samples.modality == "text":
        from fedhb.models.text import build_text_encoder

        encoder = build_text_encoder(backbone, args.max_length)
    elif samples.modality == "signal":
        from fedhb.models.timeseries import build_signal_encoder

        encoder = build_signal_encoder(backbone, samples)
    elif samples.modality == "audio":
        from fedhb.models.audio import build_audio_encoder

        encoder = build_audio_encoder(backbone)
    elif samples.modality == "tabular":
        from fedhb.models.tabular import build_tabular_encoder

        return build_tabular_encoder(backbone, samples)
    else:
        raise ValueError(f"no backbone builder for the {samples.modality!r} modality yet")
    encoder.model = apply_lora(encoder.model, args.lora)
    return encoder


def backbone_for(args: ModelArgs, modality: str, modalities: tuple[str, ...]) -> str:
    """The backbone of ``modality`` in multimodal data: ``--model.backbones``, else the modality's default."""
    chosen = dict(args.backbones or {})
    unused = [m for m in chosen if m not in modalities]
    if unused:
        raise ValueError(f"--model.backbones names {unused}, which the data does not carry (it carries "
                         f"{', '.join(modalities)})")
    if modality in chosen:
        return chosen[modality]
    if modality in DEFAULT_BACKBONES:
        return DEFAULT_BACKBONES[modality]
    example = ", ".join(f"{m}: {DEFAULT_BACKBONES.get(m, TINY_PRESETS[m])}" for m in modalities)
    raise ValueError(f"--model.backbones has no backbone for {modality}: the data carries {', '.join(modalities)}; "
                     f"pass e.g. --model.backbones '{{{example}}}'")


def build_encoders(args: ModelArgs, samples: Samples) -> dict[str, Encoder]:
    """``{modality: encoder}`` of the client model: one frozen backbone with LoRA per modality of ``samples``, in
    fusion order (``--model.backbone`` for unimodal data, ``--model.backbones`` for multimodal data)."""
    if samples.modality != "multimodal":
        if args.backbones:
            raise ValueError(f"--model.backbones is for multimodal data; this dataset holds {samples.modality} only: "
                             f"use --model.backbone")
        return {samples.modality: build_encoder(args, samples)}
    return {m: build_encoder(args, samples.view(m), backbone_for(args, m, samples.modalities))
            for m in samples.modalities}


def build_fusion(args: ModelArgs, encoders: Mapping[str, Encoder], multimodal: bool) -> Fusion:
    """The fusion step: the one encoder's features for unimodal data, ``--model.fusion`` for multimodal data (even
    with one modality, whose absent samples then get the fusion's placeholder)."""
    widths = {m: int(e.hidden_size) for m, e in encoders.items()}
    if not multimodal:
        if len(widths) != 1:
            raise ValueError(f"{len(widths)} modalities ({', '.join(widths)}) need a fusion step")
        modality, width = next(iter(widths.items()))
        return Single(modality, width)
    if args.fusion == "gated":
        from fedhb.models.gated_fusion import GatedFusion

        return GatedFusion(widths, args.fusion_dim)
    from fedhb.models.late_fusion import LateFusion

    return LateFusion(widths, args.fusion_dim)


def bytes_by_modality(shapes: Mapping[str, tuple[int, int]]) -> dict[str, int]:
    """Bytes of a client's tensors by what they belong to: a modality's encoder (``encoders.<modality>.``), the
    ``fusion`` step, the ``head``, or ``other``. An algorithm's tensor about a model tensor (``<prefix>/<model
    tensor name>``: a control variate, a personal copy) counts with that tensor. ``shapes`` maps each tensor name to
    ``(elements, bytes per element)``."""
    out: dict[str, int] = {}
    for name, (numel, size) in shapes.items():
        parts = name.rsplit("/", 1)[-1].split(".")
        if parts[0] == "encoders" and len(parts) > 1:
            part = parts[1]
        elif parts[0] in ("fusion", "head"):
            part = parts[0]
        else:
            part = "other"
        out[part] = out.get(part, 0) + numel * size
    return out


__all__ = ["Encoder", "apply_lora", "build_encoder", "build_encoders", "build_fusion", "bytes_by_modality",
           "resolve_target_modules"]
