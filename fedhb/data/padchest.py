"""PadChest (Bustos et al., "PadChest: A large chest x-ray image dataset with multi-label annotated reports", Medical
Image Analysis 66:101797, 2020, arXiv 1901.07441): report text and tabular study features, optionally the images, to
the report's multi-label findings; a natural federation by scanner manufacturer.

The label file ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz`` (160,861 images of 67,625 patients) ships
inside the installed ``torchxrayvision`` package; fedhb locates it with ``importlib.util.find_spec`` and reads it where
it is (never importing torchxrayvision, never copying the file). ``--data.path`` reads another copy. One row is one
image; fedhb reads these columns of it:

- ``Report``: the radiologist's report, in PadChest's stemmed Spanish (``sin hallazg patolog edad pacient .``), the
  ``text`` modality; 139 rows (40 of the labelled ones) have none (``nan``): their text is absent, not an empty
  report.
- the ``tabular`` modality, 19 floats, each column rescaled by a fixed rule (no statistics of the data, so nothing
  crosses clients) with an indicator where the file has no value: age at the study (``StudyDate_DICOM`` minus
  ``PatientBirth``, a year, taken as mid-year; divided by 100), sex (``PatientSex_DICOM``: male, female; other and
  unknown are both 0), projection (``Projection``: PA, L, AP, AP_horizontal, COSTAL; EXCLUDE and UNK are all 0), and
  the exposure settings ``XRayTubeCurrent_DICOM`` (mA), ``Exposure_DICOM`` (mAs), ``ExposureInuAs_DICOM`` (uAs),
  ``ExposureTime`` (ms) as ``log1p(x) / log1p(max)`` with max 1000 mA, 100 mAs, 100,000 uAs and 1000 ms, and
  ``RelativeXRayExposure_DICOM`` divided by 10 (:data:`FEATURES` lists them in order).
- ``Labels``: the findings, a Python list literal (``['pleural effusion', 'cardiomegaly']``; ``['normal']`` is no
  finding); :data:`DEFAULT_LABELS` are the ten most frequent radiological findings, ``--data.labels`` chooses others.
  The 103 rows without labels (``nan``) are skipped.
- ``PatientID`` (the group key ``patient``, the default: no patient on two clients or on both sides of a split),
  ``StudyID`` (``study``), and ``Manufacturer_DICOM``: the scanner maker, PhilipsMedicalSystems or
  ImagingDynamicsCompanyLtd. Their label rates differ (pleural effusion in 9.3% versus 3.1% of the images), a real
  site effect. 10,265 patients were imaged on both; each patient's ``site`` is the maker of most of their images
  (the first one in the file on a tie), so that ``--partition.scheme natural`` (one client per site, the dataset's
  ``natural_by``) keeps every patient whole on one client.
- ``ImageDir``/``ImageID``: with ``--data.images DIR`` the ``image`` modality is read from ``DIR/<ImageDir>/<ImageID>``
  (the released zip folders, 16-bit PNG), min-max scaled to 8 bits and resized to ``--data.image_size``; an image
  whose file is not there is absent for that sample. Images are decoded only for the samples a run keeps (after
  ``--data.fraction``), once, into the on-disk cache of :mod:`fedhb.data.image_cache` (``--data.cache_dir``; 50 KB
  per image at 224 px), and memory-mapped from it.

PadChest is licensed for research use by BIMCV (http://bimcv.cipf.es/bimcv-projects/padchest/); fedhb reads the copy
torchxrayvision distributes.
"""

from __future__ import annotations

import ast
import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedhb.data.base import FederatedDataset, Samples
from fedhb.data.csv_files import checked_rows
from fedhb.data.image_cache import CachedImages, decode_image
from fedhb.data.text_common import check_fraction, group_ids

FILE = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
#: The ten most frequent radiological findings of the file ("normal", "unchanged" and devices left out).
DEFAULT_LABELS = ("COPD signs", "cardiomegaly", "aortic elongation", "pleural effusion", "scoliosis", "pneumonia",
                  "interstitial pattern", "chronic changes", "infiltrates", "costophrenic angle blunting")
PROJECTIONS = ("PA", "L", "AP", "AP_horizontal", "COSTAL")
#: Exposure columns, their feature name and the value that maps to 1 (``log1p(x) / log1p(top)``; ``None``: ``x / 10``).
EXPOSURE = (("XRayTubeCurrent_DICOM", "tube_current_ma", 1000.0), ("Exposure_DICOM", "exposure_mas", 100.0),
            ("ExposureInuAs_DICOM", "exposure_uas", 100000.0), ("ExposureTime", "exposure_time_ms", 1000.0),
            ("RelativeXRayExposure_DICOM", "relative_exposure", None))
FEATURES = ("age", "age_missing", "sex_male", "sex_female", *(f"projection_{p}" for p in PROJECTIONS),
            *(f for _, name, _ in EXPOSURE for f in (name, f"{name}_missing")))
COLUMNS = ("ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth", "PatientSex_DICOM",
           "Projection", "Manufacturer_DICOM", *(c for c, _, _ in EXPOSURE), "Report", "Labels")
