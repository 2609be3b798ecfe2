"""Multimodal samples, encoders by modality, fusion, missing modalities and what a multimodal run records."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedhb import seeds
from fedhb.client import ClientModule
from fedhb.config import ENCODED_MODALITIES, ModelArgs, OptimArgs, PartitionArgs
from fedhb.data.base import MODALITIES, Samples
from fedhb.data.partition import ClientSplit, client_modalities, drop_modality, partition_samples
from fedhb.models import build_encoders, build_fusion, bytes_by_modality
from fedhb.models.base import Encoder
from fedhb.models.gated_fusion import GatedFusion
from fedhb.models.late_fusion import LateFusion
from fedhb.models.lora import adapter_names, encoder_of, is_lora, lora_pairs, select_layers
from fedhb.models.tabular import TabularEncoder
from fedhb.tasks import Classification


def toy(present_text=(True, False, True), present_tabular=None) -> Samples:
    present = {"text": np.array(present_text)}
    if present_tabular is not None:
        present["tabular"] = np.array(present_tabular)
    return Samples(inputs={"text": ["aa", "", "bbbb"], "tabular": np.arange(6, dtype=np.float32).reshape(3, 2)},
                   labels=np.array([0, 1, 0]), num_classes=2, task="binary", modality="multimodal",
                   groups={"patient": np.array([0, 0, 1])}, present=present,
                   meta={"dataset": "toy", "tabular": {"feature_names": ["x", "y"]}})


# -- samples -----------------------------------------------------------------------------------------------------------
def test_multimodal_samples_subset_view_and_presence():
    s = toy()

    sub = s.subset(np.array([2, 1]))
    view = s.view("tabular")

    assert s.modalities == ("text", "tabular") and MODALITIES == ENCODED_MODALITIES
    assert sub.inputs["text"] == ["bbbb", ""] and sub.inputs["tabular"].tolist() == [[4, 5], [2, 3]]
    assert sub.presence("text").tolist() == [True, False] and sub.presence("tabular").tolist() == [True, True]
    assert sub.groups["patient"].tolist() == [1, 0]
    assert view.modality == "tabular" and view.inputs is s.inputs["tabular"]
    assert view.meta == {"dataset": "toy", "feature_names": ["x", "y"]}
    assert s.with_presence({"tabular": np.array([True, True, False])}).presence("text").tolist() == [True, False, True]


def test_unimodal_samples_are_their_own_view():
    s = Samples(inputs=np.zeros((2, 4, 4), np.uint8), labels=np.array([0, 1]), num_classes=2, task="binary",
                modality="image")

    assert s.modalities == ("image",) and s.view("image") is s and s.presence("image").tolist() == [True, True]
    assert s.subset(np.array([1])).present == {}


@pytest.mark.parametrize(("make", "message"), [
    (lambda: Samples(inputs={"text": ["a"]}, labels=np.zeros(1, int), num_classes=2, task="binary", modality="text"),
     "exactly when modality is 'multimodal'"),
    (lambda: Samples(inputs={"ecg": ["a"]}, labels=np.zeros(1, int), num_classes=2, task="binary",
                     modality="multimodal"), "keyed by modalities"),
    (lambda: toy().with_presence({"image": np.ones(3, bool)}), "which the samples do not carry"),
    (lambda: toy(present_text=(1, 0, 1)), "bool array"),
    (lambda: toy(present_text=(True, False, True), present_tabular=(True, False, True)),
     "1 samples hold none of the modalities"),
])
def test_malformed_multimodal_samples_are_refused_naming_the_problem(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# -- fusion -----------------------------------------------------------------------------------------------------------
def _set(linear: nn.Linear, weight, bias) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(weight, dtype=torch.float32))
        linear.bias.copy_(torch.tensor(bias, dtype=torch.float32))


def test_late_fusion_concatenates_projections_and_puts_the_placeholder_where_a_modality_is_absent():
    fusion = LateFusion({"text": 2, "tabular": 1}, dim=2)
    _set(fusion.proj["text"], [[1, 0], [0, 1]], [0, 0])
    _set(fusion.proj["tabular"], [[2], [3]], [1, 1])
    with torch.no_grad():
        fusion.placeholder["text"].copy_(torch.tensor([7.0, 8.0]))
    features = {"text": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "tabular": torch.tensor([[1.0], [5.0]])}
    present = {"text": torch.tensor([True, False]), "tabular": torch.tensor([True, True])}

    out = fusion(features, present)
    other = fusion({**features, "text": torch.tensor([[1.0, 2.0], [100.0, -100.0]])}, present)

    assert out.tolist() == [[1, 2, 3, 4], [7, 8, 11, 16]] and fusion.out_features == 4
    assert torch.equal(out, other)  # an absent modality's features never reach the head
    out[1, :2].sum().backward()
    assert fusion.placeholder["text"].grad.tolist() == [1.0, 1.0]  # the placeholder is learned


def test_gated_fusion_is_the_gmu_for_two_modalities_and_passes_a_lone_modality_through():
    fusion = GatedFusion({"text": 1, "tabular": 1}, dim=1)
    _set(fusion.proj["text"], [[1.0]], [0.0])
    _set(fusion.proj["tabular"], [[1.0]], [0.0])
    _set(fusion.gate, [[1.0, 0.0], [0.0, -1.0]], [0.0, 0.0])  # g_text = h_text, g_tabular = -h_tabular
    features = {"text": torch.tensor([[0.5], [0.5], [0.5]]), "tabular": torch.tensor([[0.25], [0.25], [0.25]])}
    present = {"text": torch.tensor([True, True, False]), "tabular": torch.tensor([True, False, True])}

    out = fusion(features, present).squeeze(1)

    h_text, h_tab = math.tanh(0.5), math.tanh(0.25)
    z = 1 / (1 + math.exp(-(h_text - (-h_tab))))  # Arevalo et al.: z = sigmoid(g_v - g_t) for two modalities
    assert out[0].item() == pytest.approx(z * h_text + (1 - z) * h_tab, abs=1e-6)
    assert out[1].item() == pytest.approx(h_text, abs=1e-7) and out[2].item() == pytest.approx(h_tab, abs=1e-7)
    assert fusion.out_features == 1


class Lengths(Encoder):
    """A stand-in text encoder whose feature is the text's length; records what it was asked to encode."""

    hidden_size = 1

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Linear(1, 1)
        self.seen: list[list[float]] = []

    def prepare(self, samples):
        return {"len": torch.tensor([[float(len(t))] for t in samples.inputs])}

    def forward(self, batch):
        self.seen.append(batch["len"].squeeze(1).tolist())
        return self.model(batch["len"])


