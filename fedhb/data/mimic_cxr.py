"""MIMIC-CXR-JPG (Johnson et al., "MIMIC-CXR-JPG, a large publicly available database of labeled chest radiographs",
arXiv 1901.07042, 2019) with the MIMIC-CXR reports (Johnson et al., Scientific Data 6:317, 2019): chest X-ray image
and radiology report to the 14 CheXpert labels, multi-label, as in Med-MMFL (arXiv 2602.04416).

fedhb reads the PhysioNet releases where they are (credentialed access: https://physionet.org/content/mimic-cxr-jpg/),
in their published layout under ``--data.root``:

- ``files/pXX/pNNNNNNNN/sNNNNNNNN/<dicom_id>.jpg``: 377,110 JPGs (``pXX`` is the first two digits of the subject id);
- ``mimic-cxr-2.0.0-metadata.csv.gz``: one row per image, of which fedhb reads ``dicom_id``, ``subject_id``,
  ``study_id`` and ``ViewPosition`` (PA, AP, LATERAL, LL, ...; blank for some images);
- ``mimic-cxr-2.0.0-chexpert.csv.gz``: one row per study, ``subject_id``, ``study_id`` and the 14 labels (Atelectasis,
  Cardiomegaly, Consolidation, Edema, Enlarged Cardiomediastinum, Fracture, Lung Lesion, Lung Opacity, No Finding,
  Pleural Effusion, Pleural Other, Pneumonia, Pneumothorax, Support Devices) as ``1.0`` (positive), ``0.0``
  (negative), ``-1.0`` (uncertain) or blank (not mentioned, read as 0); ``--data.uncertain`` maps -1 to 0 (``zeros``,
  CheXpert's U-Zeros, the default) or 1 (``ones``, U-Ones) (Irvin et al., arXiv 1901.07031);
- ``mimic-cxr-2.0.0-split.csv.gz``: the official patient-disjoint split (``dicom_id``, ``study_id``, ``subject_id``,
  ``split`` in train/validate/test), kept as each sample's ``source_split``;
- the reports ``files/pXX/pNNNNNNNN/sNNNNNNNN.txt`` of the MIMIC-CXR database (``mimic-cxr-reports.zip``), under
  ``--data.reports`` (default: ``--data.root``): the ``text`` modality, the whole report with its whitespace collapsed
  (as Med-MMFL reads it) or the sections named by ``--data.sections`` (``FINDINGS:``, ``IMPRESSION:``, ...).

Only frontal images (``--data.views``, default Med-MMFL's AP and PA) are kept; by default one sample per study, its
first frontal image in the order of ``--data.views`` and then of the metadata file (Med-MMFL's one image per study),
``--data.per_study false`` keeps every frontal image. A study without a CheXpert row is skipped; a study whose JPG or
report file is not there keeps its other modality (the presence mask tells the model which is absent). Samples are
grouped by patient (``subject_id``, the default group key: no patient on two clients or on both sides of a split).

Images are decoded once, resized to ``--data.image_size`` and kept in the on-disk cache of
:mod:`fedhb.data.image_cache` (memory-mapped, read batch by batch; the build decodes every kept file, so a damaged JPG
is named before training starts).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from fedhb.data.base import FederatedDataset, Samples
from fedhb.data.csv_files import checked_rows
from fedhb.data.image_cache import CachedImages
from fedhb.data.text_common import check_fraction, group_ids

METADATA = "mimic-cxr-2.0.0-metadata.csv.gz"
CHEXPERT = "mimic-cxr-2.0.0-chexpert.csv.gz"
SPLIT = "mimic-cxr-2.0.0-split.csv.gz"
#: The 14 CheXpert labels, in the order of the label file's columns.
LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
          "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
          "Pneumothorax", "Support Devices")
MODALITY_ORDER = ("image", "text")
UNCERTAIN = {"zeros": 0, "ones": 1}
_VALUES = {"1.0": 1, "1": 1, "0.0": 0, "0": 0, "": 0, "-1.0": -1, "-1": -1}


def read_csv(path: Path, columns: tuple[str, ...], hint: str) -> tuple[list[dict[str, str]], Path]:
    """The rows of one gzip-compressed CSV of the release, checked for ``columns``; errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; MIMIC-CXR-JPG's {path.name} ({hint}) must be in --data.root "
                                f"(download it from https://physionet.org/content/mimic-cxr-jpg/)")
    rows = [row for _, row in checked_rows(path, columns, f"the header of MIMIC-CXR-JPG's {path.name}",
                                           "download it again")]
    return rows, path


