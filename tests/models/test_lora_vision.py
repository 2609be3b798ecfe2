"""LoRA injection on real transformers classes and the image encoder's resizing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedhb.config import LoRAArgs, ModelArgs
from fedhb.data.base import Samples
from fedhb.models import build_encoder
from fedhb.models.lora import apply_lora, resolve_target_modules
from fedhb.models.vision import ImageEncoder, build_image_encoder


def _samples(images):
    return Samples(inputs=images, labels=np.zeros(len(images), dtype=np.int64), num_classes=2, task="binary",
                   modality="image")


def test_query_value_resolve_to_the_names_the_backbone_has():
    from transformers import BertConfig, BertModel

    vit = build_image_encoder("tiny-vit").model
    bert = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                vocab_size=50))

    assert resolve_target_modules(vit, ["query", "value"]) == ["q_proj", "v_proj"]
    assert resolve_target_modules(bert, ["query", "value"]) == ["query", "value"]
    assert resolve_target_modules(vit, ["fc1"]) == ["fc1"]


def test_output_resolves_to_the_attention_output_projection_only():
    from transformers import BertConfig, BertModel

    vit = build_image_encoder("tiny-vit").model
    bert = BertModel(BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                vocab_size=50))

    assert resolve_target_modules(vit, ["output"]) == ["o_proj"]
    assert resolve_target_modules(bert, ["output"]) == ["attention.output.dense"]
    adapted = {n.split(".lora_A.")[0] for n, _ in apply_lora(bert, LoRAArgs(target_modules=["output"]))
               .named_parameters() if ".lora_A." in n}
    # Not the feed-forward output (encoder.layer.N.output.dense), which has the same leaf name.
    assert adapted == {f"encoder.layer.{i}.attention.output.dense" for i in range(2)}


def test_unknown_target_module_names_the_flag_and_lists_what_exists():
    vit = build_image_encoder("tiny-vit").model

    with pytest.raises(ValueError, match=r"--model.lora.target_modules.*'qkv'.*'q_proj'"):
        resolve_target_modules(vit, ["qkv"])


def test_only_lora_matrices_are_trainable_and_b_starts_at_zero():
    model = apply_lora(build_image_encoder("tiny-vit").model, LoRAArgs(r=4))

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}

    # 2 layers x (q, v) x (A, B)
    assert len(trainable) == 8
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(torch.count_nonzero(p) == 0 for n, p in trainable.items() if ".lora_B." in n)
    a = next(p for n, p in trainable.items() if ".lora_A." in n)
    assert a.shape == (4, 64)


def test_lora_changes_nothing_until_b_moves():
    torch.manual_seed(0)
    encoder = build_image_encoder("tiny-vit")
    batch = encoder.prepare(_samples(np.random.default_rng(0).integers(0, 255, (3, 28, 28), dtype=np.uint8)))
    encoder.eval()
    before = encoder(batch)
    encoder.model = apply_lora(encoder.model, LoRAArgs())
    encoder.eval()

    torch.testing.assert_close(encoder(batch), before)


def test_gray_images_are_channel_matched_and_resized():
    encoder = ImageEncoder(build_image_encoder("tiny-vit").model, image_size=32, channels=3)
    pixels = encoder.prepare(_samples(np.full((2, 28, 28), 255, dtype=np.uint8)))["pixels"]

    x = encoder.pixel_values(pixels)

    assert pixels.dtype == torch.uint8 and pixels.shape == (2, 1, 28, 28)
    assert x.shape == (2, 3, 32, 32)
    torch.testing.assert_close(x, torch.ones_like(x))  # (1 - 0.5) / 0.5


def test_rgb_images_become_channels_first():
    encoder = build_image_encoder("tiny-vit")

    pixels = encoder.prepare(_samples(np.zeros((2, 28, 28, 3), dtype=np.uint8)))["pixels"]

    assert pixels.shape == (2, 3, 28, 28)


def test_unknown_backbone_explains_the_offline_fix():
    with pytest.raises(ValueError, match=r"--model.backbone 'no-such/model'.*hf download"):
        build_encoder(ModelArgs(backbone="no-such/model"), _samples(np.zeros((1, 28, 28), dtype=np.uint8)))


def test_local_folder_backbone_loads(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32)).save_pretrained(tmp_path)

    encoder = build_encoder(ModelArgs(backbone=str(tmp_path)), _samples(np.zeros((1, 28, 28), dtype=np.uint8)))

    assert encoder.image_size == 16
    assert any(".lora_A." in n for n, _ in encoder.named_parameters())
