"""A small learnable PadChest label file in the published format, and optionally its images.

``python -m fedhb.data.fixtures_padchest --root data/fixture/padchest [--images]`` writes
``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz`` with the released file's 36 columns in their order (an
unnamed row-number column first, Python list literals in ``Labels``, ``None`` and ``nan`` where the release has them)
and, with ``--images``, 16-bit PNGs under ``images/<ImageDir>/<ImageID>`` for four rows in five (the fifth is absent).

Each patient has one to three images of one or two studies; most patients are imaged on one manufacturer, every
seventh on both (so the site rule is exercised). Findings show in the report (a stemmed Spanish phrase per finding,
as the release's reports read), in the tabular features (pleural effusion and pneumonia are imaged supine, AP
horizontal, at higher tube current) and in the image (a bright band per finding), so every modality alone learns.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import os
from pathlib import Path

import numpy as np

from fedhb.data.padchest import DEFAULT_LABELS, FILE

HEADER = ["", "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth", "PatientSex_DICOM",
          "ViewPosition_DICOM", "Projection", "MethodProjection", "Pediatric", "Modality_DICOM", "Manufacturer_DICOM",
          "PhotometricInterpretation_DICOM", "PixelRepresentation_DICOM", "PixelAspectRatio_DICOM",
          "SpatialResolution_DICOM", "BitsStored_DICOM", "WindowCenter_DICOM", "WindowWidth_DICOM", "Rows_DICOM",
          "Columns_DICOM", "XRayTubeCurrent_DICOM", "Exposure_DICOM", "ExposureInuAs_DICOM", "ExposureTime",
          "RelativeXRayExposure_DICOM", "ReportID", "Report", "MethodLabel", "Labels", "Localizations",
          "LabelsLocalizationsBySentence", "labelCUIS", "LocalizationsCUIS"]
MANUFACTURERS = ("ImagingDynamicsCompanyLtd", "PhilipsMedicalSystems")
#: A stemmed Spanish phrase per finding, as PadChest's reports read.
PHRASES = {"COPD signs": "sign epoc hiperinsufl", "cardiomegaly": "cardiomegali", "aortic elongation": "elong aortic",
           "pleural effusion": "derram pleural", "scoliosis": "escoliosis dorsal", "pneumonia": "consolid neumoni",
           "interstitial pattern": "patron intersticial", "chronic changes": "cambi pulmonar cronic",
           "infiltrates": "infiltr bas", "costophrenic angle blunting": "pinzamient sen costofren"}
SUPINE = ("pleural effusion", "pneumonia")


def _labels_literal(findings: list[str]) -> str:
    return "[" + ", ".join(repr(f) for f in findings) + "]"


def _image(findings: list[str], rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A 12-bit image (in 16-bit PNG): noise plus one bright horizontal band per finding."""
    pixels = rng.normal(1200.0, 150.0, (size, size))
    for k, finding in enumerate(DEFAULT_LABELS):
        if finding in findings:
            row = 2 + 3 * k
            pixels[row:row + 2] += 2000.0
    return np.clip(pixels, 0, 4095).astype(np.uint16)


def write_padchest_fixture(root: str | Path, patients: int = 120, seed: int = 0, images: bool = False) -> Path:
    """Write the fixture under ``root``; returns the label file's path.

    Two rows in every 40 have no report (``nan``), one in 50 no labels (``nan``, skipped by the reader), and one in
    three has its exposure fields as ``None``.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows: list[list[str]] = []
    pictures: list[tuple[str, np.ndarray]] = []
    n = 0
    for p in range(patients):
        patient = f"{rng.integers(10**17, 10**18)}{p:05d}"
        home = MANUFACTURERS[p % 2]
        birth = int(rng.integers(1925, 2000))
        sex = "O" if p % 17 == 0 else ("M" if p % 2 else "F")
        studies = 1 + int(rng.integers(0, 2))
        for st in range(studies):
            study = f"{rng.integers(10**17, 10**18)}{p:05d}{st}"
            date = f"{rng.integers(2014, 2018)}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}"
            k = int(rng.integers(0, 3))
            findings = sorted(rng.choice(DEFAULT_LABELS, size=k, replace=False).tolist()) if k else []
            report = " " + (" . ".join(PHRASES[f] for f in findings) if findings else "sin hallazg patolog") + " ."
            for image in range(1 + int(rng.integers(0, 2))):
                maker = MANUFACTURERS[1 - p % 2] if p % 7 == 3 and image == 1 else home
                supine = any(f in SUPINE for f in findings)
                projection = "AP_horizontal" if supine and image == 0 else ("PA", "L")[image % 2]
                image_id = f"{rng.integers(10**17, 10**18)}_{n:06d}.png"
                image_dir = str(n % 4)
                none = n % 3 == 2
                current = "None" if none else str(500 if supine else 250)
                exposure = "None" if none else str(int(rng.integers(2, 12)))
                uas = "None" if none else str(int(exposure) * 1250 if exposure != "None" else 0)
                time_ms = "None" if none else str(int(rng.integers(5, 50)))
                relative = "None" if n % 4 == 1 else f"{rng.normal(-1.1, 0.2):.2f}"
                text = "nan" if n % 40 in (7, 23) else report
                labels = "nan" if n % 50 == 11 else _labels_literal(findings or ["normal"])
                rows.append([
                    str(n), image_id, image_dir, date, study, patient, f"{birth}.0", sex,
                    {"PA": "POSTEROANTERIOR", "L": "LATERAL"}.get(projection, "nan"), projection,
                    "Manual review of DICOM fields", "No", "CR", maker, "MONOCHROME2", "0", "None", "None", "12",
                    "2092", "2251", "1728", "1872", current, exposure, uas, time_ms, relative,
                    str(4000000 + n), text, "Physician", labels, "[]", "[" + labels + "]" if labels != "nan" else "nan",
                    "[]", "[]",
                ])
                if images and n % 5 != 4:
                    pictures.append((f"{image_dir}/{image_id}", _image(findings, rng)))
                n += 1
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(HEADER)
    writer.writerows(rows)
    path = root / FILE
    tmp = path.with_name(f".{path.name}.part")
    with gzip.open(tmp, "wt", encoding="utf-8", newline="") as handle:
        handle.write(buffer.getvalue())
    os.replace(tmp, path)
    if images:
        from PIL import Image

        for name, pixels in pictures:
            target = root / "images" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(target)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="folder to write the label file (and images/) into")
    parser.add_argument("--patients", type=int, default=120)
    parser.add_argument("--images", action="store_true", help="also write 16-bit PNG images under images/")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_padchest_fixture(args.root, args.patients, args.seed, args.images))


if __name__ == "__main__":
    main()