def label_values(rows: list[dict[str, str]], path: Path, names: list[str], uncertain: str) -> dict[str, np.ndarray]:
    """``{study_id: (L,) int64}`` from the CheXpert file; -1 mapped by ``uncertain``; errors name file and line."""
    out = {}
    for line, row in enumerate(rows, start=2):
        values = []
        for name in names:
            text = row[name].strip()
            if text not in _VALUES:
                raise ValueError(f"{path}: line {line}: {name} {row[name]!r} is not one of 1.0, 0.0, -1.0 or blank")
            value = _VALUES[text]
            values.append(UNCERTAIN[uncertain] if value == -1 else value)
        out[row["study_id"].strip()] = np.array(values, dtype=np.int64)
    return out


def report_text(raw: str, sections: list[str] | None) -> str:
    """The report with whitespace collapsed, or only its ``sections`` (``FINDINGS:`` ... up to the next header)."""
    if sections is None:
        return " ".join(raw.split())
    parts = re.split(r"(?m)^\s*([A-Z][A-Z /&]+):", raw)
    found = {parts[i].strip().lower(): " ".join(parts[i + 1].split()) for i in range(1, len(parts) - 1, 2)}
    return " ".join(found[s] for s in sections if found.get(s))


def image_path(root: Path, subject: str, study: str, dicom: str) -> Path:
    return root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"


def report_path(root: Path, subject: str, study: str) -> Path:
    return root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"


