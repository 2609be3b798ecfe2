"""3D segmentation networks from MONAI, split into an encoder (the client model's one encoder) and a decoder (its
``head``), under two training protocols.

- **Full** (Med-MMFL's protocol, arXiv 2602.04416): a MONAI network trained whole, every tensor federated.
  ``segresnet`` is SegResNet (Myronenko, "3D MRI brain tumor segmentation using autoencoder regularization",
  arXiv 1810.11654) as configured in MONAI's BraTS tutorial; ``swinunetr`` is SwinUNETR (Hatamizadeh et al.,
  "Swin UNETR", arXiv 2201.01266) at feature size 48, the size of MONAI's published BraTS and self-supervised weights.
- **LoRA** (fedhb's protocol): SwinUNETR's Swin-Transformer encoder (``swinViT``) frozen, LoRA (Hu et al.,
  arXiv 2106.09685, through :func:`fedhb.models.lora.apply_lora`) on its window attention's ``qkv`` and ``proj``
  layers, and the convolutional decoder (with the UNETR skip blocks ``encoder1..4``, ``encoder10``) trained whole:
  ``swinunetr-lora``.

The encoder's output is the list of multi-scale features the decoder reads (SwinUNETR's five hidden states,
SegResNet's bottleneck and skip features); the decoder is what personalised methods (FedPer, FedRep, FedBABU, ...)
see as the ``head``, since the client model registers it under that name.

**Absent MRI sequences** (a hospital without T2-FLAIR): the input is four channels, one per sequence; an absent
channel is zero-filled and replaced by a learned per-sequence constant (``placeholder``), so the network sees a value
learned to mean "this sequence is missing" rather than an intensity, and during training present sequences are
dropped at random (modality dropout: ModDrop, Neverova et al., arXiv 1501.00102; as HeMIS, Havaei et al.,
arXiv 1607.05194, trains for missing MR sequences) when the federation has absent sequences, so that the network
learns every subset it will meet. RFNet's region-aware fusion (Ding et al., ICCV 2021) is not implemented.

**Checkpoints**: ``--model.backbone <preset>@<path>`` initialises the preset's network from a local ``.pt``/``.pth``
file, and a bare path means ``swinunetr-lora@<path>``. Both MONAI layouts load: a whole SwinUNETR state dict (e.g. the
BraTS 2021 fold models, ``{"state_dict": ...}``) and the self-supervised Swin encoder (``model_swinvit.pt``, keys
``module.<swinViT key>``); a one-channel patch embedding (the self-supervised CT weights) is spread over the four
sequences (its weight divided by four on each). Any other mismatch is an error naming the file and the tensor.

MONAI is imported inside the functions only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from fedhb.models.base import Encoder

if TYPE_CHECKING:
    from fedhb.config import ModelArgs


@dataclass(frozen=True)
class SegmentationPreset:
    """A named network: ``arch`` (``swinunetr`` or ``segresnet``), ``protocol`` (``full`` or ``lora``) and the MONAI
    constructor's keyword arguments."""

    arch: str
    protocol: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def multiple(self) -> int:
        """What every patch side must be a multiple of (SwinUNETR: 2^5; SegResNet: 2^(levels - 1))."""
        if self.arch == "swinunetr":
            return 32
        return 2 ** (len(self.kwargs.get("blocks_down", (1, 2, 2, 4))) - 1)


_SWIN = {"feature_size": 48, "depths": (2, 2, 2, 2), "num_heads": (3, 6, 12, 24), "use_v2": False}
# Group norm: a 32^3 patch leaves the deepest features 1 voxel wide, where instance norm is undefined in training.
_SWIN_TINY = {"feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 2, 4), "use_v2": False,
              "norm_name": ("group", {"num_groups": 4})}
