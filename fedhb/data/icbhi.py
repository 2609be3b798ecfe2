"""ICBHI 2017 Respiratory Sound Database (Rocha et al., Physiological Measurement 2019), read from its published
layout: ``ICBHI_final_database/`` with one ``.wav`` and one ``.txt`` per recording, 920 recordings of 126 patients.

A recording is named ``{patient}_{index}_{location}_{mode}_{equipment}.wav`` (e.g. ``101_1b1_Al_sc_Meditron.wav``);
its ``.txt`` has one breathing cycle per line, ``start end crackles wheezes`` (seconds, then 0/1 flags). Each cycle
becomes one sample with 4 classes: normal 0, crackle 1, wheeze 2, both 3. The optional
``ICBHI_challenge_train_test.txt`` (``name<TAB>train|test``) gives the official split as the source split.

Clips follow FHBench (arXiv 2504.10817): each cycle resampled to 16 kHz, faded in and out over 1/16 s, cut to 8 s or
repeated to fill 8 s and faded out (``pad: circular``; ``zero`` centres it in silence instead). Cycle ends past the
end of a recording are clipped to it (a few published annotations overrun by a fraction of a second).
"""

from __future__ import annotations

import re
from pathlib import Path

from fedhb.data._signal_io import ClipCollector, read_wav
from fedhb.data.base import FederatedDataset, Samples

CLASSES = ("normal", "crackle", "wheeze", "both")
FOLDER = "ICBHI_final_database"
SPLIT_FILE = "ICBHI_challenge_train_test.txt"
NAME = re.compile(r"^(\d+)_([0-9A-Za-z]+)_([A-Za-z]+)_(sc|mc)_([A-Za-z0-9]+)$")
_DOWNLOAD = "https://bhichallenge.med.auth.gr/ICBHI_2017_Challenge"


def read_cycles(path: Path) -> list[tuple[float, float, int]]:
    """``(start, end, class id)`` of every cycle in one annotation ``.txt``; errors name the file and line."""
    out = []
    for line, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        fields = text.split()
        try:
            if len(fields) != 4:
                raise ValueError(f"{len(fields)} fields")
            start, end = float(fields[0]), float(fields[1])
            crackles, wheezes = int(fields[2]), int(fields[3])
            if crackles not in (0, 1) or wheezes not in (0, 1):
                raise ValueError("the crackle and wheeze flags must be 0 or 1")
            if not 0 <= start < end:
                raise ValueError("start must be >= 0 and before end")
        except ValueError as err:
            raise ValueError(f"{path}:{line}: expected 'start end crackles wheezes' (seconds, seconds, 0/1, 0/1), "
                             f"got {text!r} ({err})") from err
        out.append((start, end, crackles + 2 * wheezes))
    return out


def read_official_split(folder: Path) -> dict[str, str]:
    """``{recording name: train|test}`` from ``ICBHI_challenge_train_test.txt`` in the folder or its parent."""
    for path in (folder / SPLIT_FILE, folder.parent / SPLIT_FILE):
        if path.is_file():
            split = {}
            for line, text in enumerate(path.read_text().splitlines(), start=1):
                if not text.strip():
                    continue
                fields = text.split()
                if len(fields) != 2 or fields[1] not in ("train", "test"):
                    raise ValueError(f"{path}:{line}: expected '<recording name> train|test', got {text!r}")
                split[fields[0]] = fields[1]
            return split
    return {}


class ICBHI(FederatedDataset):
    """ICBHI 2017 breathing cycles as fixed-length mono clips, grouped by patient."""

    default_group_by = "patient"
    name = "icbhi"

    def __init__(
        self,
        root: str = "data/icbhi",
        sample_rate: int = 16000,
        duration: float = 8.0,
        pad: str = "circular",
        fraction: float = 1.0,
    ) -> None:
        """
        Args:
            root: ``ICBHI_final_database/`` itself, or the folder that holds it.
            sample_rate: Rate of the clips in Hz (wav2vec2's 16 kHz; the encoder resamples if it differs).
            duration: Clip length in seconds (FHBench: 8).
            pad: How short cycles fill the clip: ``circular`` (repeat, FHBench) or ``zero``.
            fraction: Fraction of the cycles to keep (stratified, seeded; FHBench uses 0.3).
        """
        if sample_rate <= 0 or duration <= 0:
            raise ValueError(f"--data.sample_rate and --data.duration must be > 0, got {sample_rate} and {duration}")
        if pad not in ("circular", "zero"):
            raise ValueError(f"--data.pad must be circular or zero, got {pad!r}")
        if not 0 < fraction <= 1:
            raise ValueError(f"--data.fraction must be in (0, 1], got {fraction!r}")
        self.root, self.sample_rate, self.duration, self.pad, self.fraction = root, sample_rate, duration, pad, fraction

    @property
    def folder(self) -> Path:
        root = Path(self.root)
        return root / FOLDER if (root / FOLDER).is_dir() else root

    def load(self) -> Samples:
        folder = self.folder
        wavs = sorted(folder.glob("*.wav")) if folder.is_dir() else []
        if not wavs:
            raise FileNotFoundError(f"no ICBHI recordings (*.wav) in {folder}. Download the ICBHI 2017 database from "
                                    f"{_DOWNLOAD} and pass the folder that holds {FOLDER}/ as --data.root")
        official = read_official_split(folder)
        clips = ClipCollector(self.sample_rate, self.duration, self.pad, CLASSES)
        for number, wav in enumerate(wavs):
            match = NAME.match(wav.stem)
            if match is None:
                raise ValueError(f"{wav}: not an ICBHI recording name; expected "
                                 f"patient_index_location_sc|mc_equipment.wav such as 101_1b1_Al_sc_Meditron.wav")
            annotation = wav.with_suffix(".txt")
            if not annotation.is_file():
                raise FileNotFoundError(f"{annotation} not found: every ICBHI recording has its cycle annotation")
            cycles = read_cycles(annotation)
            audio, rate = read_wav(wav)
            seconds = len(audio) / rate
            for start, end, label in cycles:
                if start >= seconds:
                    raise ValueError(f"{annotation}: a cycle starts at {start} s but {wav.name} lasts {seconds:.3f} s")
                clips.add(audio, rate, start, end, label, int(match.group(1)), number, official.get(wav.stem, "all"))
        return clips.samples(f"{folder}: the annotation files list no breathing cycle")
