"""Medical Abstracts (Schopf, Braun and Matthes, NLPIR 2022, doi:10.1145/3582768.3582795; arXiv 2211.16285).

14,438 abstracts labelled with one of 5 patient-condition classes, published as two CSV files in
https://github.com/sebischair/Medical-Abstracts-TC-Corpus: ``medical_tc_train.csv`` (11,550) and
``medical_tc_test.csv`` (2,888), each with the header ``condition_label,medical_abstract``, a label in 1..5 and the
abstract (title first) in double quotes. The hub copy ``TimSchopf/medical_abstracts`` has the same columns.

FHBench (arXiv 2504.10817) pools both files, keeps 50% and partitions them; fedhb does the same with
``--data.fraction 0.5``.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

from fedhb.data.base import FederatedDataset, Samples
from fedhb.data.text_common import check_fraction, check_splits, fetch, group_ids

LABELS = ("neoplasms", "digestive system diseases", "nervous system diseases", "cardiovascular diseases",
          "general pathological conditions")
HEADER = ["condition_label", "medical_abstract"]
SPLITS = ("train", "test")
FILES = {"train": "medical_tc_train.csv", "test": "medical_tc_test.csv"}
BASE_URL = "https://raw.githubusercontent.com/sebischair/Medical-Abstracts-TC-Corpus/main/"
HUB_ID = "TimSchopf/medical_abstracts"


def read_medical_abstracts_csv(path: str | Path) -> tuple[list[str], np.ndarray]:
    """The abstracts and 0-based labels of one published CSV file.

    Raises:
        ValueError: naming the file and line of the first malformed record.
    """
    path = Path(path)
    texts: list[str] = []
    labels: list[int] = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or [h.strip().lstrip("\ufeff") for h in header] != HEADER:
                raise ValueError(f"{path}: line 1: expected the header {','.join(HEADER)!r}, found "
                                 f"{','.join(header) if header else 'an empty file'!r}")
            while True:
                line = reader.line_num + 1  # where this record starts; an abstract may span lines
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as err:
                    raise ValueError(f"{path}: line {line}: not valid CSV ({err})") from err
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != 2:
                    raise ValueError(f"{path}: line {line}: expected 2 fields (condition_label, medical_abstract), "
                                     f"found {len(row)}; is a comma inside an unquoted abstract?")
                label, text = row[0].strip(), row[1].strip()
                if not label.isdigit() or not 1 <= int(label) <= len(LABELS):
                    raise ValueError(f"{path}: line {line}: condition_label must be 1..{len(LABELS)}, got {label!r}")
                if not text:
                    raise ValueError(f"{path}: line {line}: the medical_abstract is empty")
                labels.append(int(label) - 1)
                texts.append(text)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}); download the file again") from err
    if not texts:
        raise ValueError(f"{path}: has a header but no abstracts")
    return texts, np.array(labels, dtype=np.int64)


def _write_csv_atomic(path: Path, rows: list[tuple[int, str]]) -> None:
    """Write rows in the published layout: header, unquoted 1-based label, quoted abstract."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n")
    buffer.write(",".join(HEADER) + "\n")
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(buffer.getvalue(), encoding="utf-8")
    os.replace(tmp, path)


def download_medical_abstracts(root: str | Path) -> None:
    """Fetch the published CSV files into ``root``; if GitHub cannot be reached, write them from the hub copy."""
    root = Path(root)
    missing = [s for s in SPLITS if not (root / FILES[s]).is_file()]
    try:
        for split in missing:
            fetch(BASE_URL + FILES[split], root / FILES[split], f"trying the hub copy {HUB_ID}")
        return
    except FileNotFoundError as github_error:
        try:
            from datasets import load_dataset

            hub = load_dataset(HUB_ID)
        except Exception as hub_error:  # noqa: BLE001 - any hub failure ends in the same instruction
            raise FileNotFoundError(
                f"could not download Medical Abstracts: {github_error}; the hub copy {HUB_ID} failed too "
                f"({type(hub_error).__name__}: {hub_error}). Download {', '.join(FILES.values())} from "
                f"https://github.com/sebischair/Medical-Abstracts-TC-Corpus into --data.root"
            ) from hub_error
    for split in SPLITS:
        if (root / FILES[split]).is_file():
            continue
        rows = [(int(r["condition_label"]), str(r["medical_abstract"])) for r in hub[split]]
        _write_csv_atomic(root / FILES[split], rows)


class MedicalAbstracts(FederatedDataset):
    """Medical Abstracts: 5-class condition classification of PubMed abstracts.

    Samples are pooled over the official files named in ``splits`` (both by default, as FHBench does). The group key
    ``abstract`` gives identical abstract texts one id, so a text that occurs twice never lands on both sides of a
    client's train/test split; it is the default ``--partition.group_by``.
    """

    default_group_by = "abstract"

    def __init__(self, root: str = "data/medical_abstracts", download: bool = False, fraction: float = 1.0,
                 splits: list[str] | None = None) -> None:
        """
        Args:
            root: Folder holding ``medical_tc_train.csv`` and ``medical_tc_test.csv`` (a clone of the GitHub repo).
            download: Fetch missing files from GitHub (or, failing that, from the hub copy through ``datasets``).
            fraction: Fraction of the pooled samples to keep (stratified by label, seeded by ``--seed``).
            splits: Official files pooled before partitioning: ``train`` and/or ``test`` (default both).
        """
        check_fraction(fraction)
        self.splits = check_splits(splits, SPLITS)
        self.root, self.download, self.fraction = root, download, fraction
        self.name = "medical_abstracts"

    def load(self) -> Samples:
        root = Path(self.root)
        missing = [FILES[s] for s in self.splits if not (root / FILES[s]).is_file()]
        if missing and self.download:
            download_medical_abstracts(root)
        elif missing:
            raise FileNotFoundError(
                f"Medical Abstracts files not found in --data.root {root}: {missing}. Pass --data.download true, or "
                f"download them from https://github.com/sebischair/Medical-Abstracts-TC-Corpus (or the hub dataset "
                f"{HUB_ID})."
            )
        texts: list[str] = []
        labels, source = [], []
        for split in self.splits:
            t, y = read_medical_abstracts_csv(root / FILES[split])
            texts += t
            labels.append(y)
            source.append(np.full(len(t), split))
        return Samples(
            inputs=texts, labels=np.concatenate(labels), num_classes=len(LABELS), task="multi-class",
            modality="text", groups={"abstract": group_ids(texts)}, source_split=np.concatenate(source),
            label_names=list(LABELS), meta={"dataset": self.name},
        )
