"""PadChest: the published label file's columns read into text, tabular features and findings; sites and patients;
optional images; malformed files refused naming the file and line."""

from __future__ import annotations

import csv
import gzip
import io
import math
from pathlib import Path

import numpy as np
import pytest

from fedhb.data import PadChest
from fedhb.data.fixtures_padchest import HEADER
from fedhb.data.padchest import DEFAULT_LABELS, FEATURES, FILE, _features, packaged_file, patient_sites, read_padchest


def rows_of(path: str | Path) -> list[list[str]]:
    with gzip.open(path, "rt", newline="") as handle:
        return list(csv.reader(handle))


def write_rows(path: Path, rows: list[list[str]]) -> Path:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    with gzip.open(path, "wt", newline="") as handle:
        handle.write(buffer.getvalue())
    return path


def test_the_fixture_has_the_released_header_and_reads_into_text_tabular_and_findings(padchest_file):
    rows = rows_of(padchest_file)
    with gzip.open(packaged_file(), "rt", newline="") as handle:
        packaged = next(csv.reader(handle))

    s = PadChest(path=padchest_file).load()

    assert rows[0] == HEADER == packaged  # the exact 36 columns, in order
    unlabelled = sum(r[HEADER.index("Labels")] == "nan" for r in rows[1:])
    no_report = sum(r[HEADER.index("Report")] == "nan" and r[HEADER.index("Labels")] != "nan" for r in rows[1:])
    assert len(s) == len(rows) - 1 - unlabelled and s.meta["skipped_unlabelled"] == unlabelled > 0
    assert s.modalities == ("text", "tabular") and s.task == "multi-label" and s.label_names == list(DEFAULT_LABELS)
    assert int((~s.presence("text")).sum()) == no_report > 0 and s.inputs["tabular"].shape == (len(s), len(FEATURES))
    first = rows[1]
    findings = eval(first[HEADER.index("Labels")])  # noqa: S307 - the fixture's own list literal
    assert s.labels[0].tolist() == [int(f in findings) for f in DEFAULT_LABELS]
    assert s.inputs["text"][0] == first[HEADER.index("Report")].strip()


def test_tabular_features_follow_the_documented_rules():
    row = {"StudyDate_DICOM": "20150717", "PatientBirth": "1925.0", "PatientSex_DICOM": "F", "Projection": "L",
           "XRayTubeCurrent_DICOM": "320", "Exposure_DICOM": "None", "ExposureInuAs_DICOM": "6400",
           "ExposureTime": "20", "RelativeXRayExposure_DICOM": "-1.42"}

    f = dict(zip(FEATURES, _features(row, "here")))

    assert f["age"] == pytest.approx((2015 + 6.5 / 12 - 1925.5) / 100) and f["age_missing"] == 0
    assert (f["sex_male"], f["sex_female"], f["projection_L"], f["projection_PA"]) == (0, 1, 1, 0)
    assert f["tube_current_ma"] == pytest.approx(math.log1p(320) / math.log1p(1000))
    assert (f["exposure_mas"], f["exposure_mas_missing"]) == (0, 1)
    assert f["exposure_uas"] == pytest.approx(math.log1p(6400) / math.log1p(100000))
    assert f["relative_exposure"] == pytest.approx(-0.142) and f["relative_exposure_missing"] == 0
    blank = dict(zip(FEATURES, _features({**row, "PatientBirth": "", "PatientSex_DICOM": "O"}, "here")))
    assert (blank["age"], blank["age_missing"], blank["sex_male"], blank["sex_female"]) == (0, 1, 0, 0)


def test_a_patient_belongs_to_the_site_of_most_of_their_images_ties_to_the_first():
    sites, names = patient_sites(["a", "a", "a", "b", "b", "c"], ["P", "I", "I", "P", "I", "I"])

    assert names == ["I", "P"] and sites.tolist() == [0, 0, 0, 1, 1, 0]


def test_sites_are_manufacturers_patients_nest_in_them_and_group_by_patient_is_the_default(padchest_file):
    s = PadChest(path=padchest_file).load()

    assert PadChest.default_group_by == "patient" and PadChest.default_natural_by == "site"
    assert s.meta["site_names"] == ["ImagingDynamicsCompanyLtd", "PhilipsMedicalSystems"]
    patient, site = s.groups["patient"], s.groups["site"]
    assert all(len(np.unique(site[patient == p])) == 1 for p in np.unique(patient))
    rows = rows_of(padchest_file)[1:]
    labelled = [r for r in rows if r[HEADER.index("Labels")] != "nan"]
    makers = [r[HEADER.index("Manufacturer_DICOM")] for r in labelled]
    assert sum(m != s.meta["site_names"][k] for m, k in zip(makers, site)) > 0  # some images taken at the other site


