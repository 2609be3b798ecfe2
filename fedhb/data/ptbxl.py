"""PTB-XL 12-lead ECGs (Wagner et al., Scientific Data 2020; PhysioNet ``ptb-xl`` 1.0.3), read from its published
layout: ``ptbxl_database.csv``, ``scp_statements.csv`` and WFDB records under ``records500/`` (500 Hz) or
``records100/`` (100 Hz).

Labels are the five diagnostic superclasses NORM, MI, STTC, CD, HYP (ids 0-4, FHBench's order) taken from
``scp_statements.csv``'s ``diagnostic_class``: a record's label is the superclass of its diagnostic SCP code with the
highest likelihood (the first such code on a tie); records without a diagnostic code are left out. With
``multi_label: true`` the label is instead the multi-hot set of every superclass among the record's diagnostic codes
(the PTB-XL benchmark's setting, Strodthoff et al. 2021). Patient ids come from ``patient_id``; PTB-XL's recommended
``strat_fold`` becomes the source split (folds 1-8 train, 9 val, 10 test).

Segments follow FHBench (arXiv 2504.10817): the 500 Hz records resampled to 250 Hz and cut into 1-second windows,
ten per record, each ``(12, 250)``. Deliberate differences from FHBench's released preprocessing: resampling is
polyphase (anti-aliased) instead of linear interpolation; there is no per-record standardisation (the MOMENT encoder
normalises every segment and channel itself); every record keeps its own label, where FHBench took the highest
likelihood code over *all* SCP codes, dropped a patient whose top code was not diagnostic and dropped patients whose
records disagree.
"""

from __future__ import annotations

import ast
import csv
from pathlib import Path

import numpy as np

from fedhb.data._signal_io import resample, segment
from fedhb.data.base import FederatedDataset, Samples

SUPERCLASSES = ("NORM", "MI", "STTC", "CD", "HYP")
LEADS = ("I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6")
DATABASE = "ptbxl_database.csv"
STATEMENTS = "scp_statements.csv"
_DB_COLUMNS = ("ecg_id", "patient_id", "scp_codes", "strat_fold", "filename_lr", "filename_hr")
_DOWNLOAD = "https://physionet.org/content/ptb-xl/1.0.3/"


def _read_csv(path: Path, required: tuple[str, ...]) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise FileNotFoundError(f"PTB-XL file not found: {path}. Download PTB-XL from {_DOWNLOAD} and pass its folder "
                                f"as --data.root (it holds {DATABASE}, {STATEMENTS}, records100/ and records500/).")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; found {reader.fieldnames}. Replace it with the "
                             f"original file from {_DOWNLOAD}")
        return list(reader.fieldnames or []), list(reader)


def diagnostic_classes(root: str | Path) -> dict[str, str]:
    """``{scp code: superclass}`` for every diagnostic statement in ``scp_statements.csv``."""
    path = Path(root) / STATEMENTS
    columns, rows = _read_csv(path, ("diagnostic", "diagnostic_class"))
    code_column = columns[0]  # unnamed in the published file: the SCP code of each statement
    out = {}
    for line, row in enumerate(rows, start=2):
        if row["diagnostic"].strip() not in ("", "0", "0.0"):
            cls = row["diagnostic_class"].strip()
            if cls not in SUPERCLASSES:
                raise ValueError(f"{path}:{line}: diagnostic code {row[code_column]!r} has diagnostic_class {cls!r}, "
                                 f"expected one of {list(SUPERCLASSES)}")
            out[row[code_column].strip()] = cls
    if not out:
        raise ValueError(f"{path}: no diagnostic statements (column 'diagnostic' is empty everywhere)")
    return out


def record_label(codes: dict[str, float], classes: dict[str, str], multi_label: bool) -> np.ndarray | int | None:
    """The label of one record from its ``scp_codes``; ``None`` when it has no diagnostic code."""
    diagnostic = [(code, float(likelihood)) for code, likelihood in codes.items() if code in classes]
    if not diagnostic:
        return None
    if multi_label:
        hot = np.zeros(len(SUPERCLASSES), dtype=np.int64)
        for code, _ in diagnostic:
            hot[SUPERCLASSES.index(classes[code])] = 1
        return hot
    best = max(diagnostic, key=lambda item: item[1])  # max keeps the first of equal likelihoods
    return SUPERCLASSES.index(classes[best[0]])


def read_record(path: Path, rate: int) -> np.ndarray:
    """One WFDB record as ``(12, T)`` float32 in mV, checked for its leads and rate."""
    import wfdb

    if not path.with_suffix(".hea").is_file():
        raise FileNotFoundError(f"{path.with_suffix('.hea')} not found (a record listed in {DATABASE}); "
                                f"the download is incomplete, fetch it again from {_DOWNLOAD}")
    try:
        signal, fields = wfdb.rdsamp(str(path))
    except Exception as err:  # noqa: BLE001 - wfdb raises many types for a damaged record
        raise ValueError(f"{path} (.hea/.dat): not a readable WFDB record ({type(err).__name__}: {err})") from err
    if int(round(fields["fs"])) != rate:
        raise ValueError(f"{path}: sampled at {fields['fs']} Hz, expected {rate} Hz for records{rate}/")
    names = tuple(str(n).upper() for n in fields["sig_name"])
    if names != LEADS:
        raise ValueError(f"{path}: leads {list(fields['sig_name'])}, expected the 12 standard leads {list(LEADS)}")
    if not np.isfinite(signal).all():
        raise ValueError(f"{path}: holds NaN or infinite samples")
    return np.ascontiguousarray(signal.T, dtype=np.float32)


