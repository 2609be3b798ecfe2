"""SPRSound, the SJTU Paediatric Respiratory Sound Database (Zhang et al., IEEE TBioCAS 2022), read from its published
layout: ``.wav`` recordings with a ``.json`` annotation of the same name, in release folders such as
``train2022_wav/``, ``train2022_json/``, ``test2022_wav/`` and ``test2022_json/{inter,intra}_test_json/``.

A recording is named ``{patient}_{age}_{gender}_{location}_{number}.wav`` (e.g. ``65058931_3.4_1_p2_1086.wav``). Its
JSON holds ``record_annotation`` (Normal, CAS, DAS, CAS & DAS, Poor Quality) and ``event_annotation``: a list of
``{"start": ms, "end": ms, "type": ...}`` (times may be strings). Each event becomes one sample with 7 classes in
FHBench's order: Normal 0, Fine Crackle 1, Wheeze 2, Coarse Crackle 3, Wheeze+Crackle 4, Rhonchi 5, Stridor 6.
Every ``.json`` under ``root`` named like a recording is read (several releases can sit side by side); its
recording is the ``.wav`` of the same name anywhere under ``root``. The source split is the annotation's folder
(``train2022_json``, ...).

Clips follow FHBench (arXiv 2504.10817), as for ICBHI: resampled to 16 kHz, faded in/out over 1/16 s, cut to 8 s or
repeated to fill 8 s.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from fedhb.data._signal_io import ClipCollector, read_wav
from fedhb.data.base import FederatedDataset, Samples

CLASSES = ("Normal", "Fine Crackle", "Wheeze", "Coarse Crackle", "Wheeze+Crackle", "Rhonchi", "Stridor")
NAME = re.compile(r"^(\d+)_([0-9.]+)_([01])_(p\d+)_(\d+)$")
_DOWNLOAD = "https://github.com/SJTU-YONGFU-RESEARCH-GRP/SPRSound"


def read_events(path: Path) -> list[tuple[float, float, int]]:
    """``(start s, end s, class id)`` of every event in one SPRSound JSON; errors name the file and the event."""
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    events = doc.get("event_annotation") if isinstance(doc, dict) else None
    if not isinstance(events, list):
        raise ValueError(f"{path}: expected an object with an 'event_annotation' list of "
                         f"{{'start': ms, 'end': ms, 'type': ...}}, found {type(doc).__name__} "
                         f"{sorted(doc) if isinstance(doc, dict) else ''}")
    out = []
    for k, event in enumerate(events):
        try:
            start, end = float(event["start"]), float(event["end"])
            kind = str(event["type"]).strip()
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: event {k} must have numeric 'start' and 'end' (ms) and a 'type', got "
                             f"{event!r}") from err
        if kind not in CLASSES:
            raise ValueError(f"{path}: event {k} has type {kind!r}, expected one of {list(CLASSES)}")
        if not 0 <= start < end:
            raise ValueError(f"{path}: event {k} runs from {start} ms to {end} ms; start must be >= 0 and before end")
        out.append((start / 1000.0, end / 1000.0, CLASSES.index(kind)))
    return out


class SPRSound(FederatedDataset):
    """SPRSound respiratory events as fixed-length mono clips, grouped by patient."""

    default_group_by = "patient"
    name = "sprsound"

    def __init__(
        self,
        root: str = "data/sprsound",
        sample_rate: int = 16000,
        duration: float = 8.0,
        pad: str = "circular",
        fraction: float = 1.0,
    ) -> None:
        """
        Args:
            root: Folder holding the release folders (``train2022_wav/``, ``train2022_json/``, ...).
            sample_rate: Rate of the clips in Hz (wav2vec2's 16 kHz; the encoder resamples if it differs).
            duration: Clip length in seconds (FHBench: 8).
            pad: How short events fill the clip: ``circular`` (repeat, FHBench) or ``zero``.
            fraction: Fraction of the events to keep (stratified, seeded; FHBench uses 0.3).
        """
        if sample_rate <= 0 or duration <= 0:
            raise ValueError(f"--data.sample_rate and --data.duration must be > 0, got {sample_rate} and {duration}")
        if pad not in ("circular", "zero"):
            raise ValueError(f"--data.pad must be circular or zero, got {pad!r}")
        if not 0 < fraction <= 1:
            raise ValueError(f"--data.fraction must be in (0, 1], got {fraction!r}")
        self.root, self.sample_rate, self.duration, self.pad, self.fraction = root, sample_rate, duration, pad, fraction

    def load(self) -> Samples:
        root = Path(self.root)
        annotations = sorted(root.rglob("*.json")) if root.is_dir() else []
        if not annotations:
            raise FileNotFoundError(f"no SPRSound annotations (*.json) under {root}. Download SPRSound from "
                                    f"{_DOWNLOAD} and pass the folder holding train2022_json/, train2022_wav/, ... "
                                    f"as --data.root")
        wavs: dict[str, list[Path]] = {}
        for wav in root.rglob("*.wav"):
            wavs.setdefault(wav.stem, []).append(wav)
        clips = ClipCollector(self.sample_rate, self.duration, self.pad, CLASSES)
        for number, annotation in enumerate(annotations):
            match = NAME.match(annotation.stem)
            if match is None:
                continue  # not a recording's annotation (release notes, metadata)
            candidates = wavs.get(annotation.stem, [])
            if not candidates:
                raise FileNotFoundError(f"{annotation.stem}.wav not found under {root}; every annotation needs its "
                                        f"recording ({annotation})")
            if len(candidates) > 1:
                raise ValueError(f"{annotation.stem}.wav exists {len(candidates)} times under {root} "
                                 f"({[str(c) for c in candidates]}); point --data.root at one release")
            events = read_events(annotation)
            if not events:
                continue  # a Poor Quality recording has no events
            audio, rate = read_wav(candidates[0])
            seconds = len(audio) / rate
            for start, end, label in events:
                if start >= seconds:
                    raise ValueError(f"{annotation}: an event starts at {start * 1000:.0f} ms but "
                                     f"{candidates[0].name} lasts {seconds * 1000:.0f} ms")
                clips.add(audio, rate, start, end, label, int(match.group(1)), number,
                          str(annotation.parent.relative_to(root)))
        return clips.samples(f"{root}: no respiratory event in any annotation named like a SPRSound recording "
                             f"(patient_age_gender_location_number.json, e.g. 65058931_3.4_1_p2_1086.json)")
