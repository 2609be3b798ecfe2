"""Symile-MIMIC (Saporta et al., "Contrasting with Symile", NeurIPS 2024, arXiv 2411.01053; PhysioNet
https://doi.org/10.13026/3vvj-s428, version 1.0.0): a chest X-ray, a 12-lead ECG and 50 blood lab values of each of
11,622 MIMIC-IV admissions, for contrastive alignment of the three and zero-shot retrieval of the X-ray.

``--data.root`` is the dataset's folder as PhysioNet publishes it (credentialed access). fedhb reads:

- ``train.csv``, ``val.csv``, ``test.csv``: one row per sample, with ``subject_id`` (the group key ``patient``, the
  default: no patient on two clients or on both sides of a split), ``hadm_id`` (``admission``), the CheXpert labels
  the splits keep (``No Finding`` gives the partition label, below), the 50 lab values (columns named by MIMIC-IV
  ``itemid``, empty where not measured) and their ``<itemid>_percentile``. ``test.csv`` is Symile's retrieval set:
  each query (``label`` 1) followed by its negative candidates (``label`` 0, ``label_hadm_id`` naming the query),
  which are copies of other test rows; fedhb keeps the queries (every test admission once) and draws its own
  candidates (:mod:`fedhb.tasks.retrieval`). ``val_retrieval.csv`` is not read.
- ``data_npy/<split>/``: the preprocessed arrays, row for row as the csv: ``cxr_<split>.npy`` ``(n, 3, 320, 320)``
  float32 (the X-ray scaled to 320 px on its short side, cropped square, ImageNet-normalised), ``ecg_<split>.npy``
  ``(n, 1, 5000, 12)`` float32 (10 s at 500 Hz, min-max scaled to [-1, 1]), ``labs_percentiles_<split>.npy``
  ``(n, 50)`` float32 (each lab's percentile under the training split's empirical CDF, the training mean where not
  measured: never NaN) and ``labs_missingness_<split>.npy`` ``(n, 50)`` (1 where the lab was measured, 0 where not:
  the published arrays' convention), and ``hadm_id_<split>.npy``; the labs' columns are in sorted ``itemid`` order
  (the order of Symile's ``labs_means.json`` keys). For ``test``, ``label_test.npy`` marks the queries.

What fedhb makes of them, one sample per admission: ``image``: the X-ray un-normalised, averaged over its three
(identical) channels and resized to ``--data.image_size`` (default 224), uint8; ``signal``: the ECG as ``(12,
length)``, resampled from 500 Hz to ``--data.target_rate`` (default 50 Hz: 500 samples, within MOMENT's 512-sample
input); ``tabular``: the 50 percentiles and the 50 measured-indicators (100 floats, Symile's labs input). The
``labels`` are 1 where ``No Finding`` is 1 and 0 otherwise (2 classes): what ``--partition.scheme dirichlet``
skews; the task does not read them. Every admission holds all three modalities; ``--partition.missing_modality``
removes one from clients or samples.

Malformed input stops the run before training, naming the file: a missing csv or array, an array of the wrong shape
or length, ``hadm_id`` rows that differ between a csv and its arrays, a NaN (or out-of-range) lab percentile or a
missingness flag other than 0/1, a non-finite ECG or X-ray.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from fedhb.data.base import FederatedDataset, Samples
from fedhb.data.text_common import check_fraction, group_ids

SPLITS = ("train", "val", "test")
#: The modalities, in fusion order (the X-ray first: the retrieval target given the other two, as in Symile).
MODALITIES = ("image", "signal", "tabular")
#: The 50 lab itemids of Symile-MIMIC and their MIMIC-IV names (Symile's ``constants.LABS``).
LABS = {
    "51221": "Hematocrit", "51265": "Platelet Count", "50912": "Creatinine", "50971": "Potassium",
    "51222": "Hemoglobin", "51301": "White Blood Cells", "51249": "MCHC", "51279": "Red Blood Cells", "51250": "MCV",
    "51248": "MCH", "51277": "RDW", "51006": "Urea Nitrogen", "50983": "Sodium", "50902": "Chloride",
    "50882": "Bicarbonate", "50868": "Anion Gap", "50931": "Glucose", "50960": "Magnesium", "50893": "Calcium, Total",
    "50970": "Phosphate", "51237": "INR(PT)", "51274": "PT", "51275": "PTT", "51146": "Basophils",
    "51256": "Neutrophils", "51254": "Monocytes", "51200": "Eosinophils", "51244": "Lymphocytes", "52172": "RDW-SD",
    "50934": "H", "51678": "L", "50947": "I", "50861": "Alanine Aminotransferase (ALT)",
    "50878": "Asparate Aminotransferase (AST)", "50813": "Lactate", "50863": "Alkaline Phosphatase",
    "50885": "Bilirubin, Total", "50820": "pH", "50862": "Albumin", "50802": "Base Excess", "50821": "pO2",
    "50804": "Calculated Total CO2", "50818": "pCO2", "52075": "Absolute Neutrophil Count",
    "52073": "Absolute Eosinophil Count", "52074": "Absolute Monocyte Count", "52069": "Absolute Basophil Count",
    "51133": "Absolute Lymphocyte Count", "50910": "Creatine Kinase (CK)", "52135": "Immature Granulocytes",
}
#: The labs' column order in the arrays (sorted itemids, as Symile sorts ``labs_means.json``'s keys).
LAB_ORDER = tuple(sorted(LABS))
#: The CheXpert labels the split csvs keep (Symile drops the other eight).
CHEXPERT = ("Atelectasis", "Cardiomegaly", "Edema", "Lung Opacity", "No Finding", "Pleural Effusion")
ECG_RATE = 500
LEADS = 12
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Rows decoded at once (bounds the float32 working set of the 320-px X-rays: 64 x 1.2 MB).
CHUNK = 64

_CACHE: dict[tuple[Any, ...], dict[str, Any]] = {}


def array_path(root: Path, split: str, name: str) -> Path:
    return root / "data_npy" / split / f"{name}_{split}.npy"


def _open(path: Path, shape: tuple[int | None, ...], what: str) -> np.ndarray:
    """The array at ``path`` (memory-mapped), checked against ``shape`` (``None``: any size)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (Symile-MIMIC's data_npy/<split>/ arrays; expected {what})")
    try:
        array = np.load(path, mmap_mode="r")
    except ValueError as error:
        raise ValueError(f"{path}: not a readable .npy array ({error})") from None
    if array.ndim != len(shape) or any(s is not None and a != s for a, s in zip(array.shape, shape)):
        raise ValueError(f"{path}: shape {tuple(array.shape)}, expected {what}")
    return array


def read_split_csv(path: Path) -> dict[str, list[str]]:
    """The columns Symile-MIMIC's split csvs need to have, by name (values as text)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (Symile-MIMIC's {path.name}; --data.root is the folder "
                                f"with train.csv, val.csv, test.csv and data_npy/)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        need = ["subject_id", "hadm_id", "No Finding"] + (["label"] if path.stem == "test" else [])
        missing = [c for c in need if c not in header]
        if missing:
            raise ValueError(f"{path}: no column {missing[0]!r} (columns: {', '.join(header[:8])}, ...)")
        columns: dict[str, list[str]] = {c: [] for c in need}
        for row in reader:
            for c in need:
                columns[c].append(row[c] or "")
    return columns


def _ints(values: list[str], path: Path, column: str) -> np.ndarray:
    try:
        return np.array([int(float(v)) for v in values], dtype=np.int64)
    except ValueError:
        bad = next(v for v in values if not _is_number(v))
        raise ValueError(f"{path}: column {column!r} holds {bad!r}, not an id") from None


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _images(cxr: np.ndarray, rows: np.ndarray, size: int, path: Path) -> np.ndarray:
    """ImageNet-normalised ``(n, 3, H, W)`` float X-rays at ``rows`` as ``(len(rows), size, size)`` uint8."""
    import torch
    import torch.nn.functional as F

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = np.empty((len(rows), size, size), dtype=np.uint8)
    for start in range(0, len(rows), CHUNK):
        part = torch.from_numpy(np.asarray(cxr[rows[start:start + CHUNK]], dtype=np.float32))
        if not torch.isfinite(part).all():
            raise ValueError(f"{path}: non-finite pixel values")
        gray = (part * std + mean).mean(1, keepdim=True).clamp(0, 1)
        if gray.shape[-1] != size:
            gray = F.interpolate(gray, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[start:start + len(part)] = (gray[:, 0] * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    return out


def _signals(ecg: np.ndarray, rows: np.ndarray, rate: int, path: Path) -> np.ndarray:
    """``(n, 1, T, 12)`` ECGs at ``rows`` as ``(len(rows), 12, T * rate / 500)`` float32."""
    from fedhb.data._signal_io import resample

    parts = []
    for start in range(0, len(rows), CHUNK):
        part = np.asarray(ecg[rows[start:start + CHUNK]], dtype=np.float32)[:, 0].transpose(0, 2, 1)
        if not np.isfinite(part).all():
            raise ValueError(f"{path}: non-finite ECG values")
        parts.append(resample(part, ECG_RATE, rate, axis=-1).astype(np.float32))
    return np.concatenate(parts) if parts else np.zeros((0, LEADS, 0), dtype=np.float32)


def read_split(root: Path, split: str, image_size: int, rate: int,
               modalities: tuple[str, ...] = MODALITIES) -> dict[str, Any]:
    """One split's admissions (the test split's queries only), checked, and ``modalities`` converted (every array's
    shape is checked)."""
    table = root / f"{split}.csv"
    columns = read_split_csv(table)
    n = len(columns["hadm_id"])
    cxr_path = array_path(root, split, "cxr")
    cxr = _open(cxr_path, (n, 3, None, None), f"({n}, 3, H, H) float32 X-rays, one per row of {table.name}")
    if cxr.shape[2] != cxr.shape[3]:
        raise ValueError(f"{cxr_path}: shape {tuple(cxr.shape)}, expected square ({n}, 3, H, H) X-rays")
    ecg_path = array_path(root, split, "ecg")
    ecg = _open(ecg_path, (n, 1, None, LEADS), f"({n}, 1, 5000, 12) float32 ECGs, one per row of {table.name}")
    pct_path, obs_path = array_path(root, split, "labs_percentiles"), array_path(root, split, "labs_missingness")
    percentiles = _open(pct_path, (n, len(LABS)), f"({n}, 50) lab percentiles, one per row of {table.name}")
    observed = _open(obs_path, (n, len(LABS)), f"({n}, 50) lab missingness flags, one per row of {table.name}")
    ids_path = array_path(root, split, "hadm_id")
    hadm = np.asarray(_open(ids_path, (n,), f"({n},) hadm_id, one per row of {table.name}")).astype(np.int64)
    csv_hadm = _ints(columns["hadm_id"], table, "hadm_id")
    if not np.array_equal(hadm, csv_hadm):
        row = int(np.flatnonzero(hadm != csv_hadm)[0])
        raise ValueError(f"{ids_path}: row {row} is admission {hadm[row]} but row {row + 2} of {table} is "
                         f"{csv_hadm[row]}; the arrays must follow the csv row for row")
    keep = np.arange(n)
    if split == "test":
        label_path = array_path(root, split, "label")
        flags = (np.asarray(_open(label_path, (n,), f"({n},) 0/1 query flags")) if label_path.is_file()
                 else _ints(columns["label"], table, "label"))
        keep = np.flatnonzero(np.asarray(flags) == 1)
        if len(np.unique(hadm[keep])) != len(keep):
            raise ValueError(f"{table}: an admission is a query (label 1) more than once")
    pct = np.asarray(percentiles[keep], dtype=np.float32)
    if not np.isfinite(pct).all():
        row = int(keep[np.flatnonzero(~np.isfinite(pct).all(1))[0]])
        raise ValueError(f"{pct_path}: row {row} has a NaN lab percentile; the published arrays hold the training "
                         f"mean where a lab was not measured (regenerate them with Symile's "
                         f"process_and_save_tensors.py)")
    if (pct < 0).any() or (pct > 1).any():
        raise ValueError(f"{pct_path}: lab percentiles outside [0, 1]")
    obs = np.asarray(observed[keep])
    if not np.isin(obs, (0, 1)).all():
        raise ValueError(f"{obs_path}: missingness flags must be 0 or 1, found {np.unique(obs)[:5].tolist()}")
    no_finding = np.array([v.strip() not in ("", "nan") and float(v) == 1.0 for v in columns["No Finding"]])
    converted = {
        "image": lambda: _images(cxr, keep, image_size, cxr_path),
        "signal": lambda: _signals(ecg, keep, rate, ecg_path),
        "tabular": lambda: np.concatenate([pct, obs.astype(np.float32)], axis=1),
    }
    return {
        **{m: converted[m]() for m in modalities},
        "subject": _ints(columns["subject_id"], table, "subject_id")[keep],
        "hadm": hadm[keep],
        "labels": no_finding[keep].astype(np.int64),
    }


class SymileMIMIC(FederatedDataset):
    """Symile-MIMIC: chest X-ray, 12-lead ECG and 50 blood labs of an admission, aligned contrastively."""

    default_group_by = "patient"

    def __init__(self, root: str, modalities: list[str] | None = None, image_size: int = 224, target_rate: int = 50,
                 objective: str | None = None, candidates: int = 10, fraction: float = 1.0) -> None:
        """
        Args:
            root: The PhysioNet folder (``symile-mimic/1.0.0``: the split csvs and ``data_npy/``).
            modalities: Two or three of ``image``, ``signal``, ``tabular`` (default all three); with two, the
                objective is CLIP's.
            image_size: Side in pixels the X-rays are resized to.
            target_rate: ECG rate in Hz after resampling from 500 Hz (a divisor-friendly whole rate; 50 gives 500
                samples per 10-s ECG).
            objective: ``symile`` (the multilinear inner product; three modalities) or ``clip`` (pairwise
                InfoNCE), see :mod:`fedhb.tasks.retrieval`; default symile for three modalities, clip for two.
            candidates: Candidates per query of the zero-shot retrieval accuracy (Symile-MIMIC: 10).
            fraction: Fraction of the admissions to keep (stratified, seeded by ``--seed``).
        """
        check_fraction(fraction)
        if image_size < 8:
            raise ValueError(f"--data.image_size must be >= 8, got {image_size!r}")
        if not 1 <= target_rate <= ECG_RATE:
            raise ValueError(f"--data.target_rate must be in [1, {ECG_RATE}] Hz, got {target_rate!r}")
        chosen = list(modalities) if modalities is not None else list(MODALITIES)
        if len(chosen) < 2 or any(m not in MODALITIES for m in chosen) or len(set(chosen)) != len(chosen):
            raise ValueError(f"--data.modalities must be two or three distinct of {list(MODALITIES)}, got "
                             f"{modalities!r}")
        objective = objective or ("symile" if len(chosen) == 3 else "clip")
        if objective not in ("symile", "clip") or (objective == "symile" and len(chosen) != 3):
            raise ValueError(f"--data.objective must be symile (three modalities) or clip, got {objective!r} for "
                             f"{len(chosen)} modalities")
        if candidates < 2:
            raise ValueError(f"--data.candidates must be >= 2, got {candidates!r}")
        self.root, self.image_size, self.target_rate = root, image_size, target_rate
        self.modalities = [m for m in MODALITIES if m in chosen]
        self.objective, self.candidates, self.fraction = objective, candidates, fraction
        self.name = "symile_mimic"

    def load(self) -> Samples:
        root = Path(self.root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"--data.root {root}: no such folder (Symile-MIMIC 1.0.0 from PhysioNet, with "
                                    f"train.csv, val.csv, test.csv and data_npy/)")
        stamp = tuple((str(p), p.stat().st_mtime_ns) for p in sorted([*root.glob("*.csv"), *root.glob("data_npy/*/*")]))
        chosen = tuple(self.modalities)
        key = (str(root.resolve()), self.image_size, self.target_rate, chosen, stamp)
        if key not in _CACHE:
            _CACHE.clear()
            _CACHE[key] = {s: read_split(root, s, self.image_size, self.target_rate, chosen) for s in SPLITS}
        parts = _CACHE[key]
        every = {k: np.concatenate([parts[s][k] for s in SPLITS]) for k in parts["train"]}
        admissions = every["hadm"]
        if len(np.unique(admissions)) != len(admissions):
            raise ValueError(f"{root}: an admission (hadm_id) is in more than one of train.csv, val.csv, test.csv")
        names = [f"{LABS[i]} ({i}) percentile" for i in LAB_ORDER] + [f"{LABS[i]} ({i}) measured" for i in LAB_ORDER]
        return Samples(
            inputs={m: every[m] for m in self.modalities},
            labels=every["labels"], num_classes=2, task="retrieval", modality="multimodal",
            groups={"patient": group_ids([str(s) for s in every["subject"]]),
                    "admission": group_ids([str(h) for h in admissions])},
            source_split=np.concatenate([np.full(len(parts[s]["hadm"]), s) for s in SPLITS]),
            label_names=["finding", "no finding"],
            meta={"dataset": self.name,
                  "retrieval": {"objective": self.objective, "target": self.modalities[0],
                                "candidates": self.candidates},
                  "signal": {"sampling_rate": self.target_rate}, "tabular": {"feature_names": names}},
        )
