"""The VQA task: its metrics on hand-computed cases, BLIP's two heads, and 2-round federations of both modes on the
tiny BLIP that give the same numbers on 1 and 2 processes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedhb.tasks.vqa import VQA, bleu_from_stats, exact_match, ngram_stats, normalize, token_f1


# -- metrics ----------------------------------------------------------------------------------------------------------
def test_answers_are_normalised_as_squad_does_and_scored_by_exact_match_and_token_f1():
    assert normalize("The  Left-Lung, (upper) lobe!") == "leftlung upper lobe"
    assert exact_match("The left lung.", "left lung") == 1.0 and exact_match("left lungs", "left lung") == 0.0
    # common tokens {left}: precision 1/3, recall 1/2, F1 = 2 * (1/6) / (5/6) = 0.4
    assert token_f1("left upper lobe", "left lung") == pytest.approx(0.4, abs=1e-12)
    # "lung" twice in the prediction, once in the reference: clipped to one match; P = 2/3, R = 1 -> F1 = 0.8
    assert token_f1("lung lung left", "left lung") == pytest.approx(0.8, abs=1e-12)
    assert token_f1("the", "a") == 1.0 and token_f1("an", "yes") == 0.0  # empty after normalisation


def test_bleu_of_a_hand_computed_pair_and_of_a_corpus_equals_torchmetrics():
    from torchmetrics.functional.text import bleu_score

    # "x y z w" against "x y z v": precisions 3/4, 2/3, 1/2, 0/1, equal lengths (no brevity penalty)
    stats = ngram_stats("x y z w", "x y z v")
    assert stats == [3, 2, 1, 0, 4, 3, 2, 1, 4, 4]
    assert bleu_from_stats(stats, 1) == pytest.approx(0.75, abs=1e-12)
    assert bleu_from_stats(stats, 2) == pytest.approx(math.sqrt(0.5), abs=1e-12)
    assert bleu_from_stats(stats, 3) == pytest.approx(0.25 ** (1 / 3), abs=1e-12)
    assert bleu_from_stats(stats, 4) == 0.0
    # A corpus with a short candidate (brevity penalty) and repeated n-grams (clipping): summed statistics give
    # torchmetrics' corpus BLEU on the normalised texts.
    preds = ["left lung left lung", "right lower lobe of lung", "fibrosis", "carcinoma colon metastatic"]
    refs = ["left lung", "right lower lobe", "pulmonary fibrosis with edema", "carcinoma of colon"]
    total = [sum(col) for col in zip(*(ngram_stats(p, r) for p, r in zip(preds, refs)))]
    for n in (1, 2, 3, 4):
        expected = float(bleu_score([normalize(p) for p in preds], [[normalize(r)] for r in refs], n_gram=n))
        assert bleu_from_stats(total, n) == pytest.approx(expected, abs=1e-6), n
    assert bleu_from_stats(total, 1) > 0 and bleu_from_stats(total, 3) > 0


def test_yes_no_accuracy_and_f1_per_client_and_from_summed_counts():
    task = VQA("classify")
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0], [-1.0, 1.0]])  # predicts yes, no, yes, yes
    labels = torch.tensor([1, 0, 0, 1])
    # tp 2, fp 1, fn 0, tn 1: accuracy 3/4, F1 = 2 * 2 / (2 * 2 + 1 + 0) = 0.8
    assert task.score(logits, labels).tolist() == pytest.approx([0.75, 0.8, 4.0])
    stats = task.global_stats(logits, labels)
    assert stats.tolist() == [2.0, 1.0, 0.0, 1.0]
    assert task.global_metrics(stats + task.global_stats(logits[:1], labels[:1])) == pytest.approx(
        {"global_acc": 4 / 5, "global_f1": 6 / 7})
    metrics = task.reduce({0: task.score(logits, labels), 1: task.score(logits[2:], labels[2:]), 2: task.empty_score()})
    assert metrics["personalized_acc"] == pytest.approx(0.625) and metrics["worst_client_acc"] == pytest.approx(0.5)
    assert metrics["client_acc"]["2"] != metrics["client_acc"]["2"]  # NaN: a client without test samples


@pytest.fixture(scope="module")
def generative() -> Any:
    """The generate-mode task with the tiny BLIP built (its tokenizer decodes answers)."""
    from fedhb.config import ModelArgs

    task = VQA("generate", answer_length=16)
    encoders = task.build_encoders(ModelArgs(backbone="tiny-blip", max_length=16), None)  # type: ignore[arg-type]
    return task, encoders["vqa"]


def test_open_answers_are_scored_on_decoded_token_ids_and_the_union_from_summed_statistics(generative):
    task, encoder = generative
    refs = ["left lung", "mesothelioma", "right lower lobe", "fibrosis"]
    preds = ["the left lung", "carcinoma", "right lobe", "fibrosis"]
    targets = torch.from_numpy(encoder.answer_ids(refs))
    output = torch.from_numpy(encoder.answer_ids(preds)).float()
    assert targets[0, 0] == encoder.bos_token_id and task.texts(targets) == refs

    score = task.score(output, targets)
    f1 = [1.0, 0.0, 0.8, 1.0]  # "right lobe" vs "right lower lobe": P 1, R 2/3
    total = [sum(col) for col in zip(*(ngram_stats(p, r) for p, r in zip(preds, refs)))]
    expected = [0.5, float(np.mean(f1)), *(bleu_from_stats(total, n) for n in (1, 2, 3, 4)), 4.0]
    assert score.tolist() == pytest.approx(expected, abs=1e-12)
    halves = task.global_stats(output[:2], targets[:2]) + task.global_stats(output[2:], targets[2:])
    union = task.global_metrics(halves)
    assert union["global_acc"] == pytest.approx(0.5) and union["global_f1"] == pytest.approx(np.mean(f1))
    assert [union[f"global_bleu{n}"] for n in (1, 2, 3, 4)] == pytest.approx(score[2:6].tolist(), abs=1e-12)
    assert task.global_stats(output[:0], targets[:0]).shape == halves.shape  # a rank without clients adds zeros


def test_the_answer_decoder_is_the_head_trained_teacher_forced_and_generates_fixed_length_answers(generative):
    task, encoder = generative
    decoder = task.head(encoder.hidden_size, 0.0)
    trainable = [n for n, p in decoder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # the decoder's LoRA only: its backbone is frozen
    states = torch.randn(3, 5, encoder.hidden_size)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    answers = torch.from_numpy(encoder.answer_ids(["yes", "left lung", "no"]))
    logits = decoder(states, mask, answers)
    width = int((answers != decoder.pad).sum(1).max())
    assert logits.shape == (3, width - 1, len(task.tokenizer))
    loss = task.loss(logits, answers)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in decoder.parameters() if p.requires_grad)
    generated = decoder.generate(states, mask)
    assert generated.shape == (3, 16) and bool((generated[:, 0] == decoder.bos).all())
    # Greedy decoding is the argmax of the teacher-forced logits on its own output, step by step.
    first = decoder(states, mask, generated)[:, 0].argmax(-1)
    assert torch.equal(first, generated[:, 1])


# -- federations ------------------------------------------------------------------------------------------------------
def _run(data: Any, out: Path, world: int, algorithm: str) -> Any:
    from fedhb.algorithms import EPFL, FedAvg
    from fedhb.config import CheckpointArgs, FabricArgs, FederationArgs, LoRAArgs, ModelArgs, OptimArgs, PartitionArgs
    from fedhb.fit import _Run

    args = dict(
        data=data, algorithm=FedAvg() if algorithm == "fedavg" else EPFL(lam=0.5), out_dir=str(out), seed=3,
        partition=PartitionArgs(num_clients=3, scheme="iid", min_samples=2),
        model=ModelArgs(backbone="tiny-blip", max_length=16, head_dropout=0.1,
                        lora=LoRAArgs(target_modules=["query", "value"])),
        federation=FederationArgs(rounds=2, batch_size=4, eval_batch_size=8),
        optim=OptimArgs(name="adam", lr=0.03, schedule="constant", min_lr=0.0),
        fabric=FabricArgs(accelerator="cpu", devices=world, strategy="ddp_spawn" if world > 1 else "auto"),
        checkpoint=CheckpointArgs(),
    )
    return _Run.of(**args)


def _federations(fabric: Any, plan: list[tuple[str, Any, str]], out: str) -> dict[str, Any] | None:
    histories = {}
    for name, data, algorithm in plan:
        folder = Path(out) / name
        _run(data, folder, fabric.world_size, algorithm)(fabric)
        if fabric.global_rank == 0:
            histories[name] = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return histories if fabric.global_rank == 0 else None


def _launch(world: int, plan: list[tuple[str, Any, str]], out: Path) -> dict[str, Any]:
    from fedhb.config import FabricArgs
    from fedhb.strategy import make_fabric

    fabric = make_fabric(FabricArgs(accelerator="cpu", devices=world, strategy="ddp_spawn" if world > 1 else "auto"))
    return fabric.launch(_federations, plan, str(out))


@pytest.mark.slow
def test_both_modes_federate_for_two_rounds_with_the_same_numbers_on_one_and_two_processes(tmp_path):
    from fedhb.data import EHRXQA, PathVQA
    from fedhb.data.fixtures_vqa import write_ehrxqa_fixture, write_pathvqa_fixture

    root = write_pathvqa_fixture(tmp_path / "pathvqa", images=(6, 3, 3), questions=2)
    release, images = write_ehrxqa_fixture(tmp_path / "ehrxqa", patients=6, studies=1)
    plan = [("yes_no", PathVQA(str(root), subset="yes_no"), "fedavg"),
            ("open", EHRXQA(str(release), str(images), subset="all", answer_length=8,
                            cache_dir=str(tmp_path / "cache")), "epfl")]
    one = _launch(1, plan, tmp_path / "one")
    two = _launch(2, plan, tmp_path / "two")

    for name in ("yes_no", "open"):
        assert [r["round"] for r in one[name]] == [1, 2]
        for a, b in zip(one[name], two[name]):
            for key, value in a.items():
                if key in ("round_time_s", "failures"):
                    continue
                if isinstance(value, float):
                    assert (math.isnan(value) and math.isnan(b[key])) or value == pytest.approx(b[key], abs=1e-6), key
                else:
                    assert value == b[key], key
        last = one[name][-1]
        assert math.isfinite(last["train_loss"]) and math.isfinite(last["personalized_acc"])
        assert all(math.isfinite(v) for v in last["client_acc"].values())
    assert set(one["open"][-1]) >= {"personalized_bleu4", "global_bleu1"}
    assert one["open"][-1]["global_acc"] is None  # EPFL personalises every client: no global model
    assert math.isfinite(one["yes_no"][-1]["global_acc"]) and math.isfinite(one["open"][-1]["personalized_bleu1"])


def test_a_local_blip_folder_loads_through_blip_processor_as_the_hub_model_would(tmp_path):
    """``--model.backbone DIR``: the weights, tokenizer and image statistics of a folder written by ``save_pretrained``
    (a random tiny BLIP, so nothing is downloaded); with LoRA's B at zero the encoder is BLIP's own."""
    from transformers import BlipConfig, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

    from fedhb.config import LoRAArgs, ModelArgs
    from fedhb.models.blip import BLIP_PRESETS, build_blip, tiny_blip_tokenizer

    tokenizer = tiny_blip_tokenizer()
    preset = BLIP_PRESETS["tiny-blip"]
    text = dict(preset["text"], vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id)
    blip = BlipForQuestionAnswering(BlipConfig(text_config=text, vision_config=preset["vision"])).eval()
    blip.save_pretrained(tmp_path)
    image = BlipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2] * 3)
    BlipProcessor(image_processor=image, tokenizer=tokenizer).save_pretrained(tmp_path)

    loaded = build_blip(ModelArgs(backbone=str(tmp_path), max_length=16), answer_length=6)
    encoder = loaded.encoder
    assert encoder.image_size == 32 and encoder.mean.flatten().tolist() == pytest.approx([0.5, 0.4, 0.3])
    assert encoder.bos_token_id == tokenizer.bos_token_id and encoder.name == tmp_path.name
    assert loaded.decoder is not None and loaded.decoder.sep == tokenizer.sep_token_id
    pixels = torch.rand(2, 3, 32, 32)
    ids = torch.tensor([tokenizer("is it left?")["input_ids"] + [0], tokenizer("what is it?")["input_ids"] + [0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        image_states = blip.vision_model(pixel_values=pixels).last_hidden_state
        expected = blip.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_states,
                                     encoder_attention_mask=torch.ones(image_states.shape[:2], dtype=torch.long))
        got = encoder.model(pixel_values=pixels, input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(got, expected.last_hidden_state)
    with pytest.raises(ValueError, match="'tiny-vit' is not a BLIP"):  # another family's preset, not a hub id
        build_blip(ModelArgs(backbone="tiny-vit"))
    with pytest.raises(ValueError, match=r"no linear module named \['qurey'\]"):
        build_blip(ModelArgs(backbone="tiny-blip", lora=LoRAArgs(target_modules=["query", "qurey"])))