def test_the_client_model_runs_each_encoder_on_the_samples_that_hold_its_modality_only():
    torch.manual_seed(0)
    text = Lengths()
    module = ClientModule({"text": text, "tabular": TabularEncoder(2, (4,))}, Classification("binary", 2), OptimArgs(),
                          fusion=LateFusion({"text": 1, "tabular": 4}, 3))
    tensors = module.prepare(toy())
    changed = toy()
    changed.inputs["text"][1] = "a long placeholder"  # what an absent sample holds never matters
    other = module.prepare(changed)

    features = module.features(tensors)

    assert set(tensors) == {"text/len", "text/present", "tabular/values", "tabular/present", "labels"}
    assert text.seen == [[2.0, 4.0]]  # the sample without text was never encoded
    assert torch.equal(features[1, :3], module.fusion.placeholder["text"].detach())
    assert torch.equal(module.features(other), features)
    assert list(module.trainable())[:2] == ["encoders.text.model.weight", "encoders.text.model.bias"]


# -- encoders per modality ------------------------------------------------------------------------------------------
def test_one_encoder_per_modality_lora_on_the_backbones_and_a_whole_mlp_for_tabular(multimodal_data):
    args = ModelArgs(backbones={"text": "tiny-bert"})

    torch.manual_seed(0)
    encoders = build_encoders(args, multimodal_data)
    fusion = build_fusion(args, encoders, multimodal=True)

    assert list(encoders) == ["text", "tabular"] and encoders["tabular"].hidden_size == 128  # mlp: the default
    text_trainable = [n for n, p in encoders["text"].named_parameters() if p.requires_grad]
    assert text_trainable and all(is_lora(n) for n in text_trainable)
    assert all(p.requires_grad and not is_lora(n) for n, p in encoders["tabular"].named_parameters())
    assert isinstance(fusion, LateFusion) and fusion.out_features == 2 * 128
    assert isinstance(build_fusion(ModelArgs(fusion="gated"), encoders, True), GatedFusion)


@pytest.mark.parametrize(("backbones", "message"), [
    ({"tabular": "mlp"}, "--model.backbones has no backbone for text"),
    ({"text": "tiny-bert", "image": "tiny-vit"}, r"--model.backbones names \['image'\], which the data does not"),
    ({"text": "tiny-bert", "tabular": "tiny-vit"}, "'tiny-vit' is an image preset, but this dataset holds tabular"),
])
def test_wrong_backbones_are_refused_naming_the_option(multimodal_data, backbones, message):
    with pytest.raises(ValueError, match=message):
        build_encoders(ModelArgs(backbones=backbones), multimodal_data)


def test_unimodal_data_refuses_backbones_and_bad_options_name_their_flag(tiny_data):
    with pytest.raises(ValueError, match="--model.backbones is for multimodal data"):
        build_encoders(ModelArgs(backbones={"image": "tiny-vit"}), tiny_data)
    with pytest.raises(ValueError, match="--model.backbones"):
        ModelArgs(backbones={"ecg": "tiny-moment"})
    with pytest.raises(ValueError, match="--model.fusion"):
        ModelArgs(fusion="sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--partition.missing_fraction"):
        PartitionArgs(missing_fraction=1.5)