#: The named segmentation networks (``--model.backbone``); the ``tiny-`` ones are random-init test sizes.
SEGMENTATION_PRESETS: dict[str, SegmentationPreset] = {
    "segresnet": SegmentationPreset("segresnet", "full", {"init_filters": 16, "blocks_down": (1, 2, 2, 4),
                                                          "blocks_up": (1, 1, 1)}),
    "swinunetr": SegmentationPreset("swinunetr", "full", _SWIN),
    "swinunetr-lora": SegmentationPreset("swinunetr", "lora", _SWIN),
    "tiny-segresnet": SegmentationPreset("segresnet", "full", {"init_filters": 8, "blocks_down": (1, 1, 1),
                                                               "blocks_up": (1, 1)}),
    "tiny-swinunetr": SegmentationPreset("swinunetr", "full", _SWIN_TINY),
    "tiny-swinunetr-lora": SegmentationPreset("swinunetr", "lora", _SWIN_TINY),
}
#: What ``--fast_dev_run`` swaps in for each preset (a bare checkpoint path is ``swinunetr-lora``).
TINY_SEGMENTATION = {"segresnet": "tiny-segresnet", "swinunetr": "tiny-swinunetr",
                     "swinunetr-lora": "tiny-swinunetr-lora"}
#: Region channels the network predicts (whole tumour, tumour core, enhancing tumour).
OUT_CHANNELS = 3
#: Generic LoRA target names mapped to SwinUNETR's attention layers (its q, k and v are one fused ``qkv`` layer).
SWIN_TARGETS = {"query": "attn.qkv", "key": "attn.qkv", "value": "attn.qkv", "output": "attn.proj",
                "qkv": "attn.qkv", "proj": "attn.proj"}


def parse_backbone(backbone: str) -> tuple[str, SegmentationPreset, Path | None]:
    """``(preset name, preset, checkpoint path or None)`` of ``--model.backbone``: ``<preset>``, ``<preset>@<path>``
    or a bare path (``swinunetr-lora@<path>``)."""
    name, _, path = backbone.partition("@")
    if not path and name not in SEGMENTATION_PRESETS:
        if Path(name).expanduser().suffix in (".pt", ".pth", ".ckpt", ".bin") or Path(name).expanduser().exists():
            name, path = "swinunetr-lora", backbone
        else:
            raise ValueError(f"--model.backbone {backbone!r} is not a segmentation network: pass one of "
                             f"{', '.join(SEGMENTATION_PRESETS)}, <preset>@<checkpoint path>, or a checkpoint path")
    if name not in SEGMENTATION_PRESETS:
        raise ValueError(f"--model.backbone {backbone!r}: {name!r} is not a segmentation preset; pass one of "
                         f"{', '.join(SEGMENTATION_PRESETS)}")
    return name, SEGMENTATION_PRESETS[name], Path(path).expanduser() if path else None


def tiny_segmentation_preset(backbone: str) -> str:
    """The tiny preset of ``backbone``'s network and protocol (what ``--fast_dev_run`` runs)."""
    name, preset, _ = parse_backbone(backbone)
    if name.startswith("tiny-"):
        return name
    return TINY_SEGMENTATION[name]


class _Part(nn.Module):
    """Named MONAI submodules moved out of their network (no forward of its own)."""

    def __init__(self, net: Any, names: tuple[str, ...]) -> None:
        super().__init__()
        for name in names:
            setattr(self, name, getattr(net, name))