class MIMICCXR(FederatedDataset):
    """MIMIC-CXR-JPG frontal images and MIMIC-CXR reports to the 14 CheXpert labels (multi-label)."""

    default_group_by = "patient"

    def __init__(self, root: str = "data/mimic-cxr-jpg", reports: str | None = None,
                 modalities: list[str] | None = None, views: list[str] | None = None, uncertain: str = "zeros",
                 labels: list[str] | None = None, sections: list[str] | None = None, per_study: bool = True,
                 image_size: int = 224, cache_dir: str | None = None, workers: int | None = None,
                 fraction: float = 1.0) -> None:
        """
        Args:
            root: Folder of the MIMIC-CXR-JPG release (``files/``, ``mimic-cxr-2.0.0-*.csv.gz``).
            reports: Folder holding the reports' ``files/pXX/pNNNNNNNN/sNNNNNNNN.txt``; default ``root``.
            modalities: ``image``, ``text`` or both (default).
            views: ``ViewPosition`` values kept (default ``[PA, AP]``, the frontal views).
            uncertain: What an uncertain label (-1) becomes: ``zeros`` (default) or ``ones``.
            labels: CheXpert labels to predict (default all 14).
            sections: Report sections forming the text (e.g. ``[findings, impression]``); default the whole report.
            per_study: One sample per study (its first frontal image); false: one per frontal image.
            image_size: Side in pixels the images are resized to (in the cache).
            cache_dir: Folder of the image cache (default ``$FEDHB_IMAGE_CACHE``, ``$FEDHB_CACHE/images`` or
                ``~/.cache/fedhb/images``).
            workers: Processes decoding images while the cache is built (default up to 4).
            fraction: Fraction of the samples to keep (stratified by first label, seeded by ``--seed``).
        """
        check_fraction(fraction)
        chosen = list(modalities) if modalities is not None else list(MODALITY_ORDER)
        if not chosen or any(m not in MODALITY_ORDER for m in chosen) or len(set(chosen)) != len(chosen):
            raise ValueError(f"--data.modalities must be a non-empty subset of {list(MODALITY_ORDER)}, got "
                             f"{modalities!r}")
        if uncertain not in UNCERTAIN:
            raise ValueError(f"--data.uncertain must be one of {list(UNCERTAIN)}, got {uncertain!r}")
        names = list(labels) if labels is not None else list(LABELS)
        unknown = [n for n in names if n not in LABELS]
        if not names or unknown or len(set(names)) != len(names):
            raise ValueError(f"--data.labels must be distinct CheXpert labels of {list(LABELS)}, got {labels!r}")
        self.views = [v.upper() for v in views] if views is not None else ["PA", "AP"]
        if not self.views:
            raise ValueError("--data.views must name at least one ViewPosition (PA, AP, ...)")
        if sections is not None and not sections:
            raise ValueError("--data.sections must name at least one report section (findings, impression, ...)")
        if image_size < 8:
            raise ValueError(f"--data.image_size must be >= 8, got {image_size!r}")
        self.root, self.reports, self.uncertain, self.labels = root, reports, uncertain, names
        self.sections = None if sections is None else [s.lower() for s in sections]
        self.per_study, self.image_size, self.cache_dir, self.workers = per_study, image_size, cache_dir, workers
        self.modalities = [m for m in MODALITY_ORDER if m in chosen]
        self.fraction = fraction
        self.name = "mimic_cxr"

    def load(self) -> Samples:
        root = Path(self.root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"--data.root {root}: no such folder; point it at the MIMIC-CXR-JPG release "
                                    f"(files/, {METADATA}, ...)")
        metadata, meta_path = read_csv(root / METADATA, ("dicom_id", "subject_id", "study_id", "ViewPosition"),
                                       "the images' view positions")
        chexpert, chexpert_path = read_csv(root / CHEXPERT, ("subject_id", "study_id", *self.labels),
                                           "the CheXpert labels")
        split_rows, _ = read_csv(root / SPLIT, ("dicom_id", "split"), "the official split")
        labels_of = label_values(chexpert, chexpert_path, self.labels, self.uncertain)
        split_of = {r["dicom_id"].strip(): r["split"].strip() for r in split_rows}
        rank = {v: i for i, v in enumerate(self.views)}
        frontal = []
        unlabelled: set[str] = set()
        for line, row in enumerate(metadata, start=2):
            view = row["ViewPosition"].strip().upper()
            if view not in rank:
                continue
            dicom, subject, study = (row[c].strip() for c in ("dicom_id", "subject_id", "study_id"))
            if not (dicom and subject.isdigit() and study.isdigit()):
                raise ValueError(f"{meta_path}: line {line}: dicom_id {dicom!r}, subject_id {subject!r}, study_id "
                                 f"{study!r}: expected an id and two numbers")
            if study not in labels_of:
                unlabelled.add(study)
                continue
            frontal.append((rank[view], line, dicom, subject, study))
        if self.per_study:
            first: dict[str, tuple] = {}
            for item in sorted(frontal):  # views in --data.views order, then file order
                first.setdefault(item[4], item)
            frontal = sorted(first.values(), key=lambda item: item[1])
        if not frontal:
            raise ValueError(f"{meta_path}: no labelled image has a ViewPosition in {self.views}")
        dicoms = [d for _, _, d, _, _ in frontal]
        subjects = [s for _, _, _, s, _ in frontal]
        studies = [s for _, _, _, _, s in frontal]
        inputs: dict[str, Any] = {}
        present: dict[str, np.ndarray] = {}
        if "image" in self.modalities:
            files = [image_path(root, s, st, d) for d, s, st in zip(dicoms, subjects, studies)]
            found = np.array([f.is_file() for f in files], dtype=bool)
            if not found.any():
                raise FileNotFoundError(f"--data.root {root}: none of the {len(files)} frontal JPGs is there "
                                        f"(expected e.g. {files[0]})")
            inputs["image"] = CachedImages([f if ok else None for f, ok in zip(files, found)], self.image_size,
                                           dataset=self.name, root=root, cache_dir=self.cache_dir,
                                           workers=self.workers)
            present["image"] = found
        if "text" in self.modalities:
            report_root = Path(self.reports).expanduser() if self.reports is not None else root
            texts = []
            for subject, study in zip(subjects, studies):
                path = report_path(report_root, subject, study)
                try:
                    texts.append(report_text(path.read_text(encoding="utf-8"), self.sections))
                except FileNotFoundError:
                    texts.append("")
                except (OSError, UnicodeDecodeError) as err:
                    raise ValueError(f"{path}: not a readable report ({err}); download it again") from err
            has_text = np.array([bool(t) for t in texts], dtype=bool)
            if not has_text.any():
                raise FileNotFoundError(f"--data.reports {report_root}: none of the {len(texts)} studies' reports is "
                                        f"there (expected e.g. {report_path(report_root, subjects[0], studies[0])})")
            inputs["text"], present["text"] = texts, has_text
        keep = np.flatnonzero(np.any(np.stack(list(present.values())), axis=0))

        def take(values: Any) -> Any:
            return [values[i] for i in keep] if isinstance(values, list) else values[keep]

        labels = np.stack([labels_of[s] for s in studies])
        return Samples(
            inputs={m: take(v) for m, v in inputs.items()}, labels=labels[keep], num_classes=len(self.labels),
            task="multi-label", modality="multimodal",
            groups={"patient": group_ids(take(subjects)), "study": group_ids(take(studies))},
            source_split=np.array([split_of.get(d, "unknown") for d in take(dicoms)]),
            label_names=list(self.labels), present={m: v[keep] for m, v in present.items()},
            meta={"dataset": self.name, "unlabelled_studies": len(unlabelled), "uncertain": self.uncertain},
        )
