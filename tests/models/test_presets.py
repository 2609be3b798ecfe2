"""A preset of another modality is refused with the presets that fit, not sent to the hub as an id."""

from __future__ import annotations

import numpy as np
import pytest

from fedhb.config import ModelArgs
from fedhb.data.base import Samples
from fedhb.models import build_encoder
from fedhb.models.base import check_preset_modality, presets


def _samples(modality: str) -> Samples:
    inputs = {"image": np.zeros((2, 28, 28), dtype=np.uint8), "text": ["a b", "c d"],
              "signal": np.zeros((2, 12, 250), dtype=np.float32), "audio": np.zeros((2, 16000), dtype=np.float32)}
    return Samples(inputs=inputs[modality], labels=np.array([0, 1]), num_classes=2, task="binary", modality=modality,
                   meta={"sample_rate": 16000})


def test_every_modality_has_presets_and_no_name_is_shared():
    table = presets()

    assert set(table) == {"image", "text", "signal", "audio", "tabular"}
    assert "tiny-vit" in table["image"] and "minilm" in table["text"]
    names = [n for ns in table.values() for n in ns]
    assert len(names) == len(set(names))


def test_an_image_preset_for_a_text_dataset_names_both_and_the_text_presets():
    with pytest.raises(ValueError) as err:
        build_encoder(ModelArgs(backbone="tiny-vit"), _samples("text"))

    message = str(err.value)
    assert message.startswith("--model.backbone 'tiny-vit' is an image preset, but this dataset holds text: pass a "
                              "text preset (tiny-bert, tiny-roberta, minilm)")
    assert "hf download" not in message  # the old advice: download "tiny-vit" from the hub


@pytest.mark.parametrize(("backbone", "modality", "kind"), [("tiny-bert", "image", "a text preset"),
                                                            ("tiny-vit", "signal", "an image preset"),
                                                            ("tiny-moment", "audio", "a signal preset"),
                                                            ("tiny-wav2vec2", "text", "an audio preset")])
def test_every_builder_refuses_another_modalitys_preset(backbone, modality, kind):
    with pytest.raises(ValueError, match=f"'{backbone}' is {kind}, but this dataset holds"):
        build_encoder(ModelArgs(backbone=backbone), _samples(modality))


def test_a_local_folder_named_like_a_preset_is_not_refused(tmp_path, monkeypatch):
    (tmp_path / "tiny-vit").mkdir()
    monkeypatch.chdir(tmp_path)

    check_preset_modality("tiny-vit", "text")  # the folder is what gets loaded
    with pytest.raises(ValueError):
        check_preset_modality("tiny-bert", "image")