class SegmentationEncoder(Encoder):
    """The network's encoder: four sequence channels (absent ones filled with a learned placeholder) to multi-scale
    features.

    Args:
        arch: ``swinunetr`` or ``segresnet``.
        model: SwinUNETR's ``swinViT``, or SegResNet's ``convInit`` and ``down_layers``.
        channels: The input sequences, in channel order.
        hidden_size: Channels of the deepest features (what :meth:`forward` pools).
        patch: Side of the cube :meth:`forward` pools over (a centre crop of the volume).
        normalize: SwinUNETR's ``normalize`` (layer-normalised hidden states).
    """

    def __init__(self, arch: str, model: nn.Module, channels: tuple[str, ...], hidden_size: int, patch: int,
                 normalize: bool = True) -> None:
        super().__init__()
        self.arch, self.model, self.channels = arch, model, tuple(channels)
        self.hidden_size, self.patch, self.normalize = hidden_size, patch, normalize
        self.placeholder = nn.Parameter(torch.zeros(len(channels)))

    def prepare(self, samples: Any) -> dict[str, Tensor]:
        """The samples' volumes as memory-mapped tensors (see :meth:`fedhb.data.brats.Volumes.tensors`)."""
        return samples.inputs.tensors()

    def fill(self, volume: Tensor, present: Tensor) -> Tensor:
        """``(B, C, ...)`` float input: each present channel as it is, each absent one the learned placeholder."""
        x = volume.float()
        p = present.to(x.dtype).view(*present.shape, *([1] * (x.dim() - 2)))
        return x * p + (1 - p) * self.placeholder.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2)))

    def encode(self, x: Tensor) -> list[Tensor]:
        """Multi-scale features of a filled input (shallowest first; the last is the deepest)."""
        if self.arch == "swinunetr":
            return list(self.model(x, self.normalize))
        m: Any = self.model
        x = m.convInit(x)
        out = []
        for down in m.down_layers:
            x = down(x)
            out.append(x)
        return out

    @staticmethod
    def pooled(features: list[Tensor]) -> Tensor:
        """``(B, hidden_size)``: the deepest features averaged over space (what MOON-style methods contrast)."""
        return features[-1].float().mean(dim=tuple(range(2, features[-1].dim())))

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Pooled deepest features of each volume's centre ``patch`` cube (``--algorithm`` methods that read a
        client's representations, as MOON, call this)."""
        volume = batch["volume"]
        starts = [max(0, (s - self.patch) // 2) for s in volume.shape[2:]]
        crop = volume[(slice(None), slice(None), *(slice(a, a + self.patch) for a in starts))]
        return self.pooled(self.encode(self.fill(pad_to(crop, self.patch), batch["present"])))


class SwinUNETRDecoder(nn.Module):
    """SwinUNETR's convolutional part: the skip blocks on the input and hidden states, the up-sampling decoder and
    the output convolution (MONAI's modules, wired as ``SwinUNETR.forward``)."""

    NAMES = ("encoder1", "encoder2", "encoder3", "encoder4", "encoder10", "decoder5", "decoder4", "decoder3",
             "decoder2", "decoder1", "out")

    def __init__(self, net: Any) -> None:
        super().__init__()
        for name in self.NAMES:
            setattr(self, name, getattr(net, name))

    def forward(self, x: Tensor, hidden: list[Tensor]) -> Tensor:
        m: Any = self
        enc0 = m.encoder1(x)
        enc1 = m.encoder2(hidden[0])
        enc2 = m.encoder3(hidden[1])
        enc3 = m.encoder4(hidden[2])
        dec4 = m.encoder10(hidden[4])
        dec3 = m.decoder5(dec4, hidden[3])
        dec2 = m.decoder4(dec3, enc3)
        dec1 = m.decoder3(dec2, enc2)
        dec0 = m.decoder2(dec1, enc1)
        return m.out(m.decoder1(dec0, enc0))


class SegResNetDecoder(nn.Module):
    """SegResNet's up-sampling path and final convolution (MONAI's modules, wired as ``SegResNet.decode``)."""

    def __init__(self, net: Any) -> None:
        super().__init__()
        self.up_samples, self.up_layers, self.conv_final = net.up_samples, net.up_layers, net.conv_final

    def forward(self, x: Tensor, features: list[Tensor]) -> Tensor:
        skips = features[::-1]
        y = skips[0]
        m: Any = self
        for i, (up, layer) in enumerate(zip(m.up_samples, m.up_layers)):
            y = layer(up(y) + skips[i + 1])
        return m.conv_final(y)


def pad_to(x: Tensor, size: int) -> Tensor:
    """``x`` (``B, C, ...``) zero-padded at the end of each spatial side shorter than ``size``."""
    pad = [p for s in reversed(x.shape[2:]) for p in (0, max(0, size - s))]
    return torch.nn.functional.pad(x, pad) if any(pad) else x


@dataclass
class SegmentationNet:
    """What :func:`build_segmentation` returns: the client model's encoder and the decoder its task uses as head."""

    encoder: SegmentationEncoder
    decoder: nn.Module
    preset: SegmentationPreset


def build_segmentation(args: ModelArgs, channels: tuple[str, ...], patch: int) -> SegmentationNet:
    """The network ``--model.backbone`` names, split into encoder and decoder, the checkpoint (if any) loaded and,
    under the LoRA protocol, the encoder frozen with LoRA on its attention (``--model.lora``)."""
    from monai.networks.nets import SegResNet, SwinUNETR

    name, preset, checkpoint = parse_backbone(args.backbone)
    if patch % preset.multiple:
        raise ValueError(f"--data.patch {patch}: {name} needs patch sides that are multiples of {preset.multiple}")
    net: Any
    if preset.arch == "swinunetr":
        net = SwinUNETR(in_channels=len(channels), out_channels=OUT_CHANNELS, spatial_dims=3, **preset.kwargs)
    else:
        net = SegResNet(spatial_dims=3, in_channels=len(channels), out_channels=OUT_CHANNELS, **preset.kwargs)
    if checkpoint is not None:
        load_segmentation_checkpoint(net, checkpoint, arch=preset.arch)
    decoder: nn.Module
    if preset.arch == "swinunetr":
        width = 16 * int(preset.kwargs["feature_size"])
        encoder = SegmentationEncoder("swinunetr", net.swinViT, channels, width, patch, bool(net.normalize))
        decoder = SwinUNETRDecoder(net)
    else:
        width = int(preset.kwargs["init_filters"]) * 2 ** (len(preset.kwargs["blocks_down"]) - 1)
        encoder = SegmentationEncoder("segresnet", _Part(net, ("convInit", "down_layers")), channels, width, patch)
        decoder = SegResNetDecoder(net)
    if preset.protocol == "lora":
        from fedhb.models.lora import apply_lora

        targets = list(dict.fromkeys(SWIN_TARGETS.get(t, t) for t in args.lora.target_modules))
        encoder.model = apply_lora(encoder.model, dataclasses.replace(args.lora, target_modules=targets))
    return SegmentationNet(encoder, decoder, preset)


def load_segmentation_checkpoint(net: nn.Module, path: Path, arch: str) -> None:
    """Load a local MONAI checkpoint into ``net`` (see the module doc for the layouts it reads)."""
    if not path.is_file():
        raise FileNotFoundError(f"--model.backbone: checkpoint {path} not found (give a local .pt/.pth file)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise ValueError(f"--model.backbone: {path} is not a PyTorch checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from err
    state = raw
    if isinstance(raw, dict):
        for key in ("state_dict", "model", "net"):
            if isinstance(raw.get(key), dict):
                state = raw[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"--model.backbone: {path} holds no state dict of tensors")
    ours = net.state_dict()
    loaded: dict[str, Tensor] = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        target = key if key in ours else f"swinViT.{key}" if f"swinViT.{key}" in ours else None
        if target is None:
            continue  # a pretext head (rotation, contrastive) or another network's extra tensor
        want = ours[target]
        if value.shape != want.shape:
            one_channel = value.dim() == want.dim() and value.shape[1] == 1 and value.shape[0] == want.shape[0]
            if target.endswith("patch_embed.proj.weight") and one_channel:
                value = value.expand_as(want) / want.shape[1]  # one-channel weights spread over the sequences
            else:
                raise ValueError(f"--model.backbone: {path}: tensor {key} has shape {tuple(value.shape)}, the "
                                 f"{arch} preset's has {tuple(want.shape)}; choose the preset of its size")
        loaded[target] = value.to(want.dtype)
    if not loaded:
        raise ValueError(f"--model.backbone: no tensor of {path} belongs to a {arch} network (first keys: "
                         f"{list(state)[:3]})")
    net.load_state_dict(loaded, strict=False)
