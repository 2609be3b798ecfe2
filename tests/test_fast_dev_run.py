"""``--fast_dev_run true``: what it replaces, and every config in configs/ run that way on fixture data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedhb.config import FederationArgs, ModelArgs, PartitionArgs
from fedhb.data.partition import ClientSplit
from fedhb.fast_dev_run import dev_federation, dev_model, dev_partition, dev_splits, tiny_preset

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TINY = {"tiny-vit", "tiny-bert", "tiny-roberta", "tiny-moment", "tiny-wav2vec2", "tiny-mlp"}
TINY |= {"tiny-segresnet", "tiny-swinunetr", "tiny-swinunetr-lora"}  # BraTS (fedhb.models.segmentation)
TINY |= {"tiny-blip"}  # PathVQA, EHRXQA (fedhb.models.blip)


def test_backbones_become_the_tiny_preset_of_their_family(tiny_data, multimodal_data):
    assert tiny_preset("text", "roberta-base") == "tiny-roberta" and tiny_preset("text", "minilm") == "tiny-bert"
    assert tiny_preset("signal", "AutonLab/MOMENT-1-small") == "tiny-moment"
    assert dev_model(ModelArgs(backbone="google/vit-base-patch16-224"), tiny_data).backbone == "tiny-vit"
    multi = dev_model(ModelArgs(backbones={"text": "minilm"}), multimodal_data)
    assert multi.backbones == {"text": "tiny-bert", "tabular": "tiny-mlp"}


def test_two_rounds_three_clients_and_two_batches_per_client():
    federation = dev_federation(FederationArgs(rounds=200, batch_size=4, eval_batch_size=3, min_clients=5))
    partition = dev_partition(PartitionArgs(num_clients=20, min_samples=10, scheme="natural"))
    split = ClientSplit(np.arange(20), np.arange(20, 30), np.arange(30, 35))

    [short] = dev_splits([split], federation)

    assert (federation.rounds, federation.min_clients, federation.batch_size) == (2, 3, 4)
    assert (partition.num_clients, partition.min_samples, partition.scheme) == (3, 2, "natural")
    assert short.train.tolist() == list(range(8)) and short.val.tolist() == list(range(20, 26))
    assert short.test.tolist() == list(range(30, 35))


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory: pytest.TempPathFactory, padchest_file: str) -> dict[str, list[str]]:
    """``--data.*`` overrides that point each dataset class at a fixture in its published format."""
    from fedhb.data.fixtures import write_medmnist_fixture
    from fedhb.data.fixtures_signals import WRITERS
    from fedhb.data.text_fixtures import (
        write_iu_xray_fixture,
        write_medical_abstracts_fixture,
        write_pubmed_rct_fixture,
    )

    root = tmp_path_factory.mktemp("dev_run_data")
    for size in (28, 224):
        write_medmnist_fixture(root / "medmnist", "organamnist", size, (60, 20, 40), seed=0)
    for name, writer in WRITERS.items():
        writer(root / name)
    signals = {name: str(root / name) for name in WRITERS}
    write_medical_abstracts_fixture(root / "medical_abstracts")
    for variant in ("20k", "200k"):
        write_pubmed_rct_fixture(root / "pubmed_rct", variant=variant)
    iu = write_iu_xray_fixture(root / "NLMCXR_reports.tgz")
    from fedhb.data.fixtures_brats import write_brats_fixture

    brats = write_brats_fixture(root / "brats", cases=12, size=32)
    from fedhb.data.fixtures_symile import write_symile_fixture

    symile = write_symile_fixture(root / "symile-mimic")
    from fedhb.data.fixtures_mimic import write_mimic_cxr_fixture

    mimic = write_mimic_cxr_fixture(root / "mimic-cxr-jpg")
    from fedhb.data.fixtures_mimic import write_iu_xray_png_fixture

    png = write_iu_xray_png_fixture(root / "NLMCXR_png", studies=200)
    from fedhb.data.fixtures_vqa import write_ehrxqa_fixture, write_pathvqa_fixture

    pathvqa = write_pathvqa_fixture(root / "pathvqa")
    ehrxqa, ehrxqa_images = write_ehrxqa_fixture(root / "ehrxqa")
    return {
        "MedMNIST": ["--data.root", str(root / "medmnist"), "--data.download", "false"],
        "PTBXL": ["--data.root", signals["ptbxl"]], "ADFTD": ["--data.root", signals["adftd"]],
        "ICBHI": ["--data.root", signals["icbhi"]], "SPRSound": ["--data.root", signals["sprsound"]],
        "MedicalAbstracts": ["--data.root", str(root / "medical_abstracts"), "--data.download", "false"],
        "PubMedRCT": ["--data.root", str(root / "pubmed_rct"), "--data.download", "false"],
        "IUXrayReports": ["--data.path", str(iu)],
        "PadChest": ["--data.path", padchest_file],
        "BraTS": ["--data.root", str(brats), "--data.size", "32", "--data.patch", "32", "--data.cache",
                  str(root / "brats_cache")],
        "SymileMIMIC": ["--data.root", str(symile), "--data.image_size", "28"],
        "MIMICCXR": ["--data.root", str(mimic), "--data.image_size", "28"],
        "IUXray": ["--data.images", str(png), "--data.image_size", "28", "--data.fraction", "0.05"],
        "PathVQA": ["--data.root", str(pathvqa)],
        "EHRXQA": ["--data.root", str(ehrxqa), "--data.images", str(ehrxqa_images), "--data.answer_length", "8",
                   "--data.cache_dir", str(root / "image_cache")],
    }


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_runs_end_to_end_in_seconds_with_fast_dev_run(config, data_overrides, tmp_path):
    from fedhb.cli import main

    dataset = yaml.safe_load(config.read_text())["data"]["class_path"].rsplit(".", 1)[-1]
    out = tmp_path / "run"

    main(["fit", "--config", str(config), *data_overrides[dataset], "--fast_dev_run", "true", "--out_dir", str(out),
          "--fabric.accelerator", "cpu", "--fabric.devices", "1", "--fabric.strategy", "auto"])

    summary = json.loads((out / "summary.json").read_text())
    written = yaml.safe_load((out / "config.yaml").read_text())
    batch = written["federation"]["batch_size"]
    assert written["fast_dev_run"] is True and summary["rounds"] == 2 and summary["clients"] <= 3
    assert set(summary["backbone"].split("+")) <= TINY
    assert summary["final"]["round"] == 2 and np.isfinite(summary["final"]["train_loss"])
    assert len((out / "metrics.jsonl").read_text().splitlines()) >= 1
    clients = json.loads((out / "partition.json").read_text())["clients"].values()
    assert all(c["train"] <= 2 * batch for c in clients)  # at most 2 batches per client per epoch
