"""The MedMNIST reader on files in the official format."""

from __future__ import annotations

import numpy as np
import pytest

from fedhb.data import MedMNIST
from fedhb.data.fixtures import write_medmnist_fixture
from fedhb.data.medmnist import FLAGS_2D, medmnist_info


@pytest.mark.parametrize("flag", FLAGS_2D)
def test_every_2d_flag_reads_a_file_of_any_sample_count(tmp_path, flag):
    write_medmnist_fixture(tmp_path, flag, 28, (13, 5, 7), seed=1)

    samples = MedMNIST(flag=flag, root=str(tmp_path)).load()

    info = medmnist_info(flag)
    assert len(samples) == 25
    assert samples.num_classes == len(info["label"])
    assert samples.inputs.dtype == np.uint8
    assert samples.inputs.shape[1:3] == (28, 28)
    assert (samples.inputs.ndim == 4) == (info["n_channels"] == 3)
    if flag == "chestmnist":
        assert samples.task == "multi-label" and samples.labels.shape == (25, 14)
    else:
        assert samples.labels.shape == (25,) and samples.labels.max() < samples.num_classes
    assert list(np.unique(samples.source_split)) == ["test", "train", "val"]


def test_larger_sizes_use_the_official_file_name(tmp_path):
    path = write_medmnist_fixture(tmp_path, "organcmnist", 64, (4, 2, 2))

    samples = MedMNIST(flag="organcmnist", root=str(tmp_path), size=64).load()

    assert path.name == "organcmnist_64.npz"
    assert samples.inputs.shape == (8, 64, 64)


def test_splits_select_which_official_splits_are_pooled(tmp_path):
    write_medmnist_fixture(tmp_path, "organamnist", 28, (10, 4, 6))

    samples = MedMNIST(root=str(tmp_path), splits=["train", "test"]).load()

    assert len(samples) == 16 and set(samples.source_split) == {"train", "test"}


def test_missing_file_names_path_url_and_md5(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        MedMNIST(flag="organsmnist", root=str(tmp_path)).load()

    info = medmnist_info("organsmnist")
    message = str(err.value)
    assert str(tmp_path / "organsmnist.npz") in message
    assert info["url"] in message and info["MD5"] in message


def _official(tmp_path, **overrides):
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 255, (6, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 11, (6, 1)).astype(np.uint8)
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    path = tmp_path / "organamnist.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"val_labels": None}, "missing keys ['val_labels']"),
        ({"train_images": np.zeros((6, 28, 28), dtype=np.float32)}, "train_images has dtype float32, expected uint8"),
        ({"test_images": np.zeros((6, 32, 32), dtype=np.uint8)}, "test_images holds 32x32 images"),
        ({"train_labels": np.zeros((5, 1), dtype=np.uint8)}, "train_labels has shape (5, 1), expected (6, 1)"),
        ({"val_labels": np.full((6, 1), 11, dtype=np.uint8)}, "val_labels holds values in [11, 11], expected [0, 10]"),
        ({"train_images": np.zeros((6, 28, 28, 4), dtype=np.uint8)}, "train_images has shape (6, 28, 28, 4)"),
    ],
)
def test_malformed_file_names_the_file_and_the_problem(tmp_path, overrides, expected):
    path = _official(tmp_path, **overrides)

    with pytest.raises(ValueError) as err:
        MedMNIST(root=str(tmp_path)).load()

    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_unreadable_file_names_the_file(tmp_path):
    (tmp_path / "organamnist.npz").write_bytes(b"not a zip")

    with pytest.raises(ValueError, match="organamnist.npz: not a readable .npz"):
        MedMNIST(root=str(tmp_path)).load()


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [({"flag": "organmnist3d"}, "--data.flag"), ({"size": 32}, "--data.size"), ({"fraction": 0}, "--data.fraction"),
     ({"splits": ["dev"]}, "--data.splits")],
)
def test_bad_options_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        MedMNIST(**kwargs)


def test_fixture_is_learnable_by_nearest_template(tmp_path):
    """Each class has its own template: nearest class mean on train classifies test far above chance."""
    write_medmnist_fixture(tmp_path, "organamnist", 28, (400, 10, 200), seed=3)
    with np.load(tmp_path / "organamnist.npz") as f:
        xtr, ytr = f["train_images"].reshape(400, -1).astype(float), f["train_labels"][:, 0]
        xte, yte = f["test_images"].reshape(200, -1).astype(float), f["test_labels"][:, 0]
    means = np.stack([xtr[ytr == c].mean(0) for c in range(11)])
    pred = ((xte[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == yte).mean() > 0.9


@pytest.mark.parametrize("size", [28, 64])
def test_the_missing_file_hint_writes_the_file_that_is_missing(tmp_path, size):
    """The error's fixture command, run as printed, writes the file of that size, so the rerun reads it."""
    import re
    import shlex

    from fedhb.data import fixtures

    dataset = MedMNIST(flag="organcmnist", root=str(tmp_path), size=size)
    with pytest.raises(FileNotFoundError) as err:
        dataset.load()
    command = shlex.split(re.search(r"`(python -m fedhb\.data\.fixtures [^`]+)`", str(err.value)).group(1))

    fixtures.main(command[3:] + ["--samples", "6", "3", "3"])  # smaller than the default, same file

    assert dataset.load().inputs.shape == (12, size, size)


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_a_damaged_file_names_the_file_and_the_problem(tmp_path, damage):
    path = write_medmnist_fixture(tmp_path, "organamnist", 28, (40, 10, 10))
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]  # an interrupted download
    else:
        data[len(data) // 3: len(data) // 3 + 64] = b"x" * 64  # a bad copy: the archive opens, a member does not
    path.write_bytes(bytes(data))

    with pytest.raises(ValueError) as err:
        MedMNIST(root=str(tmp_path)).load()

    message = str(err.value)
    assert message.startswith(f"{path}: the file is truncated or damaged (BadZipFile: ")
    assert "Delete it, then download" in message and medmnist_info("organamnist")["MD5"] in message


def test_the_metadata_is_medmnists_own_without_importing_its_package():
    import json
    import subprocess
    import sys

    from medmnist import INFO

    probe = ("import sys, json; from fedhb.data.medmnist import medmnist_info; info = medmnist_info('organamnist'); "
             "print(json.dumps([info['n_channels'], info['label'], 'pandas' in sys.modules, "
             "'medmnist' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    channels, labels, pandas, package = json.loads(out.strip().splitlines()[-1])

    assert channels == INFO["organamnist"]["n_channels"] and labels == INFO["organamnist"]["label"]
    assert not pandas and not package