def test_epfl_layer_halves_are_taken_per_encoder():
    image = [adapter_names(f"encoders.image.model.layer.{i}.query") for i in range(4)]
    text = [adapter_names(f"encoders.text.model.layer.{i}.query") for i in range(2)]
    names = [n for pair in image + text for n in pair]
    pairs = lora_pairs(names)

    assert select_layers(pairs, "first_half") == [image[0], image[1], text[0]]
    assert select_layers(pairs, "second_half") == [image[2], image[3], text[1]]
    assert select_layers(pairs, "all") == pairs
    plain = lora_pairs([n for i in range(4) for n in adapter_names(f"layer.{i}")])  # one model: as before
    assert select_layers(plain, "first_half") == plain[:2] and select_layers(plain, "second_half") == plain[2:]
    assert encoder_of(image[0][0]) == "image" and encoder_of("head.1.weight") == ""


def test_bytes_are_counted_by_modality_fusion_and_head():
    shapes = {"encoders.text.model.x": (10, 4), "algo/c/encoders.text.model.x": (10, 4),
              "encoders.tabular.model.0.weight": (6, 4), "fusion.proj.text.weight": (3, 4), "head.1.weight": (2, 8),
              "lora/rank": (1, 8)}

    assert bytes_by_modality(shapes) == {"text": 80, "tabular": 24, "fusion": 12, "head": 16, "other": 8}


# -- missing modalities -----------------------------------------------------------------------------------------------
def _four_clients(n: int = 40) -> tuple[Samples, list[ClientSplit]]:
    samples = Samples(inputs={"text": ["t"] * n, "tabular": np.zeros((n, 2), np.float32)},
                      labels=np.arange(n) % 2, num_classes=2, task="binary", modality="multimodal",
                      present={"tabular": np.arange(n) != 0})  # sample 0 holds text only
    splits = [ClientSplit(np.arange(c, n, 4)[:6], np.arange(c, n, 4)[6:8], np.arange(c, n, 4)[8:]) for c in range(4)]
    return samples, splits


def test_whole_clients_lose_a_modality_drawn_from_their_named_stream():
    samples, splits = _four_clients()

    out, counts = drop_modality(samples, splits, "text", 0.5, "client", seed=3)
    again, _ = drop_modality(samples, splits, "text", 0.5, "client", seed=3)

    chosen = sorted(seeds.rng(3, seeds.Stream.MISSING).choice(4, 2, replace=False).tolist())
    held = {c: client_modalities(out, s) for c, s in enumerate(splits)}
    assert [c for c in range(4) if held[c] == ["tabular"]] == [c for c in chosen if c != 0]
    assert all(held[c] == ["text", "tabular"] for c in range(4) if c not in chosen or c == 0)
    assert out.presence("text")[0]  # client 0's sample 0 holds text only: it keeps it
    assert counts == {"clients": 2, "removed": sum(10 for c in chosen) - (1 if 0 in chosen else 0),
                      "kept_last": 1 if 0 in chosen else 0}
    assert np.array_equal(again.presence("text"), out.presence("text")) and out.inputs is samples.inputs


def test_samples_lose_a_modality_in_a_seeded_fraction_of_every_client():
    samples, splits = _four_clients()

    out, counts = drop_modality(samples, splits, "text", 0.3, "sample", seed=1)

    for c, s in enumerate(splits):
        index = np.concatenate([s.train, s.val, s.test])
        eligible = 10 - (1 if c == 0 else 0)
        assert int((~out.presence("text")[index]).sum()) == round(0.3 * eligible), c
    assert out.presence("text")[0] and counts == {"clients": 0, "removed": 12, "kept_last": 0}  # 3 per client
    assert not np.array_equal(drop_modality(samples, splits, "text", 0.3, "sample", seed=2)[0].presence("text"),
                              out.presence("text"))
    with pytest.raises(ValueError, match="--partition.missing_modality 'image'"):
        drop_modality(samples, splits, "image", 0.3, "sample", seed=1)


# -- natural partition by site, patients kept whole ---------------------------------------------------------------
def test_natural_partition_by_site_keeps_every_patient_on_one_client_and_one_side(multimodal_data):
    s = multimodal_data
    patient, site = s.groups["patient"], s.groups["site"]

    splits = partition_samples(s, "natural", 2, 0.5, 10, (0.5, 0.0, 0.5), 0, patient, site)

    assert sorted(tuple(np.unique(site[np.concatenate([x.train, x.test])])) for x in splits) == [(0,), (1,)]
    owners: dict[int, set[tuple[int, str]]] = {}
    for c, x in enumerate(splits):
        for side in ("train", "test"):
            for p in np.unique(patient[getattr(x, side)]):
                owners.setdefault(int(p), set()).add((c, side))
    assert all(len(v) == 1 for v in owners.values())
    several = int(np.flatnonzero(np.bincount(patient) > 1)[0])  # a patient with two images or more
    mixed = site.copy()
    mixed[np.flatnonzero(patient == several)[0]] = 1 - mixed[np.flatnonzero(patient == several)[0]]
    with pytest.raises(ValueError, match="--partition.natural_by: 1 groups of --partition.group_by lie in more"):
        partition_samples(s, "natural", 2, 0.5, 10, (0.5, 0.0, 0.5), 0, patient, mixed)
