"""Time-series backbone: MOMENT (Goswami et al., ICML 2024, arXiv 2402.03885), FHBench's ECG/EEG backbone.

MOMENT is a T5 encoder over patches of a univariate series: the series (512 samples) is instance-normalised
(RevIN without affine parameters), cut into 64 non-overlapping patches of 8 samples, each patch embedded by a linear
map (``patch_embedding.value_embedding``) plus a fixed sinusoidal position code, patches that are not fully observed
replaced by a learned ``mask_embedding``, and the 64 tokens run through the T5 encoder with an attention mask.
Channels are encoded independently (each channel is its own sequence).

fedhb does not depend on the ``momentfm`` package: momentfm 0.1.4 pins ``transformers==4.33.3``,
``huggingface-hub==0.24.0`` and ``numpy==1.25.2``, which would downgrade fedhb's stack. Instead
:class:`MomentBackbone` rebuilds the same modules under the same attribute names around transformers'
``T5EncoderModel`` encoder, so a MOMENT checkpoint (``config.json`` with its ``t5_config``, and ``model.safetensors``
or ``pytorch_model.bin``) loads by name, by hub id (``AutonLab/MOMENT-1-small``) or from a local folder.

What was verified offline: with momentfm 0.1.4's source on the path (not installed), a ``MOMENT`` built from a tiny
``t5_config`` has exactly the state-dict keys of :class:`MomentBackbone` plus its ``head.*`` (which fedhb skips),
its weights load into :class:`MomentBackbone` strictly, ``classify(reduction="concat")`` gives the same logits on
:class:`TimeSeriesEncoder`'s features when every sample is observed, and ``embed(reduction="mean")`` with an input
mask equals ``channel_pool="mean"`` on left-padded input (to 3e-7). What was not verified:
the real ``AutonLab/MOMENT-1-small`` files (no network here); the loader assumes their ``config.json`` carries
``t5_config``, ``seq_len`` and ``patch_len`` (``patch_stride_len`` defaults to ``patch_len``), as momentfm's
``MOMENTPipeline.from_pretrained`` requires, and fails naming the file and the key if one is missing.

Multichannel signals: every channel is encoded on its own, pooled over its observed patches, and the channel
features are concatenated (``channel_pool="concat"``, MOMENT's ``reduction="concat"``, FHBench's setting), so the
head sees which lead shows what; ``"mean"`` averages channels instead (head size independent of the channel count).

Deliberate differences from FHBench's released code: FHBench left-padded 1-second segments with zeros to 512
samples and passed no input mask, so RevIN statistics, attention and pooling all included the padding; fedhb
left-pads too but masks the padding (as MOMENT's own API intends), so the padded samples change nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedhb.data.base import Samples
from fedhb.models.base import Encoder, check_preset_modality

#: Random-init MOMENT of the real structure (512-sample input, 8-sample patches, gated-GELU T5 encoder), tiny widths.
MOMENT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-moment": {
        "seq_len": 512, "patch_len": 8, "patch_stride_len": 8,
        "t5_config": {"d_model": 32, "d_kv": 8, "num_heads": 4, "d_ff": 64, "num_layers": 2,
                      "feed_forward_proj": "gated-gelu", "vocab_size": 32, "relative_attention_num_buckets": 32,
                      "relative_attention_max_distance": 128, "dropout_rate": 0.1, "layer_norm_epsilon": 1e-6},
    },
}
#: Hub id of the checkpoint FHBench uses.
MOMENT_SMALL = "AutonLab/MOMENT-1-small"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def revin_normalize(x: Tensor, mask: Tensor, eps: float = 1e-5) -> Tensor:
    """Instance normalisation of each channel over its observed samples (RevIN without affine parameters).

    Args:
        x: ``(B, C, L)`` signals.
        mask: ``(B, L)`` 1 where observed.
        eps: Added to the standard deviation (not the variance), as MOMENT does.

    Returns:
        ``(B, C, L)``; unobserved positions are 0.
    """
    m = mask[:, None, :].to(x.dtype)
    count = m.sum(-1, keepdim=True).clamp_min(1)
    mean = (x * m).sum(-1, keepdim=True) / count
    var = ((x - mean) ** 2 * m).sum(-1, keepdim=True) / count  # population variance, no Bessel correction
    return (x - mean) / (var.sqrt() + eps) * m


def patch_mask(mask: Tensor, patch_len: int, stride: int) -> Tensor:
    """``(B, L)`` sample mask to ``(B, P)`` patch mask: a patch counts as observed only if all its samples are."""
    return (mask.unfold(-1, patch_len, stride).sum(-1) == patch_len).to(mask.dtype)


def sinusoidal_positions(length: int, d_model: int) -> Tensor:
    """``(1, length, d_model)`` fixed sine/cosine position codes (Vaswani et al.), as MOMENT builds them."""
    pe = torch.zeros(length, d_model)
    position = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div)
    return pe[None]


class _Positions(nn.Module):
    pe: Tensor

    def __init__(self, d_model: int, max_len: int = 5000) -> None:
        super().__init__()
        # Saved in MOMENT checkpoints as ``patch_embedding.position_embedding.pe``, so it must be a persistent buffer.
        self.register_buffer("pe", sinusoidal_positions(max_len, d_model))


class PatchEmbedding(nn.Module):
    """Linear patch embedding, learned mask token and sinusoidal positions (MOMENT's attribute names)."""

    def __init__(self, d_model: int, patch_len: int, dropout: float, positional: bool = True,
                 bias: bool = False) -> None:
        super().__init__()
        self.value_embedding = nn.Linear(patch_len, d_model, bias=bias)
        self.mask_embedding = nn.Parameter(torch.zeros(d_model))
        self.position_embedding = _Positions(d_model) if positional else None
        self.dropout = nn.Dropout(dropout)

    def forward(self, patches: Tensor, observed: Tensor) -> Tensor:
        """``(B, C, P, patch_len)`` patches and ``(B, P)`` patch mask to ``(B, C, P, d_model)`` tokens."""
        keep = observed[:, None, :, None].to(patches.dtype)
        x = keep * self.value_embedding(patches) + (1 - keep) * self.mask_embedding
        if self.position_embedding is not None:
            x = x + self.position_embedding.pe[:, : x.shape[2]]
        return self.dropout(x)


class MomentBackbone(nn.Module):
    """MOMENT without its task head; state-dict keys are MOMENT's (``patch_embedding.*``, ``encoder.*``).

    Args:
        config: MOMENT's config: ``t5_config`` (a T5 config dict), ``seq_len``, ``patch_len``, ``patch_stride_len`` and
            optionally ``patch_dropout`` (0.1), ``add_positional_embedding`` (true), ``value_embedding_bias``
            (false), ``revin_affine`` (false; true is refused because fedhb never denormalises).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        from transformers import T5Config, T5EncoderModel

        if config.get("revin_affine", False):
            raise ValueError("MOMENT config has revin_affine: true; only MOMENT-1's affine-free RevIN is supported")
        t5 = T5Config.from_dict({**config["t5_config"], "is_encoder_decoder": False, "use_cache": False})
        self.t5_config = t5
        self.seq_len = int(config["seq_len"])
        self.patch_len = int(config["patch_len"])
        self.stride = int(config.get("patch_stride_len", self.patch_len))
        self.d_model = t5.d_model
        self.patch_embedding = PatchEmbedding(
            t5.d_model, self.patch_len, float(config.get("patch_dropout", 0.1)),
            bool(config.get("add_positional_embedding", True)), bool(config.get("value_embedding_bias", False)))
        self.encoder = T5EncoderModel(t5).get_encoder()

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Encode ``(B, C, seq_len)`` signals with a ``(B, seq_len)`` observed mask.

        Returns:
            ``(B, C, P, d_model)`` token states and the ``(B, P)`` patch mask.
        """
        batch, channels, _ = x.shape
        x = torch.nan_to_num(revin_normalize(x, mask), nan=0.0, posinf=0.0, neginf=0.0)
        observed = patch_mask(mask, self.patch_len, self.stride)
        tokens = self.patch_embedding(x.unfold(-1, self.patch_len, self.stride), observed)
        patches = tokens.shape[2]
        attention = observed.repeat_interleave(channels, dim=0).long()
        out = self.encoder(inputs_embeds=tokens.reshape(batch * channels, patches, self.d_model),
                           attention_mask=attention).last_hidden_state
        return out.reshape(batch, channels, patches, self.d_model), observed


class TimeSeriesEncoder(Encoder):
    """MOMENT features of multichannel signals: per channel, the mean over observed patches; channels concatenated.

    Inputs shorter than the backbone's ``seq_len`` are left-padded with zeros and the padding is masked.
    """

    def __init__(self, model: MomentBackbone, channels: int, channel_pool: str = "concat") -> None:
        super().__init__()
        if channel_pool not in ("concat", "mean"):
            raise ValueError(f"channel_pool must be concat or mean, got {channel_pool!r}")
        self.model = model
        self.channels = channels
        self.channel_pool = channel_pool
        self.hidden_size = model.d_model * (channels if channel_pool == "concat" else 1)

    def prepare(self, samples: Samples) -> dict[str, Tensor]:
        inputs = samples.inputs
        if getattr(inputs, "ndim", None) != 3:
            raise ValueError(f"signal inputs must be a (samples, channels, length) array, got shape "
                             f"{getattr(inputs, 'shape', type(inputs).__name__)}")
        if inputs.shape[1] != self.channels:
            raise ValueError(f"the encoder was built for {self.channels} channels but the data has {inputs.shape[1]}")
        if inputs.shape[2] > self.model.seq_len:
            raise ValueError(f"segments of {inputs.shape[2]} samples are longer than the backbone's input of "
                             f"{self.model.seq_len}; use shorter segments (--data.segment_seconds) or a lower rate")
        # float32 shares memory with the loader's array; a whole dataset is not copied.
        return {"signal": torch.as_tensor(inputs, dtype=torch.float32)}

    def pad(self, signal: Tensor) -> tuple[Tensor, Tensor]:
        """Left-pad ``(B, C, L)`` to the backbone's ``seq_len``; returns the padded signal and its observed mask."""
        batch, _, length = signal.shape
        missing = self.model.seq_len - length
        mask = torch.ones(batch, self.model.seq_len, dtype=signal.dtype, device=signal.device)
        if missing > 0:
            signal = F.pad(signal, (missing, 0))
            mask[:, :missing] = 0
        return signal, mask

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        signal, mask = self.pad(batch["signal"].float())
        states, observed = self.model(signal, mask)
        weight = observed[:, None, :, None].to(states.dtype)
        pooled = (states * weight).sum(2) / weight.sum(2).clamp_min(1)  # (B, C, D)
        if self.channel_pool == "mean":
            return pooled.mean(1)
        # MOMENT's "concat" order: feature d * C + c.
        return pooled.transpose(1, 2).reshape(pooled.shape[0], -1)


def _resolve_folder(backbone: str) -> Path:
    path = Path(backbone).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(backbone, allow_patterns=["config.json", *_WEIGHT_FILES]))
    except Exception as err:  # noqa: BLE001 - offline, unknown repo or bad id: one message that says what to do
        raise ValueError(
            f"--model.backbone {backbone!r} is not a MOMENT preset ({', '.join(MOMENT_PRESETS)}), not a local "
            f"folder, and could not be fetched from the Hugging Face hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0]}). On a machine with network run `hf download {MOMENT_SMALL} --local-dir DIR` "
            f"and pass --model.backbone DIR."
        ) from err