class PTBXL(FederatedDataset):
    """PTB-XL, segmented into fixed-length multichannel windows, grouped by patient."""

    default_group_by = "patient"
    name = "ptbxl"

    def __init__(
        self,
        root: str = "data/ptbxl",
        sampling_rate: int = 500,
        target_rate: int = 250,
        segment_seconds: float = 1.0,
        multi_label: bool = False,
        folds: list[int] | None = None,
        fraction: float = 1.0,
    ) -> None:
        """
        Args:
            root: PTB-XL's folder (``ptbxl_database.csv``, ``scp_statements.csv``, ``records100/``, ``records500/``).
            sampling_rate: Which records to read: 500 (``records500/``, ``filename_hr``) or 100 (``records100/``).
            target_rate: Rate of the segments in Hz (FHBench: 250).
            segment_seconds: Length of each non-overlapping segment (FHBench: 1 s, ten per record).
            multi_label: Multi-hot superclasses instead of the single most likely one.
            folds: ``strat_fold`` values to keep (default all ten).
            fraction: Fraction of the segments to keep (stratified, seeded; FHBench uses 0.2).
        """
        if sampling_rate not in (100, 500):
            raise ValueError(f"--data.sampling_rate must be 100 or 500 (records100/ or records500/), "
                             f"got {sampling_rate}")
        if target_rate <= 0 or segment_seconds <= 0 or int(round(target_rate * segment_seconds)) < 8:
            raise ValueError(f"--data.target_rate ({target_rate}) times --data.segment_seconds ({segment_seconds}) "
                             f"must give segments of at least 8 samples")
        if folds is not None and (not folds or any(f not in range(1, 11) for f in folds)):
            raise ValueError(f"--data.folds must be a non-empty list of strat_fold values 1-10, got {folds!r}")
        if not 0 < fraction <= 1:
            raise ValueError(f"--data.fraction must be in (0, 1], got {fraction!r}")
        self.root, self.sampling_rate, self.target_rate = root, sampling_rate, target_rate
        self.segment_seconds, self.multi_label = segment_seconds, multi_label
        self.folds, self.fraction = folds, fraction

    def load(self) -> Samples:
        root = Path(self.root)
        classes = diagnostic_classes(root)
        db_path = root / DATABASE
        _, rows = _read_csv(db_path, _DB_COLUMNS)
        column = "filename_hr" if self.sampling_rate == 500 else "filename_lr"
        length = int(round(self.target_rate * self.segment_seconds))
        inputs, labels, patients, records, splits = [], [], [], [], []
        for line, row in enumerate(rows, start=2):
            where = f"{db_path}:{line}"
            try:
                fold = int(float(row["strat_fold"]))
                patient = int(float(row["patient_id"]))
                ecg_id = int(float(row["ecg_id"]))
                codes = ast.literal_eval(row["scp_codes"])
            except (ValueError, SyntaxError, TypeError) as err:
                raise ValueError(f"{where}: malformed row (ecg_id, patient_id, strat_fold must be numbers and "
                                 f"scp_codes a dict such as {{'NORM': 100.0}}): {err}") from err
            if not isinstance(codes, dict):
                raise ValueError(f"{where}: scp_codes must be a dict such as {{'NORM': 100.0}}, "
                                 f"got {row['scp_codes']!r}")
            if self.folds is not None and fold not in self.folds:
                continue
            label = record_label(codes, classes, self.multi_label)
            if label is None:
                continue
            signal = read_record(root / row[column], self.sampling_rate)
            windows = segment(resample(signal, self.sampling_rate, self.target_rate), length)
            inputs.append(windows)
            labels.extend([label] * len(windows))
            patients.extend([patient] * len(windows))
            records.extend([ecg_id] * len(windows))
            split = "train" if fold <= 8 else ("val" if fold == 9 else "test")
            splits.extend([split] * len(windows))
        if not inputs:
            raise ValueError(f"{db_path}: no record with a diagnostic SCP code in the selected folds")
        return Samples(
            inputs=np.concatenate(inputs).astype(np.float32, copy=False),
            labels=np.asarray(labels, dtype=np.int64),
            num_classes=len(SUPERCLASSES),
            task="multi-label" if self.multi_label else "multi-class",
            modality="signal",
            groups={"patient": np.asarray(patients, dtype=np.int64), "record": np.asarray(records, dtype=np.int64)},
            source_split=np.asarray(splits),
            label_names=list(SUPERCLASSES),
            meta={"sample_rate": self.target_rate, "channels": list(LEADS)},
        )
