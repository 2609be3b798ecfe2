"""Every config field is checked before any work starts; each error names its field, in one line with no usage block
or traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedhb.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: What the CLI may print on stderr for a bad input: the error and the ``--help`` hint, maybe a partition warning.
MAX_ERROR_LINES = 3

# (arguments, text the error must contain)
BAD = [
    (["--partition.alpha", "-1"], "--partition.alpha"),
    (["--partition.alpha", "0"], "--partition.alpha"),
    (["--partition.num_clients", "0"], "--partition.num_clients"),
    (["--partition.min_samples", "0"], "--partition.min_samples"),
    (["--partition.split", "[0.5, 0.5, 0.5]"], "--partition.split"),
    (["--partition.split", "[1.0, 0.0, 0.0]"], "--partition.split"),
    (["--partition.scheme", "random"], "partition.scheme"),
    (["--model.lora.r", "0"], "--model.lora.r"),
    (["--model.lora.alpha", "0"], "--model.lora.alpha"),
    (["--model.lora.dropout", "1.0"], "--model.lora.dropout"),
    (["--model.lora.target_modules", "[qkv]"], "--model.lora.target_modules"),
    (["--model.head_dropout", "-0.1"], "--model.head_dropout"),
    (["--model.backbone", "no-such/backbone"], "--model.backbone"),
    (["--federation.rounds", "0"], "--federation.rounds"),
    (["--federation.fraction", "0"], "--federation.fraction"),
    (["--federation.fraction", "1.5"], "--federation.fraction"),
    (["--federation.local_epochs", "0"], "--federation.local_epochs"),
    (["--federation.batch_size", "0"], "--federation.batch_size"),
    (["--federation.eval_every", "0"], "--federation.eval_every"),
    (["--federation.dropout", "1.0"], "--federation.dropout"),
    (["--federation.min_clients", "0"], "--federation.min_clients"),
    (["--federation.min_clients", "9"], "--federation.min_clients"),
    (["--federation.max_loss", "0"], "--federation.max_loss"),
    (["--federation.eval_protocol", "best"], "federation.eval_protocol"),
    (["--federation.roundz", "3"], "--federation.roundz"),
    (["--optim.lr", "0"], "--optim.lr"),
    (["--optim.momentum", "1.0"], "--optim.momentum"),
    (["--optim.weight_decay", "-1"], "--optim.weight_decay"),
    (["--optim.min_lr", "1.0"], "--optim.min_lr"),
    (["--optim.name", "rmsprop"], "optim.name"),
    (["--fabric.accelerator", "tpu9"], "--fabric.accelerator"),
    (["--fabric.devices", "0"], "--fabric.devices"),
    (["--fabric.strategy", "fsdp"], "--fabric.strategy"),
    (["--fabric.precision", "8-true"], "--fabric.precision"),
    (["--checkpoint.every", "-1"], "--checkpoint.every"),
    (["--checkpoint.keep", "0"], "--checkpoint.keep"),
    (["--data.flag", "organmnist3d"], "--data.flag"),
    (["--data.size", "32"], "--data.size"),
    (["--data.fraction", "0"], "--data.fraction"),
    (["--data.splits", "[dev]"], "--data.splits"),
    (["--algorithm", "EPFL", "--algorithm.lam", "2"], "--algorithm.lam"),
    (["--algorithm", "EPFL", "--algorithm.layers", "middle"], "--algorithm.layers"),
    (["--algorithm", "EPFL", "--algorithm.distance", "manhattan"], "--algorithm.distance"),
    (["--algorithm", "EPFL", "--algorithm.gamma", "1"], "gamma"),
    (["--algorithm", "NoSuchAlgorithm"], "NoSuchAlgorithm"),
    (["--partition.num_clients", "5000"], "--partition.num_clients"),
    (["--partition.min_samples", "500"], "--partition.min_samples"),
    (["--partition.group_by", "patient"], "--partition.group_by"),
    (["--partition.scheme", "natural"], "--partition.scheme natural"),
    (["--seed", "abc"], "seed"),
    (["--resume", "/no/such/file.ckpt"], "--resume"),
    (["--resume", "auto", "--overwrite", "true"], "--resume and --overwrite"),
    # Wrong names and types: one line naming the option, what is known and the closest match.
    (["--algorithm", "FedAVG"], "--algorithm: unknown algorithm 'FedAVG'; did you mean FedAvg? Known: APFL, APPLE,"),
    (["--algorithm", "fedprox"], "did you mean FedProx?"),
    (["--algorithm", "MedMNIST"], "--algorithm: MedMNIST is a dataset (--data MedMNIST), not an algorithm"),
    (["--data", "MedMnist"], "--data: unknown dataset 'MedMnist'; did you mean MedMNIST? Known: ADFTD,"),
    (["--federation.rounds", "three"], "--federation.rounds: expected an integer, got 'three'"),
    (["--federation.fraction", "half"], "--federation.fraction: expected a number, got 'half'"),
    (["--overwrite", "maybe"], "--overwrite: expected true or false, got 'maybe'"),
    (["--federation.eval_protocol", "best"], "expected one of after_aggregation, fhbench, got 'best'"),
    (["--federation.roundz", "3"], "unknown option --federation.roundz; did you mean --federation.rounds?"),
    (["--data.flagg", "pathmnist"], "--data.flagg: MedMNIST has no option 'flagg'; did you mean flag?"),
    (["--data", "PTBXL", "--data.download", "false"], "--data.download: PTBXL has no option 'download'. Its options: "
                                                      "root, sampling_rate"),
    (["--algorithm.lam", "0.3"], "--algorithm.lam: choose the algorithm first, e.g. --algorithm Ditto"),
    (["--config", "/no/such/config.yaml"], "--config /no/such/config.yaml: no such file"),
    (["--data.size", "224"], "python -m fedhb.data.fixtures --flag organamnist --root "),
]


@pytest.mark.parametrize(("args", "field"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_config_names_its_field_and_writes_nothing(args, field, organamnist_root, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["fit", "--data", "MedMNIST", "--data.root", organamnist_root, "--partition.num_clients", "4",
            "--federation.rounds", "1", "--fabric.accelerator", "cpu", "--out_dir", str(out)]

    with pytest.raises(SystemExit) as exit_:
        main(base + args)

    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert field in err, err[-2000:]
    assert_short_error(err)
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def assert_short_error(err: str) -> None:
    """The error and the hint, not jsonargparse's 40-line usage block, its Union listing or a traceback."""
    assert "Traceback" not in err and "usage:" not in err and "Subtypes:" not in err and "NestedArg" not in err, err
    assert len(err.strip().splitlines()) <= MAX_ERROR_LINES, err
    assert err.startswith("fedhb: "), err