def test_images_are_joined_by_folder_and_id_absent_where_the_file_is_missing(padchest_file):
    root = Path(padchest_file).parent
    s = PadChest(path=padchest_file, images=str(root / "images"), image_size=32).load()  # the fixture's size

    rows = [r for r in rows_of(padchest_file)[1:] if r[HEADER.index("Labels")] != "nan"]
    expected = [(root / "images" / r[HEADER.index("ImageDir")] / r[HEADER.index("ImageID")]).is_file() for r in rows]
    assert s.modalities == ("image", "text", "tabular") and s.presence("image").tolist() == expected
    first = s.presence("image")[:8]
    assert first.any() and not first.all()
    pixels = np.asarray(s.inputs["image"][:8])  # decoded only now
    assert pixels.shape == (8, 32, 32) and pixels.dtype == np.uint8
    assert (pixels[~first] == 0).all()  # absent: zeros the model never reads
    assert all(p.min() == 0 and p.max() == 255 for p in pixels[first])  # min-max scaled to 8 bits


@pytest.mark.parametrize(("change", "message"), [
    (lambda rows: [[c for c in r if c != "Report"] for r in rows[:1]] + rows[1:], "line 1: missing columns"),
    (lambda rows: rows[:2] + [rows[2][:3] + ["2015-07-17"] + rows[2][4:]] + rows[3:],
     "line 3: StudyDate_DICOM '2015-07-17' is not a date YYYYMMDD"),
    (lambda rows: rows[:3] + [rows[3][:31] + ["['cardiomegaly'"] + rows[3][32:]] + rows[4:],
     "line 4: Labels .* is not a list of strings"),
    (lambda rows: rows[:2] + [rows[2][:23] + ["lots"] + rows[2][24:]] + rows[3:],
     "line 3: XRayTubeCurrent_DICOM 'lots' is not a number"),
    (lambda rows: rows[:2] + [rows[2][:10]] + rows[3:], "line 3: 36 columns expected"),
])
def test_a_malformed_file_is_refused_naming_the_file_and_line(padchest_file, tmp_path, change, message):
    path = write_rows(tmp_path / FILE, change(rows_of(padchest_file)))

    with pytest.raises(ValueError, match=message) as err:
        PadChest(path=str(path)).load()
    assert str(err.value).startswith(str(path))


def test_unreadable_files_and_bad_options_are_refused(tmp_path, padchest_file):
    broken = tmp_path / FILE
    broken.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=f"{broken}: not a readable gzip-compressed CSV"):
        read_padchest(broken)
    with pytest.raises(FileNotFoundError, match="--data.path"):
        PadChest(path=str(tmp_path / "nope.csv.gz")).load()
    with pytest.raises(ValueError, match=r"--data.labels: \['dragon scales'\] never occur"):
        PadChest(path=padchest_file, labels=["dragon scales"]).load()
    with pytest.raises(ValueError, match="--data.modalities"):
        PadChest(modalities=["ecg"])
    with pytest.raises(ValueError, match="pass --data.images"):
        PadChest(modalities=["image", "text"])
    with pytest.raises(FileNotFoundError, match="--data.images"):
        PadChest(path=padchest_file, images=str(tmp_path / "no-images")).load()


def test_text_only_keeps_the_images_with_a_report(padchest_file):
    s = PadChest(path=padchest_file, modalities=["text"]).load()
    both = PadChest(path=padchest_file).load()

    assert s.modalities == ("text",) and len(s) == int(both.presence("text").sum()) and s.presence("text").all()


@pytest.mark.slow
def test_the_packaged_file_reads_whole():
    s = PadChest().load()

    assert len(s) == 160861 - 103 and s.meta["skipped_unlabelled"] == 103
    assert int((~s.presence("text")).sum()) == 40 and np.bincount(s.groups["site"]).tolist() == [78420, 82338]
    assert s.labels[:, DEFAULT_LABELS.index("pleural effusion")].sum() == 9853
