"""MIMIC-CXR-JPG + reports: frontal views, CheXpert labels, reports, official split, patients, malformed files."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedhb.data import MIMICCXR
from fedhb.data.fixtures_mimic import write_mimic_cxr_fixture
from fedhb.data.image_cache import decode_image
from fedhb.data.mimic_cxr import CHEXPERT, LABELS, METADATA, SPLIT


@pytest.fixture(scope="module")
def mimic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mimic_cxr_fixture(tmp_path_factory.mktemp("mimic") / "mimic-cxr-jpg", patients=24)


def expected(root: Path, uncertain: int, per_study: bool = True) -> pd.DataFrame:
    """The samples re-derived with pandas: frontal (PA before AP) labelled images, one per study unless not."""
    meta = pd.read_csv(root / METADATA, dtype=str, keep_default_na=False)
    labels = pd.read_csv(root / CHEXPERT, dtype={"subject_id": str, "study_id": str})
    split = pd.read_csv(root / SPLIT, dtype=str)
    frame = meta[meta.ViewPosition.isin(["PA", "AP"])].reset_index(drop=True)
    frame["order"] = frame.index
    frame = frame.merge(labels, on=["subject_id", "study_id"]).merge(split[["dicom_id", "split"]], on="dicom_id")
    if per_study:
        frame["rank"] = (frame.ViewPosition == "AP").astype(int)
        frame = frame.sort_values(["rank", "order"]).groupby("study_id", sort=False).head(1)
    frame = frame.sort_values("order").reset_index(drop=True)
    values = frame[list(LABELS)].fillna(0.0).replace(-1.0, float(uncertain)).astype(int)
    frame["y"] = list(values.to_numpy())
    return frame


@pytest.mark.parametrize("uncertain", ["zeros", "ones"])
def test_reads_frontal_images_labels_reports_and_the_official_split(mimic_root, uncertain):
    samples = MIMICCXR(root=str(mimic_root), uncertain=uncertain, image_size=16).load()
    frame = expected(mimic_root, 1 if uncertain == "ones" else 0)
    reports = [mimic_root / "files" / f"p{s[:2]}" / f"p{s}" / f"s{t}.txt" for s, t in zip(frame.subject_id,
                                                                                            frame.study_id)]

    assert samples.modalities == ("image", "text") and samples.task == "multi-label"
    assert len(samples) == len(frame) and samples.label_names == list(LABELS)
    np.testing.assert_array_equal(samples.labels, np.stack(frame.y))
    assert samples.source_split.tolist() == frame.split.tolist()
    assert samples.present["text"].tolist() == [p.is_file() for p in reports] and not samples.present["text"].all()
    assert samples.present["image"].all()
    first = next(i for i, p in enumerate(reports) if p.is_file())
    text = samples.inputs["text"][first]
    assert text == " ".join(reports[first].read_text().split()) and text.startswith("FINAL REPORT EXAMINATION:")
    # patients: equal group ids exactly where subject ids are equal
    patient = samples.groups["patient"]
    assert (patient[:, None] == patient[None, :]).tolist() == (
        frame.subject_id.to_numpy()[:, None] == frame.subject_id.to_numpy()[None, :]).tolist()
    assert MIMICCXR.default_group_by == "patient" and samples.meta["unlabelled_studies"] > 0
    # the images are the JPGs decoded and resized, read through the cache
    row = frame.iloc[3]
    jpg = mimic_root / "files" / f"p{row.subject_id[:2]}" / f"p{row.subject_id}" / f"s{row.study_id}" / \
        f"{row.dicom_id}.jpg"
    np.testing.assert_array_equal(np.asarray(samples.inputs["image"])[3], decode_image(jpg, 16))


def test_every_frontal_image_sections_and_one_modality(mimic_root):
    every = MIMICCXR(root=str(mimic_root), per_study=False, modalities=["image"], image_size=16).load()
    frame = expected(mimic_root, 0, per_study=False)
    sections = MIMICCXR(root=str(mimic_root), modalities=["text"], sections=["impression"]).load()

    assert len(every) == len(frame) > len(expected(mimic_root, 0)) and every.modalities == ("image",)
    np.testing.assert_array_equal(every.labels, np.stack(frame.y))
    assert sections.modalities == ("text",) and sections.present["text"].all()  # studies without a report dropped
    assert all(t.endswith(".") and "FINDINGS" not in t for t in sections.inputs["text"])


def test_a_missing_csv_a_bad_label_and_a_truncated_jpg_are_named(mimic_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(mimic_root, root)
    (root / SPLIT).unlink()
    with pytest.raises(FileNotFoundError, match=f"{SPLIT}: not found"):
        MIMICCXR(root=str(root)).load()

    shutil.copy(mimic_root / SPLIT, root / SPLIT)
    lines = gzip.open(mimic_root / CHEXPERT, "rt").read().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ",maybe"
    with gzip.open(root / CHEXPERT, "wt") as handle:
        handle.write("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"{CHEXPERT}: line 4: Support Devices 'maybe'"):
        MIMICCXR(root=str(root)).load()

    shutil.copy(mimic_root / CHEXPERT, root / CHEXPERT)
    samples = MIMICCXR(root=str(root), image_size=16, cache_dir=str(tmp_path / "cache")).load()
    jpg = sorted((root / "files").rglob("*.jpg"))
    frontal = set(expected(root, 0).dicom_id)
    victim = next(p for p in jpg if p.stem in frontal)
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(ValueError, match=f"{victim.name}: not a readable image"):
        np.asarray(samples.inputs["image"])  # the cache build decodes every file (the encoder's prepare)
    with pytest.raises(ValueError, match="--data.uncertain"):
        MIMICCXR(root=str(root), uncertain="ignore")


@pytest.mark.slow
def test_fast_dev_run_names_a_truncated_jpg_before_training(mimic_root, tmp_path, capsys):
    from fedhb.cli import main

    root = tmp_path / "copy"
    shutil.copytree(mimic_root, root)
    chosen = set(expected(root, 0).dicom_id)  # the frontal images the dataset reads
    jpg = next(p for p in sorted((root / "files").rglob("*.jpg")) if p.stem in chosen)
    jpg.write_bytes(jpg.read_bytes()[:300])
    config = Path(__file__).resolve().parents[2] / "configs" / "mimic_cxr_fedavg.yaml"

    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config), "--data.root", str(root), "--data.image_size", "28",
              "--data.cache_dir", str(tmp_path / "cache"), "--fast_dev_run", "true", "--out_dir",
              str(tmp_path / "run"), "--fabric.accelerator", "cpu", "--fabric.devices", "1"])

    assert exit_.value.code == 2
    assert f"{jpg}: not a readable image" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not list((tmp_path / "cache").glob("*.npy"))
