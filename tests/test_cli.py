"""The `fedhb` command line: help, configs, overrides, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedhb.cli import main
from fedhb.registry import known_plugins

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


def fedhb(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedhb", *args], capture_output=True, text=True, timeout=120)


def test_fit_help_documents_the_contract_options(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    for flag in ("--out_dir", "--seed", "--data", "--partition.scheme", "--partition.num_clients", "--partition.alpha",
                 "--model.backbone", "--model.lora.r", "--algorithm", "--federation.rounds",
                 "--federation.local_epochs", "--federation.batch_size", "--federation.eval_every", "--optim.lr",
                 "--fabric.accelerator", "--fabric.devices", "--fabric.precision"):
        assert flag in text, flag
    assert "Number of communication rounds." in text  # field docstrings reach --help


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses_and_is_headed_by_its_command(config, capsys):
    first = config.read_text().splitlines()[0]
    assert first.startswith("# fedhb fit --config ") or first.startswith("# python "), first

    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config), "--print_config"])

    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["class_path"] and printed["federation"]["rounds"] >= 1


def test_command_line_overrides_a_config(capsys):
    config = Path(__file__).resolve().parents[1] / "configs" / "organamnist_epfl.yaml"

    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--federation.rounds", "3", "--algorithm.lam", "0.25",
              "--data.root", "/somewhere", "--print_config"])

    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["federation"]["rounds"] == 3
    assert printed["algorithm"]["init_args"]["lam"] == 0.25
    assert printed["data"]["init_args"]["root"] == "/somewhere"


def test_organamnist_config_runs_end_to_end_on_a_fixture_with_a_tiny_preset(organamnist_root, tmp_path):
    config = Path(__file__).resolve().parents[1] / "configs" / "organamnist_epfl.yaml"
    out = tmp_path / "run"

    main(["fit", "--config", str(config), "--data.root", organamnist_root, "--data.download", "false",
          "--data.size", "28", "--model.backbone", "tiny-vit", "--federation.rounds", "2",
          "--partition.num_clients", "4", "--out_dir", str(out), "--fabric.accelerator", "cpu"])

    for name in ("config.yaml", "metrics.jsonl", "summary.json", "partition.json"):
        assert (out / name).is_file(), name


def test_bad_value_exits_2_with_the_field_name(tmp_path):
    result = fedhb("fit", "--data", "MedMNIST", "--partition.alpha", "-1", "--out_dir", str(tmp_path / "x"))

    assert result.returncode == 2
    assert "--partition.alpha must be > 0" in result.stderr and "got -1.0" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_data_file_exits_2_naming_the_file(tmp_path):
    result = fedhb("fit", "--data", "MedMNIST", "--data.root", str(tmp_path), "--out_dir", str(tmp_path / "x"),
                   "--fabric.accelerator", "cpu")

    assert result.returncode == 2
    assert str(tmp_path / "organamnist.npz") in result.stderr
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


def test_a_wrong_algorithm_name_is_one_line_with_the_known_names(tmp_path):
    result = fedhb("fit", "--data", "MedMNIST", "--algorithm", "FedAVG", "--out_dir", str(tmp_path / "x"))

    assert result.returncode == 2
    error, hint = result.stderr.strip().splitlines()  # not jsonargparse's usage block and Union listing
    known = ", ".join(known_plugins("algorithm"))
    assert error == f"fedhb: error: --algorithm: unknown algorithm 'FedAVG'; did you mean FedAvg? Known: {known}"
    assert hint == "fedhb: run `fedhb fit --help` for every option"


def test_the_known_names_are_the_registries_classes_without_their_bases():
    import fedhb.algorithms
    import fedhb.data

    algorithms, datasets = known_plugins("algorithm"), known_plugins("data")

    assert set(algorithms) == set(fedhb.algorithms.__all__) - {"Algorithm", "LocalTrainer"}
    assert set(datasets) == set(fedhb.data.__all__) - {"FederatedDataset", "Samples"}


def test_fedhb_warnings_print_as_one_line_before_the_error(organamnist_root, tmp_path, capsys):
    """A partition that cannot be learned warns in fedhb's own format (not Python's two-line one); here a text
    preset for image data then stops the run."""
    with pytest.raises(SystemExit):
        main(["fit", "--data", "MedMNIST", "--data.root", organamnist_root, "--partition.num_clients", "8",
              "--partition.alpha", "0.05", "--model.backbone", "tiny-bert", "--out_dir", str(tmp_path / "x"),
              "--fabric.accelerator", "cpu"])

    warning, error = capsys.readouterr().err.strip().splitlines()
    assert warning.startswith("fedhb: warning: partition: clients ") and "tested on classes absent" in warning
    assert error.startswith("fedhb: error: --model.backbone 'tiny-bert' is a text preset, but this dataset holds "
                            "images: pass an image preset (tiny-vit, small-vit)")
