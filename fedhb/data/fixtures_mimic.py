"""Chest X-ray image fixtures in their published layouts: a small learnable MIMIC-CXR-JPG release with MIMIC-CXR
reports, and Open-i's ``NLMCXR_png`` images for the real Indiana reports.

``python -m fedhb.data.fixtures_mimic --root data/fixture/mimic-cxr-jpg`` writes, as PhysioNet publishes them:

- ``files/pXX/pNNNNNNNN/sNNNNNNNN/<dicom_id>.jpg``: 8-bit grey JPGs (a frontal PA or AP image per study, a second
  frontal one in every sixth study, a lateral one in every other study);
- ``mimic-cxr-2.0.0-metadata.csv.gz``, ``mimic-cxr-2.0.0-chexpert.csv.gz`` and ``mimic-cxr-2.0.0-split.csv.gz`` with
  the release's columns in their order (labels ``1.0``, ``0.0``, ``-1.0`` and blank);
- the reports ``files/pXX/pNNNNNNNN/sNNNNNNNN.txt`` (under ``--reports`` if given), in MIMIC-CXR's layout (FINAL
  REPORT, EXAMINATION, INDICATION, COMPARISON, FINDINGS, IMPRESSION); every seventh study has none.

One study in twenty has no CheXpert row (the reader skips it). Positive findings show in the report (a phrase each)
and in the image (a bright band each), so that either modality alone learns; uncertain ones are hedged in the
report ("possible ...").

``python -m fedhb.data.fixtures_mimic --iu-xray data/fixture/NLMCXR_png`` writes ``<image id>.png`` (8-bit grey, as
Open-i's) for every image listed by the first 80 reports of torchxrayvision's ``NLMCXR_reports.tgz`` that list any
(frontal and lateral); an abnormal report's images carry a bright band.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import os
from pathlib import Path

import numpy as np

from fedhb.data.mimic_cxr import CHEXPERT, LABELS, METADATA, SPLIT

META_HEADER = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
               "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
               "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]
PHRASES = {"Atelectasis": "bibasilar atelectasis", "Cardiomegaly": "the heart is enlarged",
           "Consolidation": "focal consolidation in the right lower lobe", "Edema": "mild pulmonary edema",
           "Enlarged Cardiomediastinum": "widened mediastinal contour", "Fracture": "healed rib fracture",
           "Lung Lesion": "a nodular opacity in the left upper lobe", "Lung Opacity": "patchy opacities",
           "No Finding": "no acute cardiopulmonary process", "Pleural Effusion": "small left pleural effusion",
           "Pleural Other": "pleural thickening", "Pneumonia": "findings concerning for pneumonia",
           "Pneumothorax": "small apical pneumothorax", "Support Devices": "endotracheal tube in standard position"}
VIEW_MEANING = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}


def _gzip_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    tmp = path.with_name(path.name + ".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8", newline="") as handle:
        handle.write(buffer.getvalue())
    os.replace(tmp, path)


def _dicom_id(rng: np.random.Generator) -> str:
    return "-".join(f"{int(x):08x}" for x in rng.integers(0, 2**32, 5))


def _image(labels: np.ndarray, rng: np.random.Generator, lateral: bool) -> np.ndarray:
    """A 40 x 36 grey image: noise plus a bright band per positive label (a lateral view: another pattern)."""
    pixels = rng.normal(70, 12, (40, 36))
    for j in np.flatnonzero(labels == 1):
        row = 2 + (j * 36) // len(LABELS)
        if lateral:
            pixels[:, row % 36] += 110
        else:
            pixels[row:row + 2, :] += 110
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _report(labels: np.ndarray, view: str) -> str:
    positive = [PHRASES[n] for n, v in zip(LABELS, labels) if v == 1]
    uncertain = [f"possible {PHRASES[n]}" for n, v in zip(LABELS, labels) if v == -1]
    findings = "; ".join(positive + uncertain) or "the lungs are clear"
    impression = positive[0] if positive else "no acute cardiopulmonary process"
    return (f"                                 FINAL REPORT\n EXAMINATION:  CHEST ({view} AND LAT)\n \n INDICATION:  "
            f"___-year-old with shortness of breath.\n \n COMPARISON:  None.\n \n FINDINGS:\n \n {findings}.\n \n"
            f" IMPRESSION:\n \n {impression}.\n")


def write_mimic_cxr_fixture(root: str | Path, patients: int = 60, seed: int = 0,
                            reports: str | Path | None = None) -> Path:
    """Write the fixture under ``root`` (reports under ``reports``, default ``root``); returns ``root``."""
    from PIL import Image

    root = Path(root)
    report_root = Path(reports) if reports is not None else root
    rng = np.random.default_rng(seed)
    meta_rows: list[list[str]] = []
    label_rows: list[list[str]] = []
    split_rows: list[list[str]] = []
    study_number = 50_000_000
    for k in range(patients):
        subject = f"{(10 + k % 10) * 1_000_000 + 1000 + k}"
        split = "test" if k % 10 == 9 else "validate" if k % 10 == 8 else "train"
        for _ in range(1 + k % 3):
            study_number += int(rng.integers(1, 500))
            study = str(study_number)
            values = np.where(rng.random(len(LABELS)) < 0.25, 1, 0)
            values[rng.random(len(LABELS)) < 0.06] = -1
            if not (values == 1).any():
                values[LABELS.index("No Finding")] = 1
            blank = rng.random(len(LABELS)) < 0.3
            if study_number % 20 != 7:  # one study in twenty has no CheXpert row
                label_rows.append([subject, study, *("" if b and v == 0 else f"{float(v):.1f}"
                                                     for v, b in zip(values, blank))])
            frontal = "PA" if rng.random() < 0.6 else "AP"
            views = [frontal] + (["AP" if frontal == "PA" else "PA"] if study_number % 6 == 0 else []) + (
                ["LATERAL"] if rng.random() < 0.5 else [])
            folder = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
            folder.mkdir(parents=True, exist_ok=True)
            for view in views:
                dicom = _dicom_id(rng)
                image = _image(values, rng, lateral=view == "LATERAL")
                Image.fromarray(image).save(folder / f"{dicom}.jpg", quality=95)
                meta_rows.append([dicom, subject, study, f"CHEST ({view} AND LAT)", view, str(image.shape[0]),
                                  str(image.shape[1]), "21800506", "213014.531", "CHEST (PA AND LAT)",
                                  VIEW_MEANING[view], "Erect"])
                split_rows.append([dicom, study, subject, split])
            if study_number % 7 != 3:  # every seventh study has no report
                path = report_root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(_report(values, frontal), encoding="utf-8")
    _gzip_csv(root / METADATA, META_HEADER, meta_rows)
    _gzip_csv(root / CHEXPERT, ["subject_id", "study_id", *LABELS], label_rows)
    _gzip_csv(root / SPLIT, ["dicom_id", "study_id", "subject_id", "split"], split_rows)
    return root


def write_iu_xray_png_fixture(folder: str | Path, studies: int = 80, reports: str | Path | None = None,
                              seed: int = 0) -> Path:
    """``folder/<image id>.png`` for the images of the first ``studies`` reports (of ``reports``, default the
    archive inside torchxrayvision) that list any; returns ``folder``."""
    from PIL import Image

    from fedhb.data.iu_xray import packaged_archive, read_iu_xray

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parsed = read_iu_xray(reports if reports is not None else packaged_archive(), ["findings", "impression"])
    rng = np.random.default_rng(seed)
    written = 0
    for label, ids in zip(parsed["labels"], parsed["images"]):
        if not ids:
            continue
        for k, image_id in enumerate(ids):
            pixels = rng.normal(80, 15, (48, 40))
            if label:  # a horizontal band, vertical on the study's other views
                pixels[20:26, :] += 100 if k == 0 else 0
                pixels[:, 17:23] += 0 if k == 0 else 100
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{image_id}.png")
        written += 1
        if written == studies:
            break
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default="data/fixture/mimic-cxr-jpg")
    parser.add_argument("--reports", default=None)
    parser.add_argument("--patients", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iu-xray", default=None, help="instead, write NLMCXR_png images into this folder")
    args = parser.parse_args()
    if args.iu_xray:
        print(write_iu_xray_png_fixture(args.iu_xray, seed=args.seed))
    else:
        print(write_mimic_cxr_fixture(args.root, args.patients, args.seed, args.reports))


if __name__ == "__main__":
    main()
