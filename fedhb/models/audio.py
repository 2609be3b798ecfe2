"""Audio backbone: wav2vec 2.0 (Baevski et al., arXiv 2006.11477) through transformers' ``Wav2Vec2Model``.

FHBench fine-tunes ``facebook/wav2vec2-base-960h`` with LoRA on the attention's ``q_proj``/``v_proj`` for the lung
sound datasets. fedhb loads the same checkpoint (hub id or local folder) as a bare ``Wav2Vec2Model``, resamples the
audio to the rate the checkpoint was trained at (16 kHz, read from its ``preprocessor_config.json``), normalises each
clip to zero mean and unit variance as its feature extractor does (``do_normalize``), and mean-pools the last hidden
states over frames. Deliberate difference: FHBench used ``Wav2Vec2ForSequenceClassification``, whose pooled features
pass a 256-wide projector before the classifier; fedhb's head is one linear layer on the pooled hidden states, like
every other fedhb backbone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedhb.data._signal_io import resample
from fedhb.data.base import Samples
from fedhb.models.base import Encoder, check_preset_modality, load_pretrained

#: Random-init wav2vec2 of the real structure (7-layer conv feature encoder with total stride 320, conv positional
#: embedding, post-norm transformer), tiny widths: ~26k parameters.
AUDIO_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-wav2vec2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          conv_dim=(16,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
                          num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, mask_time_length=2,
                          vocab_size=8),
}
#: Hub id of the checkpoint FHBench uses.
WAV2VEC2_BASE = "facebook/wav2vec2-base-960h"


class AudioEncoder(Encoder):
    """Mean-pooled last hidden states of a wav2vec2 model over mono clips of equal length."""

    def __init__(self, model: torch.nn.Module, sample_rate: int = 16000, normalize: bool = True) -> None:
        super().__init__()
        self.model = model
        self.sample_rate = int(sample_rate)
        self.normalize = normalize
        self.hidden_size = int(model.config.hidden_size)  # type: ignore[union-attr,arg-type]

    def prepare(self, samples: Samples) -> dict[str, Tensor]:
        audio = samples.inputs
        if getattr(audio, "ndim", None) == 3 and audio.shape[1] == 1:
            audio = audio[:, 0]
        if getattr(audio, "ndim", None) != 2:
            raise ValueError(f"audio inputs must be a (samples, length) array of mono clips, got shape "
                             f"{getattr(audio, 'shape', type(audio).__name__)}")
        rate = samples.meta.get("sample_rate")
        if rate is None:
            raise ValueError("audio samples must say their rate in meta['sample_rate']")
        audio = resample(np.asarray(audio, dtype=np.float32), int(rate), self.sample_rate)
        return {"audio": torch.as_tensor(audio, dtype=torch.float32)}

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        x = batch["audio"].float()
        if self.normalize:
            # Wav2Vec2FeatureExtractor's zero-mean unit-variance normalisation, per clip.
            x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-7)
        return self.model(input_values=x).last_hidden_state.mean(1)


def _processor_settings(backbone: str) -> tuple[int, bool]:
    """The checkpoint's sampling rate and ``do_normalize`` (16 kHz and True when it ships no processor config)."""
    try:
        from transformers import AutoFeatureExtractor

        proc = AutoFeatureExtractor.from_pretrained(backbone)
        return int(getattr(proc, "sampling_rate", 16000)), bool(getattr(proc, "do_normalize", True))
    except Exception:  # noqa: BLE001 - no or odd preprocessor_config.json: wav2vec2's defaults
        return 16000, True


def build_audio_encoder(backbone: str) -> AudioEncoder:
    """A preset name (``tiny-wav2vec2``), a hub id (``facebook/wav2vec2-base-960h``) or a local folder."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    check_preset_modality(backbone, "audio")

    if backbone in AUDIO_PRESETS:
        return AudioEncoder(Wav2Vec2Model(Wav2Vec2Config(**AUDIO_PRESETS[backbone])))
    try:
        model = load_pretrained(Wav2Vec2Model, backbone)
    except ValueError as err:
        raise ValueError(f"audio datasets need a wav2vec2 backbone: a preset ({', '.join(AUDIO_PRESETS)}), a hub id "
                         f"such as {WAV2VEC2_BASE} or a local folder. {err}") from err
    rate, normalize = _processor_settings(backbone)
    return AudioEncoder(model, sample_rate=rate, normalize=normalize)