def test_there_are_at_least_thirty_bad_configs():
    assert len(BAD) >= 30


def _misspelled_key(tmp_path, root):
    (tmp_path / "typo.yaml").write_text((CONFIGS / "quickstart_organamnist.yaml").read_text().replace(
        "federation:", "federaton:"))
    return ["--config", str(tmp_path / "typo.yaml"), "--data.root", root]


def _bad_yaml(tmp_path, root):
    (tmp_path / "broken.yaml").write_text("federation:\n  rounds: [2\n")
    return ["--data", "MedMNIST", "--data.root", root, "--config", str(tmp_path / "broken.yaml")]


def _truncated_npz(tmp_path, root):
    data = (Path(root) / "organamnist.npz").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "organamnist.npz").write_bytes(data[: len(data) // 2])
    return ["--data", "MedMNIST", "--data.root", str(tmp_path / "cut")]


def _missing_224(tmp_path, root):
    return ["--data", "MedMNIST", "--data.root", str(tmp_path), "--data.size", "224"]


def _out_dir_is_a_file(tmp_path, root):
    (tmp_path / "taken").write_text("not a folder")
    return ["--data", "MedMNIST", "--data.root", root, "--out_dir", str(tmp_path / "taken")]


def _image_preset_for_text(tmp_path, root):
    from fedhb.data.text_fixtures import write_medical_abstracts_fixture

    write_medical_abstracts_fixture(tmp_path / "ma", (60, 20), seed=0)
    return ["--data", "MedicalAbstracts", "--data.root", str(tmp_path / "ma"), "--data.download", "false",
            "--partition.scheme", "iid", "--model.backbone", "tiny-vit"]


#: Bad inputs that need a file: their arguments from (tmp_path, organamnist_root), and the message.
BAD_FILES = [
    pytest.param(_misspelled_key, "unknown key 'federaton.rounds' in --config", id="misspelled YAML key"),
    pytest.param(_bad_yaml, "broken.yaml is not valid YAML", id="YAML syntax"),
    pytest.param(_truncated_npz, "organamnist.npz: the file is truncated or damaged (BadZipFile", id="truncated npz"),
    pytest.param(_missing_224, "--flag organamnist --root {tmp} --size 224`", id="224-px file missing"),
    pytest.param(_out_dir_is_a_file, "--out_dir {tmp}/taken is a file, not a folder", id="out_dir is a file"),
    pytest.param(_image_preset_for_text, "--model.backbone 'tiny-vit' is an image preset, but this dataset holds "
                 "text: pass a text preset (tiny-bert, tiny-roberta", id="image preset for text"),
]


@pytest.mark.parametrize(("make_args", "message"), BAD_FILES)
def test_bad_files_and_plugins_end_in_one_clear_line(make_args, message, organamnist_root, tmp_path, capsys):
    args = make_args(tmp_path, organamnist_root)
    if "--out_dir" not in args:
        args += ["--out_dir", str(tmp_path / "run")]

    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--partition.num_clients", "2", "--federation.rounds", "1", "--fabric.accelerator", "cpu", *args])

    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err, err
    assert_short_error(err)
