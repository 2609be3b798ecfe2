"""Biosignals and lung sounds end to end: the real DICOM ECG through PTB-XL's layout and MOMENT, patient-level
partitions that never split a patient, and short federations on each modality run from the shipped configs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fedhb.cli import main
from fedhb.config import ModelArgs, PartitionArgs
from fedhb.data import ADFTD, ICBHI, PTBXL, SPRSound
from fedhb.data._signal_io import resample
from fedhb.data.fixtures_signals import (
    dicom_ecg,
    write_adftd_fixture,
    write_icbhi_fixture,
    write_ptbxl_fixture,
    write_sprsound_fixture,
)
from fedhb.data.fixtures_signals import header_commands as fixture_commands
from fedhb.data.fixtures_signals import main as write_signal_fixture
from fedhb.data.partition import PartitionWarning
from fedhb.fit import prepare_partition
from fedhb.io import read_jsonl
from fedhb.models import build_encoder

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def ecg_root(tmp_path_factory) -> str:
    """PTB-XL's layout holding pydicom's real 12-lead ECG, once per patient (6 patients), scaled, without noise."""
    signal, rate = dicom_ecg()
    return str(write_ptbxl_fixture(tmp_path_factory.mktemp("ecg"), patients=6, records_per_patient=1, source=signal,
                                   source_rate=rate, source_noise=0.0))


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("signals")
    return {
        "adftd": str(write_adftd_fixture(base / "adftd", subjects=9, seconds=4.0)),
        "icbhi": str(write_icbhi_fixture(base / "icbhi", patients=8, cycles=3, cycle_seconds=0.5)),
        "sprsound": str(write_sprsound_fixture(base / "sprsound", patients=8, events=3, event_seconds=0.5)),
    }


def test_the_dicom_ecg_reads_as_twelve_leads_at_1000_hz():
    signal, rate = dicom_ecg()

    assert signal.shape == (12, 10000) and rate == 1000.0
    assert 0.1 < np.abs(signal).max() < 10  # millivolts


def test_the_ptbxl_pipeline_keeps_the_real_ecg_and_moment_encodes_it(ecg_root):
    signal, rate = dicom_ecg()
    expected = resample(resample(signal, rate, 500)[:, :5000], 500, 250)  # what PTB-XL's 500 Hz record holds

    samples = PTBXL(root=ecg_root).load()

    assert samples.inputs.shape == (60, 12, 250)
    first = np.concatenate(list(samples.inputs[:10]), axis=-1)  # record 1, its ten 1-s segments in order
    for lead in range(12):
        r = np.corrcoef(first[lead], expected[lead])[0, 1]
        assert r > 0.999, (lead, r)  # equal up to the record's scale and 16-bit quantisation
    torch.manual_seed(0)
    encoder = build_encoder(ModelArgs(backbone="tiny-moment"), samples)
    features = encoder(encoder.prepare(samples.subset(np.arange(4))))
    assert features.shape == (4, 32 * 12) and torch.isfinite(features).all()


@pytest.mark.parametrize("scheme", ["natural", "dirichlet", "iid"])
@pytest.mark.parametrize("name", ["ptbxl", "adftd", "icbhi", "sprsound"])
def test_patient_level_partitions_never_split_a_patient(name, scheme, ecg_root, roots):
    dataset = {"ptbxl": lambda: PTBXL(root=ecg_root), "adftd": lambda: ADFTD(root=roots["adftd"]),
               "icbhi": lambda: ICBHI(root=roots["icbhi"], duration=0.1),
               "sprsound": lambda: SPRSound(root=roots["sprsound"], duration=0.1)}[name]()

    # natural is what the configs use; the other schemes keep the dataset's default key (patient) too
    samples, splits, key = prepare_partition(dataset, PartitionArgs(scheme=scheme, num_clients=3, alpha=0.5,
                                                                    min_samples=2), seed=3)

    assert key == "patient"
    patient = samples.groups["patient"]
    owner: dict[int, int] = {}
    for client, split in enumerate(splits):
        parts = [set(patient[getattr(split, s)].tolist()) for s in ("train", "val", "test")]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2]), (client, parts)
        for p in set().union(*parts):
            assert owner.setdefault(p, client) == client, f"patient {p} on clients {owner[p]} and {client}"
    assert len(owner) == len(set(patient.tolist()))  # every patient placed
    assert sum(len(s.train) + len(s.val) + len(s.test) for s in splits) == len(samples)


def test_fhbench_segment_level_dirichlet_puts_a_patient_on_several_clients(roots):
    samples, splits, key = prepare_partition(ADFTD(root=roots["adftd"]), PartitionArgs(
        scheme="dirichlet", alpha=0.5, num_clients=3, min_samples=2, group_by="none"), seed=0)

    patient = samples.groups["patient"]
    clients_of = {p: {c for c, s in enumerate(splits) if p in set(patient[np.concatenate([s.train, s.val, s.test])])}
                  for p in set(patient.tolist())}
    assert key is None
    assert max(len(c) for c in clients_of.values()) > 1  # the leak the natural partition prevents


def _fit(config: str, root: str, out: Path, backbone: str, *extra: str) -> list[dict]:
    main(["fit", "--config", str(CONFIGS / config), "--data.root", root, "--data.fraction", "1.0",
          "--model.backbone", backbone, "--federation.rounds", "2", "--federation.eval_every", "1",
          "--federation.batch_size", "16", "--partition.num_clients", "3", "--partition.min_samples", "5",
          "--out_dir", str(out), "--fabric.accelerator", "cpu", *extra])
    return read_jsonl(out / "metrics.jsonl")


@pytest.mark.slow
def test_a_signal_federation_runs_from_the_ptbxl_config_on_the_real_ecg(ecg_root, tmp_path):
    records = _fit("ptbxl_epfl.yaml", ecg_root, tmp_path / "ptbxl", "tiny-moment")

    assert [r["round"] for r in records] == [1, 2]
    assert all(np.isfinite(r["train_loss"]) and 0 <= r["personalized_acc"] <= 1 for r in records)
    assert records[-1]["bytes_up"] > 0 and records[-1]["clients_trained"] == 3
    assert (tmp_path / "ptbxl" / "partition.json").read_text().count('"group_by": "patient"') == 1


@pytest.mark.slow
def test_an_audio_federation_runs_from_the_icbhi_config(roots, tmp_path):
    records = _fit("icbhi_fedavg.yaml", roots["icbhi"], tmp_path / "icbhi", "tiny-wav2vec2", "--data.duration",
                   "0.5", "--optim.lr", "0.05")

    assert [r["round"] for r in records] == [1, 2]
    assert all(np.isfinite(r["train_loss"]) for r in records)
    assert records[-1]["global_acc"] is not None  # FedAvg keeps a global model


def header_commands(config: Path) -> tuple[list[str], list[str]]:
    """The fixture writer's arguments and the ``fedhb fit`` overrides that a config's header gives for running it
    without the data."""
    words, overrides = fixture_commands(config)
    assert words[:3] == ["python", "-m", "fedhb.data.fixtures_signals"], words
    return words[3:], overrides


def _rooted(words: list[str], old: str, new: str) -> list[str]:
    return [new if w == old else w for w in words]


@pytest.mark.parametrize(("name", "dataset"), [("ptbxl", lambda root: PTBXL(root=root)),
                                               ("icbhi", lambda root: ICBHI(root=root, duration=0.1))])
def test_the_default_signal_fixtures_give_every_client_every_class_to_train_on(name, dataset, tmp_path):
    """What the headers' partition (natural, by patient, 3 clients, 40/30/30) makes of the fixtures they write: every
    client trains on every class, no split is empty, and the partition does not warn."""
    writer, overrides = header_commands(CONFIGS / f"{name}_epfl.yaml")
    write_signal_fixture(_rooted(writer, f"data/fixture/{name}", str(tmp_path)))
    clients = int(overrides[overrides.index("--partition.num_clients") + 1])

    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)
        samples, splits, _ = prepare_partition(dataset(str(tmp_path)), PartitionArgs(scheme="natural",
                                               num_clients=clients), seed=42)

    assert len(splits) == clients == 3
    for s in splits:
        assert set(samples.labels[s.train].tolist()) == set(range(samples.num_classes))
        assert len(s.val) > 0 and len(s.test) > 0


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ptbxl_epfl.yaml", "ptbxl_fedavg.yaml", "icbhi_epfl.yaml", "icbhi_fedavg.yaml"])
def test_a_config_header_command_learns_its_fixture(config, tmp_path, capsys):
    """The header's two commands, run as written (folders moved into tmp_path), end well above chance (1/5 for PTB-XL,
    1/4 for ICBHI) and without a partition warning."""
    name = config.split("_")[0]
    writer, overrides = header_commands(CONFIGS / config)
    root = str(tmp_path / "fixture")
    write_signal_fixture(_rooted(writer, f"data/fixture/{name}", root))

    main(["fit", "--config", str(CONFIGS / config), *_rooted(overrides, f"data/fixture/{name}", root),
          "--out_dir", str(tmp_path / "run"), "--fabric.accelerator", "cpu"])

    final = read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    assert final["personalized_acc"] > 0.5, final
    assert "warning: partition" not in capsys.readouterr().err