MODALITY_ORDER = ("image", "text", "tabular")
_MISSING = ("", "nan", "none", "null")


def packaged_file() -> Path:
    """``data/PADCHEST_...csv.gz`` inside the installed torchxrayvision package (found, not imported)."""
    spec = importlib.util.find_spec("torchxrayvision")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location) / "data" / FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{FILE} not found: torchxrayvision is not installed. Install it with `pip install --no-deps "
        f"torchxrayvision==1.5.7` (--no-deps: fedhb only reads its data file), or pass --data.path to a copy of the "
        f"PadChest label file (http://bimcv.cipf.es/bimcv-projects/padchest/)."
    )


def _number(value: str, where: str, column: str) -> float | None:
    text = value.strip()
    if text.lower() in _MISSING:
        return None
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"{where}: {column} {value!r} is not a number") from None
    return number if math.isfinite(number) else None


def _features(row: dict[str, str], where: str) -> list[float]:
    date = row["StudyDate_DICOM"].strip()
    if len(date) != 8 or not date.isdigit() or not 1 <= int(date[4:6]) <= 12:
        raise ValueError(f"{where}: StudyDate_DICOM {date!r} is not a date YYYYMMDD")
    birth = _number(row["PatientBirth"], where, "PatientBirth")
    age = None if birth is None else int(date[:4]) + (int(date[4:6]) - 0.5) / 12 - (birth + 0.5)
    sex = row["PatientSex_DICOM"].strip().upper()
    projection = row["Projection"].strip()
    out = [0.0 if age is None else age / 100, float(age is None), float(sex == "M"), float(sex == "F"),
           *(float(projection == p) for p in PROJECTIONS)]
    for column, _, top in EXPOSURE:
        x = _number(row[column], where, column)
        if x is None:
            out += [0.0, 1.0]
        else:
            out += [math.log1p(max(x, 0.0)) / math.log1p(top) if top is not None else x / 10, 0.0]
    return out


def _labels(value: str, where: str) -> list[str] | None:
    """The findings of one row; ``None`` for a row without labels (``nan``)."""
    if value.strip().lower() in _MISSING:
        return None
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = None
    if not isinstance(parsed, list) or not all(isinstance(x, str) for x in parsed):
        raise ValueError(f"{where}: Labels {value[:60]!r} is not a list of strings such as ['pleural effusion']")
    return [x.strip() for x in parsed if x.strip()]


def read_padchest(path: str | Path) -> dict[str, Any]:
    """Every labelled row of the PadChest label file, checked: ``ids`` (ImageDir/ImageID), ``patient``, ``study``,
    ``manufacturer``, ``text`` (``None`` where absent), ``features`` ``(N, 19)``, ``labels`` (lists of findings) and
    ``skipped`` (rows without labels). Errors name the file and line."""
    path = Path(path)
    out: dict[str, Any] = {k: [] for k in ("ids", "patient", "study", "manufacturer", "text", "features", "labels")}
    skipped = 0
    for line, row in checked_rows(path, COLUMNS, f"the header of PadChest's label file ({FILE})",
                                  "download or reinstall it"):
        where = f"{path}: line {line}"
        labels = _labels(row["Labels"], where)
        if labels is None:
            skipped += 1
            continue
        patient = row["PatientID"].strip()
        if not patient:
            raise ValueError(f"{where}: empty PatientID")
        report = row["Report"].strip()
        out["ids"].append(f"{row['ImageDir'].strip()}/{row['ImageID'].strip()}")
        out["patient"].append(patient)
        out["study"].append(row["StudyID"].strip())
        out["manufacturer"].append(row["Manufacturer_DICOM"].strip() or "unknown")
        out["text"].append(None if report.lower() in _MISSING else report)
        out["features"].append(_features(row, where))
        out["labels"].append(labels)
    if not out["ids"]:
        raise ValueError(f"{path}: no labelled rows")
    out["features"] = np.asarray(out["features"], dtype=np.float32)
    out["skipped"] = skipped
    return out


