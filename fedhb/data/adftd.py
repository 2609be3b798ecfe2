"""ADFTD: resting-state EEG of Alzheimer's disease, frontotemporal dementia and healthy subjects (Miltiadous et
al., Data 2023; OpenNeuro ds004504), read from its published BIDS layout.

``{root}/participants.tsv`` gives each subject's ``Group`` (A: Alzheimer's, F: frontotemporal dementia, C: healthy;
88 subjects); the recordings are EEGLAB files, 19 channels (10-20 system) at 500 Hz, preprocessed under
``{root}/derivatives/sub-XXX/eeg/sub-XXX_task-eyesclosed_eeg.set`` (``use_derivatives: true``, what FHBench used)
and raw under ``{root}/sub-XXX/eeg/``. EEGLAB ``.set`` files are MATLAB v5 files; the samples sit either inside
(``data`` is a matrix) or in a float32 ``.fdt`` file beside it (``data`` names the file). fedhb reads both with
``scipy.io.loadmat`` (mne is not needed).

Segments follow FHBench (arXiv 2504.10817): each recording resampled to 256 Hz and cut into non-overlapping
1-second windows ``(19, 256)``, labelled with the subject's group (ids: C 0, F 1, A 2, FHBench's order). Deliberate
differences from FHBench's released preprocessing: polyphase (anti-aliased) resampling instead of linear
interpolation, and windows start at the first sample (FHBench aligned them to the recording's midpoint).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from fedhb.data._signal_io import resample, segment
from fedhb.data.base import FederatedDataset, Samples

GROUPS = ("C", "F", "A")
GROUP_NAMES = ("healthy control", "frontotemporal dementia", "Alzheimer's disease")
CHANNELS = ("Fp1", "Fp2", "F3", "F4", "C3", "C4", "P3", "P4", "O1", "O2", "F7", "F8", "T3", "T4", "T5", "T6", "Fz",
            "Cz", "Pz")
_DOWNLOAD = "https://openneuro.org/datasets/ds004504"


def _field(eeg: Any, name: str, path: Path) -> Any:
    value = eeg.get(name) if isinstance(eeg, dict) else getattr(eeg, name, None)
    if value is None:
        raise ValueError(f"{path}: EEGLAB field {name!r} is missing; is this an EEGLAB .set file?")
    return value


def read_eeglab(path: str | Path) -> tuple[np.ndarray, float, list[str]]:
    """A continuous EEGLAB recording: ``(channels, samples)`` float32, the sampling rate and the channel labels.

    Reads the MATLAB-v5 ``.set`` with ``scipy.io.loadmat`` (both layouts: one ``EEG`` struct, or its fields as
    top-level variables) and, when ``data`` names a file, the float32 ``.fdt`` beside it (column-major
    ``channels x samples``).
    """
    from scipy.io import loadmat

    path = Path(path)
    try:
        mat = loadmat(str(path), squeeze_me=True, struct_as_record=False, appendmat=False)
    except NotImplementedError as err:  # scipy says this for MATLAB v7.3 (HDF5) files
        raise ValueError(f"{path}: saved as MATLAB v7.3 (HDF5); re-save it in EEGLAB as a v6/v7 .set") from err
    except (ValueError, OSError, TypeError) as err:
        raise ValueError(f"{path}: not a readable EEGLAB .set file ({err})") from err
    eeg: Any = mat["EEG"] if "EEG" in mat else {k: v for k, v in mat.items() if not k.startswith("__")}
    channels = int(_field(eeg, "nbchan", path))
    samples = int(_field(eeg, "pnts", path))
    trials = int(_field(eeg, "trials", path))
    rate = float(_field(eeg, "srate", path))
    if trials != 1:
        raise ValueError(f"{path}: holds {trials} epochs; ADFTD's recordings are continuous (trials = 1)")
    data = _field(eeg, "data", path)
    if isinstance(data, str):
        fdt = path.parent / data
        if not fdt.is_file():
            raise FileNotFoundError(f"{fdt} not found: {path.name} keeps its samples there")
        raw = np.fromfile(fdt, dtype="<f4")
        if raw.size != channels * samples:
            raise ValueError(f"{fdt}: holds {raw.size} float32 values, expected nbchan x pnts = {channels} x "
                             f"{samples} = {channels * samples}; the file is truncated or does not belong to "
                             f"{path.name}")
        signal = raw.reshape(samples, channels).T
    else:
        signal = np.asarray(data, dtype=np.float32)
        if signal.shape != (channels, samples):
            raise ValueError(f"{path}: data has shape {signal.shape}, expected (nbchan, pnts) = "
                             f"({channels}, {samples})")
    locs = eeg.get("chanlocs") if isinstance(eeg, dict) else getattr(eeg, "chanlocs", None)
    locs = np.atleast_1d(locs) if locs is not None else []
    labels = [str(getattr(loc, "labels", "")) for loc in locs]
    return np.ascontiguousarray(signal, dtype=np.float32), rate, labels


def read_participants(path: Path) -> list[tuple[str, int]]:
    """``(participant_id, group id)`` of every subject in ``participants.tsv``."""
    if not path.is_file():
        raise FileNotFoundError(f"ADFTD file not found: {path}. Download OpenNeuro ds004504 ({_DOWNLOAD}) and pass "
                                f"its folder as --data.root")
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = [c for c in ("participant_id", "Group") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; found {reader.fieldnames} (tab-separated BIDS file)")
        out = []
        for line, row in enumerate(reader, start=2):
            group = (row["Group"] or "").strip()
            if group not in GROUPS:
                raise ValueError(f"{path}:{line}: Group {group!r} for {row['participant_id']}, expected A, F or C")
            out.append((row["participant_id"].strip(), GROUPS.index(group)))
    if not out:
        raise ValueError(f"{path}: lists no participant")
    return out


class ADFTD(FederatedDataset):
    """ADFTD EEG, one-second windows of 19 channels, grouped by subject (``patient``)."""

    default_group_by = "patient"
    name = "adftd"

    def __init__(
        self,
        root: str = "data/ds004504",
        use_derivatives: bool = True,
        task: str = "eyesclosed",
        target_rate: int = 256,
        segment_seconds: float = 1.0,
        fraction: float = 1.0,
    ) -> None:
        """
        Args:
            root: The ds004504 folder (``participants.tsv``, ``sub-XXX/``, ``derivatives/``).
            use_derivatives: Read the preprocessed recordings under ``derivatives/`` (FHBench) or the raw ones.
            task: BIDS task label of the recordings (ds004504 has ``eyesclosed``).
            target_rate: Rate of the segments in Hz (FHBench: 256).
            segment_seconds: Length of each non-overlapping segment (FHBench: 1 s).
            fraction: Fraction of the segments to keep (stratified, seeded; FHBench uses 0.2).
        """
        if target_rate <= 0 or segment_seconds <= 0 or int(round(target_rate * segment_seconds)) < 8:
            raise ValueError(f"--data.target_rate ({target_rate}) times --data.segment_seconds ({segment_seconds}) "
                             f"must give segments of at least 8 samples")
        if not 0 < fraction <= 1:
            raise ValueError(f"--data.fraction must be in (0, 1], got {fraction!r}")
        self.root, self.use_derivatives, self.task = root, use_derivatives, task
        self.target_rate, self.segment_seconds, self.fraction = target_rate, segment_seconds, fraction

    def recording(self, participant: str) -> Path:
        base = Path(self.root) / "derivatives" if self.use_derivatives else Path(self.root)
        return base / participant / "eeg" / f"{participant}_task-{self.task}_eeg.set"

    def load(self) -> Samples:
        root = Path(self.root)
        participants = read_participants(root / "participants.tsv")
        length = int(round(self.target_rate * self.segment_seconds))
        inputs, labels, patients = [], [], []
        reference: list[str] | None = None
        for number, (participant, group) in enumerate(participants):
            path = self.recording(participant)
            if not path.is_file():
                raise FileNotFoundError(f"ADFTD recording not found: {path} ({participant} is in participants.tsv); "
                                        f"the download is incomplete, fetch ds004504 again from {_DOWNLOAD}")
            signal, rate, names = read_eeglab(path)
            if reference is None:
                reference = names
            if len(signal) != len(reference) or (names and reference and names != reference):
                raise ValueError(f"{path}: channels {names or len(signal)} differ from the first recording's "
                                 f"{reference}; every recording must have the same montage")
            windows = segment(resample(signal, rate, self.target_rate), length)
            if len(windows) == 0:
                raise ValueError(f"{path}: shorter than one {self.segment_seconds}-second segment")
            inputs.append(windows)
            labels.extend([group] * len(windows))
            patients.extend([number] * len(windows))
        return Samples(
            inputs=np.concatenate(inputs).astype(np.float32, copy=False),
            labels=np.asarray(labels, dtype=np.int64),
            num_classes=len(GROUPS),
            task="multi-class",
            modality="signal",
            groups={"patient": np.asarray(patients, dtype=np.int64)},
            label_names=list(GROUP_NAMES),
            meta={"sample_rate": self.target_rate, "channels": reference,
                  "participants": [p for p, _ in participants]},
        )
