"""Symile-MIMIC (fedhb.data.symile_mimic): its published layout read from the fixture, malformed files named, and
patients kept whole."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedhb.data import SymileMIMIC
from fedhb.data.fixtures_symile import write_symile_fixture
from fedhb.data.symile_mimic import IMAGENET_MEAN, IMAGENET_STD, array_path


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_symile_fixture(tmp_path_factory.mktemp("symile") / "symile-mimic", patients=30, seed=4)


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_reads_the_fixture_one_sample_per_admission(root):
    samples = SymileMIMIC(root=str(root), image_size=16, target_rate=100).load()

    train, val, test = (rows(root / f"{s}.csv") for s in ("train", "val", "test"))
    queries = [r for r in test if r["label"] == "1"]
    assert len(test) > len(queries) > 0  # the test csv repeats admissions as negative candidates
    assert len(samples) == len(train) + len(val) + len(queries)
    assert samples.task == "retrieval" and samples.modalities == ("image", "signal", "tabular")
    assert samples.inputs["image"].shape == (len(samples), 16, 16) and samples.inputs["image"].dtype == np.uint8
    assert samples.inputs["signal"].shape == (len(samples), 12, 100)  # 1 s at 500 Hz resampled to 100 Hz
    assert samples.inputs["tabular"].shape == (len(samples), 100)
    assert samples.source_split.tolist() == ["train"] * len(train) + ["val"] * len(val) + ["test"] * len(queries)
    assert samples.meta["retrieval"] == {"objective": "symile", "target": "image", "candidates": 10}

    # The first training row, converted by hand: un-normalised X-ray (channel mean), labs and measured flags.
    cxr = np.load(array_path(root, "train", "cxr"))[0]
    gray = (cxr * np.array(IMAGENET_STD)[:, None, None] + np.array(IMAGENET_MEAN)[:, None, None]).mean(0)
    full = SymileMIMIC(root=str(root), image_size=cxr.shape[-1]).load()
    assert np.abs(full.inputs["image"][0].astype(int) - np.round(np.clip(gray, 0, 1) * 255)).max() <= 1
    pct = np.load(array_path(root, "train", "labs_percentiles"))[0]
    measured = np.load(array_path(root, "train", "labs_missingness"))[0]
    assert np.array_equal(samples.inputs["tabular"][0], np.concatenate([pct, measured]).astype(np.float32))
    # Labels: No Finding (what Dirichlet partitions skew); groups by patient (subject_id) and admission.
    assert samples.labels.tolist()[:len(train)] == [int(r["No Finding"] == "1.0") for r in train]
    subjects = [r["subject_id"] for r in train + val + queries]
    assert len(np.unique(samples.groups["patient"])) == len(set(subjects)) < len(samples)


def test_two_modalities_give_the_clip_objective(root):
    samples = SymileMIMIC(root=str(root), modalities=["tabular", "image"], image_size=16).load()
    assert samples.modalities == ("image", "tabular") and samples.meta["retrieval"]["objective"] == "clip"
    with pytest.raises(ValueError, match="--data.objective"):
        SymileMIMIC(root=str(root), modalities=["image", "tabular"], objective="symile")


def broken(root: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    return copy


def test_a_missing_csv_is_named(root, tmp_path):
    copy = broken(root, tmp_path)
    (copy / "val.csv").unlink()
    with pytest.raises(FileNotFoundError, match="val.csv"):
        SymileMIMIC(root=str(copy)).load()


def test_an_array_of_the_wrong_shape_is_named(root, tmp_path):
    copy = broken(root, tmp_path)
    path = array_path(copy, "train", "ecg")
    np.save(path, np.load(path)[..., :11])  # 11 leads
    with pytest.raises(ValueError, match=r"ecg_train\.npy: shape .*expected"):
        SymileMIMIC(root=str(copy)).load()
    copy2 = broken(root, tmp_path / "b")
    path = array_path(copy2, "val", "labs_percentiles")
    np.save(path, np.load(path)[:-1])  # one row short of val.csv
    with pytest.raises(ValueError, match=r"labs_percentiles_val\.npy: shape"):
        SymileMIMIC(root=str(copy2)).load()


def test_a_nan_lab_percentile_is_named(root, tmp_path):
    copy = broken(root, tmp_path)
    path = array_path(copy, "test", "labs_percentiles")
    values = np.load(path)
    values[0, 3] = np.nan
    np.save(path, values)
    with pytest.raises(ValueError, match=r"labs_percentiles_test\.npy: row 0 has a NaN lab percentile"):
        SymileMIMIC(root=str(copy)).load()


def test_arrays_out_of_step_with_their_csv_are_named(root, tmp_path):
    copy = broken(root, tmp_path)
    path = array_path(copy, "train", "hadm_id")
    ids = np.load(path)
    np.save(path, ids[::-1].copy())
    with pytest.raises(ValueError, match=r"hadm_id_train\.npy: row 0 is admission"):
        SymileMIMIC(root=str(copy)).load()


@pytest.mark.filterwarnings("ignore:partition:UserWarning")
@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_no_patient_on_two_clients_or_both_sides_of_a_split(root, scheme):
    from fedhb.data.partition import partition_samples

    samples = SymileMIMIC(root=str(root), image_size=8, modalities=["image", "tabular"]).load()
    patient = samples.groups[SymileMIMIC.default_group_by]
    splits = partition_samples(samples, scheme, 3, 0.5, 2, (0.6, 0.2, 0.2), 0, patient)

    owner: dict[int, int] = {}
    for c, s in enumerate(splits):
        sides = [set(patient[part].tolist()) for part in (s.train, s.val, s.test)]
        assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
        for p in set().union(*sides):
            assert owner.setdefault(p, c) == c
    assert sum(len(s.train) + len(s.val) + len(s.test) for s in splits) == len(samples)