def patient_sites(patients: Sequence[str], manufacturers: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Each row's ``site``: the manufacturer of most of its patient's images (ties: the first in row order), as ids
    into the sorted list of manufacturers."""
    names = sorted(set(manufacturers))
    counts: dict[str, dict[str, int]] = {}
    for p, m in zip(patients, manufacturers):
        seen = counts.setdefault(p, {})
        seen[m] = seen.get(m, 0) + 1  # dicts keep first-seen order, which breaks ties
    best = {p: max(c, key=c.__getitem__) for p, c in counts.items()}
    return np.array([names.index(best[p]) for p in patients], dtype=np.int64), names


def read_image(path: Path, size: int) -> np.ndarray:
    """One PadChest PNG as ``(size, size)`` uint8: min-max scaled from its bit depth, resized bilinearly (what the
    image cache holds)."""
    return decode_image(path, size, scaling="minmax")


#: Parsed files of this process, by (path, size, mtime): the quick start runs three federations on one file.
_CACHE: dict[tuple[str, int, int], dict[str, Any]] = {}


class PadChest(FederatedDataset):
    """PadChest: report text and tabular study features (and images, if you have them) to multi-label findings."""

    default_group_by = "patient"
    default_natural_by = "site"

    def __init__(self, path: str | None = None, images: str | None = None, modalities: list[str] | None = None,
                 labels: list[str] | None = None, image_size: int = 224, fraction: float = 1.0,
                 cache_dir: str | None = None) -> None:
        """
        Args:
            path: The label file (``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz``); default: the copy
                inside the installed torchxrayvision package.
            images: Folder of the released images (``<ImageDir>/<ImageID>``); default none (no image modality).
            modalities: Which of ``image``, ``text``, ``tabular`` to use; default text and tabular, and image when
                ``images`` is set.
            labels: Findings to predict (names as in the file's Labels column); default :data:`DEFAULT_LABELS`.
            image_size: Side in pixels the images are resized to.
            fraction: Fraction of the images to keep (stratified by first finding, seeded by ``--seed``).
            cache_dir: Folder of the image cache (default ``$FEDHB_IMAGE_CACHE``, ``$FEDHB_CACHE/images`` or
                ``~/.cache/fedhb/images``).
        """
        check_fraction(fraction)
        chosen = list(modalities) if modalities is not None else ["text", "tabular"] + (["image"] if images else [])
        if not chosen or any(m not in MODALITY_ORDER for m in chosen) or len(set(chosen)) != len(chosen):
            raise ValueError(f"--data.modalities must be a non-empty subset of {list(MODALITY_ORDER)}, got "
                             f"{modalities!r}")
        if "image" in chosen and images is None:
            raise ValueError("--data.modalities includes image: pass --data.images, the folder of PadChest's images")
        names = list(labels) if labels is not None else list(DEFAULT_LABELS)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"--data.labels must be a non-empty list of distinct findings, got {labels!r}")
        if image_size < 8:
            raise ValueError(f"--data.image_size must be >= 8, got {image_size!r}")
        self.path, self.images, self.labels, self.image_size, self.fraction = path, images, names, image_size, fraction
        self.cache_dir = cache_dir
        self.modalities = [m for m in MODALITY_ORDER if m in chosen]
        self.name = "padchest"

    def load(self) -> Samples:
        path = Path(self.path) if self.path is not None else packaged_file()
        if not path.is_file():
            raise FileNotFoundError(f"--data.path {path} does not exist; point it at {FILE} or leave it unset to read "
                                    f"the copy inside torchxrayvision")
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _CACHE:
            _CACHE.clear()
            _CACHE[key] = read_padchest(path)
        rows = _CACHE[key]
        known = {f for row in rows["labels"] for f in row}
        unknown = [n for n in self.labels if n not in known]
        if unknown:
            raise ValueError(f"--data.labels: {unknown} never occur in {path}'s Labels column")
        column = {n: j for j, n in enumerate(self.labels)}
        labels = np.zeros((len(rows["ids"]), len(self.labels)), dtype=np.int64)
        for i, row in enumerate(rows["labels"]):
            for finding in row:
                if finding in column:
                    labels[i, column[finding]] = 1
        sites, site_names = patient_sites(rows["patient"], rows["manufacturer"])
        inputs: dict[str, Any] = {}
        present: dict[str, np.ndarray] = {}
        if "image" in self.modalities:
            folder = Path(str(self.images)).expanduser()
            if not folder.is_dir():
                raise FileNotFoundError(f"--data.images {folder}: no such folder (it holds <ImageDir>/<ImageID>.png)")
            files = [folder / i for i in rows["ids"]]
            found = np.array([f.is_file() for f in files], dtype=bool)
            if not found.any():
                raise FileNotFoundError(f"--data.images {folder}: none of the {len(files)} images of {path.name} is "
                                        f"there (expected e.g. {files[0]})")
            inputs["image"] = CachedImages([f if ok else None for f, ok in zip(files, found)], self.image_size,
                                           scaling="minmax", dataset=self.name, root=folder, cache_dir=self.cache_dir)
            present["image"] = found
        if "text" in self.modalities:
            inputs["text"] = [t or "" for t in rows["text"]]
            present["text"] = np.array([t is not None for t in rows["text"]], dtype=bool)
        if "tabular" in self.modalities:
            inputs["tabular"] = rows["features"]
        keep = np.arange(len(rows["ids"]))
        if len(present) == len(self.modalities):  # no tabular: a row without any chosen modality carries nothing
            keep = np.flatnonzero(np.any(np.stack(list(present.values())), axis=0))

        def take(values: Any) -> Any:
            return [values[i] for i in keep] if isinstance(values, list) else values[keep]

        return Samples(
            inputs={m: take(v) for m, v in inputs.items()}, labels=labels[keep], num_classes=len(self.labels),
            task="multi-label", modality="multimodal",
            groups={"patient": group_ids(take(rows["patient"])), "study": group_ids(take(rows["study"])),
                    "site": sites[keep]},
            label_names=list(self.labels), present={m: v[keep] for m, v in present.items()},
            meta={"dataset": self.name, "skipped_unlabelled": rows["skipped"], "site_names": site_names,
                  "tabular": {"feature_names": list(FEATURES)}},
        )