def read_moment_config(folder: str | Path) -> dict[str, Any]:
    """MOMENT's ``config.json``, checked for the keys the backbone needs."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"{path} not found: a MOMENT folder holds config.json and model.safetensors")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    missing = [k for k in ("t5_config", "seq_len", "patch_len") if k not in config]
    if missing or not isinstance(config.get("t5_config"), dict):
        raise ValueError(f"{path}: not a MOMENT config, missing {missing or ['t5_config (a dict)']}; found keys "
                         f"{sorted(config)}")
    return config


def load_moment_weights(model: MomentBackbone, folder: str | Path) -> None:
    """Load a MOMENT checkpoint into ``model`` by name; its task head and RevIN buffers are skipped."""
    folder = Path(folder)
    file = next((folder / f for f in _WEIGHT_FILES if (folder / f).is_file()), None)
    if file is None:
        raise ValueError(f"{folder}: no {' or '.join(_WEIGHT_FILES)} next to config.json")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    ours = model.state_dict()
    skipped = ("head.", "normalizer.")
    unknown = [k for k in state if k not in ours and not k.startswith(skipped)]
    # The sinusoidal code is a deterministic buffer; older checkpoints may not carry it.
    missing = [k for k in ours if k not in state and k != "patch_embedding.position_embedding.pe"]
    if unknown or missing:
        raise ValueError(f"{file} does not match MOMENT's layout: missing {missing[:5]}, unexpected {unknown[:5]}")
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in ours.items()
              if k in state and state[k].shape != v.shape]
    if shapes:
        raise ValueError(f"{file}: shapes differ from config.json's: {shapes[:3]}")
    model.load_state_dict({k: v for k, v in state.items() if k in ours}, strict=False)


def build_moment(backbone: str) -> MomentBackbone:
    """A MOMENT backbone from a preset name, a hub id or a local folder (config.json + weights)."""
    check_preset_modality(backbone, "signal")
    if backbone in MOMENT_PRESETS:
        return MomentBackbone(MOMENT_PRESETS[backbone])
    folder = _resolve_folder(backbone)
    model = MomentBackbone(read_moment_config(folder))
    load_moment_weights(model, folder)
    return model


def build_signal_encoder(backbone: str, samples: Samples, channel_pool: str = "concat") -> TimeSeriesEncoder:
    """The MOMENT encoder for ``samples`` (``(N, channels, length)`` signals)."""
    shape: tuple[int, ...] = tuple(getattr(samples.inputs, "shape", ()))
    if len(shape) != 3:
        raise ValueError(f"signal inputs must be a (samples, channels, length) array, got shape {shape}")
    return TimeSeriesEncoder(build_moment(backbone), channels=int(shape[1]), channel_pool=channel_pool)
