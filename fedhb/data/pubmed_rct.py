"""PubMed 200k RCT and PubMed 20k RCT (Dernoncourt and Lee, IJCNLP 2017, arXiv 1710.06071).

Sentences of randomized-controlled-trial abstracts, each labelled with its role: BACKGROUND, OBJECTIVE, METHODS,
RESULTS or CONCLUSIONS. The published files (https://github.com/Franck-Dernoncourt/pubmed-rct) are
``{folder}/train.txt``, ``dev.txt`` and ``test.txt`` with ``folder`` one of ``PubMed_20k_RCT``, ``PubMed_200k_RCT``
and their ``_numbers_replaced_with_at_sign`` variants. Each abstract is a ``###<PubMed id>`` line, one
``LABEL<TAB>sentence`` line per sentence, and a blank line. The 200k training file is published compressed
(``train.7z``; ``train.zip`` for the numbers-replaced variant).

Sentences are classified one by one, as FHBench (arXiv 2504.10817) does; the group key ``abstract`` (the default
``--partition.group_by``) keeps all sentences of an abstract on one client and one side of its train/test split, so a
model is never tested on an abstract it trained on. FHBench pools ``train`` and ``test`` of PubMed 200k RCT, keeps
0.5% and lower-cases the text: ``--data.splits [train, test] --data.fraction 0.005 --data.lowercase true``.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Literal

import numpy as np

from fedhb.data.base import FederatedDataset, Samples
from fedhb.data.text_common import check_fraction, check_splits, fetch, group_ids

LABELS = ("BACKGROUND", "OBJECTIVE", "METHODS", "RESULTS", "CONCLUSIONS")
SPLITS = ("train", "dev", "test")
BASE_URL = "https://raw.githubusercontent.com/Franck-Dernoncourt/pubmed-rct/master/"


def pubmed_folder(variant: str, numbers_replaced: bool) -> str:
    return f"PubMed_{variant}_RCT" + ("_numbers_replaced_with_at_sign" if numbers_replaced else "")


def read_pubmed_rct(path: str | Path) -> tuple[list[str], list[int], list[str]]:
    """Sentences, 0-based labels and abstract ids of one published file.

    Raises:
        ValueError: naming the file and line of the first malformed line.
    """
    path = Path(path)
    texts: list[str] = []
    labels: list[int] = []
    abstracts: list[str] = []
    index = {name: i for i, name in enumerate(LABELS)}
    current: str | None = None
    header_line = 0
    open_sentences = 0
    try:
        with open(path, encoding="utf-8") as f:
            for number, raw in enumerate(f, 1):
                line = raw.rstrip("\r\n")
                if line.startswith("###"):
                    if current is not None and open_sentences == 0:
                        raise ValueError(f"{path}: line {header_line}: abstract {current} has no sentences")
                    current = line[3:].strip()
                    if not current:
                        raise ValueError(f"{path}: line {number}: '###' without an abstract id")
                    header_line, open_sentences = number, 0
                elif not line.strip():
                    if current is not None and open_sentences == 0:
                        raise ValueError(f"{path}: line {header_line}: abstract {current} has no sentences")
                    current = None
                else:
                    if current is None:
                        raise ValueError(f"{path}: line {number}: a sentence outside an abstract; each abstract "
                                         f"starts with a '###<abstract id>' line")
                    label, tab, sentence = line.partition("\t")
                    if not tab:
                        raise ValueError(f"{path}: line {number}: expected LABEL<TAB>sentence, found no tab in "
                                         f"{line[:60]!r}")
                    if label not in index:
                        raise ValueError(f"{path}: line {number}: unknown label {label!r}; expected one of "
                                         f"{list(LABELS)}")
                    if not sentence.strip():
                        raise ValueError(f"{path}: line {number}: empty sentence")
                    texts.append(sentence.strip())
                    labels.append(index[label])
                    abstracts.append(current)
                    open_sentences += 1
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}); download the file again") from err
    if current is not None and open_sentences == 0:
        raise ValueError(f"{path}: line {header_line}: abstract {current} has no sentences")
    if not texts:
        raise ValueError(f"{path}: holds no abstracts; expected '###<abstract id>' lines followed by "
                         f"LABEL<TAB>sentence lines")
    return texts, labels, abstracts


def _extract_zip_member(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as z:
        names = [n for n in z.namelist() if n.endswith(dest.name)]
        if not names:
            raise ValueError(f"{archive}: holds no {dest.name} (members: {z.namelist()[:5]})")
        tmp = dest.with_name(f".{dest.name}.part")
        with z.open(names[0]) as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
    os.replace(tmp, dest)


def _extract_7z_member(archive: Path, dest: Path) -> None:
    """Extract ``dest.name`` from a 7-Zip ``archive`` with py7zr (the ``text`` extra; Python has no 7-Zip reader)."""
    try:
        import py7zr
    except ImportError:
        raise FileNotFoundError(
            f"downloaded {archive}, which is 7-Zip compressed: install its reader with `pip install 'fedhb[text]'` "
            f"(py7zr) and run again, or extract it yourself with `7z x {archive} -o{dest.parent}`"
        ) from None
    with py7zr.SevenZipFile(archive) as z:
        names = [n for n in z.getnames() if n.endswith(dest.name)]
        if not names:
            raise ValueError(f"{archive}: holds no {dest.name} (members: {z.getnames()[:5]})")
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".extract-") as tmp:
            z.extract(path=tmp, targets=names[:1])
            os.replace(Path(tmp) / names[0], dest)


def download_pubmed_rct(root: str | Path, variant: str, numbers_replaced: bool, splits: list[str]) -> None:
    """Fetch the published files of ``splits`` that are missing under ``root/{folder}``."""
    folder = pubmed_folder(variant, numbers_replaced)
    target = Path(root) / folder
    hint = f"Download it from https://github.com/Franck-Dernoncourt/pubmed-rct/tree/master/{folder} into {target}"
    for split in splits:
        dest = target / f"{split}.txt"
        if dest.is_file():
            continue
        if variant == "200k" and split == "train":
            suffix = ".zip" if numbers_replaced else ".7z"
            archive = target / f"train{suffix}"
            if not archive.is_file():
                fetch(f"{BASE_URL}{folder}/train{suffix}", archive, hint)
            if suffix == ".zip":
                _extract_zip_member(archive, dest)
            else:
                _extract_7z_member(archive, dest)
            continue
        fetch(f"{BASE_URL}{folder}/{split}.txt", dest, hint)


class PubMedRCT(FederatedDataset):
    """PubMed 200k/20k RCT: 5-class sentence-role classification, sentences grouped by abstract."""

    default_group_by = "abstract"

    def __init__(self, root: str = "data/pubmed_rct", variant: Literal["20k", "200k"] = "20k",
                 numbers_replaced: bool = False, download: bool = False, fraction: float = 1.0,
                 splits: list[str] | None = None, lowercase: bool = False) -> None:
        """
        Args:
            root: Folder laid out like the GitHub repository: ``{root}/PubMed_20k_RCT/train.txt`` etc.
            variant: ``20k`` or ``200k``.
            numbers_replaced: Use the ``_numbers_replaced_with_at_sign`` files (every number is ``@``).
            download: Fetch missing files from GitHub (the 200k training file is an archive; see the module doc).
            fraction: Fraction of the pooled sentences to keep (stratified by label, seeded by ``--seed``).
            splits: Official files pooled before partitioning: ``train``, ``dev`` and/or ``test`` (default all).
            lowercase: Lower-case every sentence (FHBench does, for a cased RoBERTa).
        """
        if variant not in ("20k", "200k"):
            raise ValueError(f"--data.variant must be 20k or 200k, got {variant!r}")
        check_fraction(fraction)
        self.splits = check_splits(splits, SPLITS)
        self.root, self.variant, self.numbers_replaced = root, variant, numbers_replaced
        self.download, self.fraction, self.lowercase = download, fraction, lowercase
        self.name = f"pubmed_{variant}_rct" + ("_at" if numbers_replaced else "")

    @property
    def folder(self) -> Path:
        return Path(self.root) / pubmed_folder(self.variant, self.numbers_replaced)

    def load(self) -> Samples:
        missing = [s for s in self.splits if not (self.folder / f"{s}.txt").is_file()]
        if missing and self.download:
            download_pubmed_rct(self.root, self.variant, self.numbers_replaced, missing)
        elif missing:
            raise FileNotFoundError(
                f"PubMed RCT files not found: {[str(self.folder / f'{s}.txt') for s in missing]}. Pass "
                f"--data.download true, or clone https://github.com/Franck-Dernoncourt/pubmed-rct into --data.root "
                f"(and extract PubMed_200k_RCT/train.7z for the 200k training file)."
            )
        texts: list[str] = []
        labels: list[int] = []
        abstracts: list[str] = []
        source = []
        for split in self.splits:
            t, y, a = read_pubmed_rct(self.folder / f"{split}.txt")
            texts += t
            labels += y
            abstracts += a
            source.append(np.full(len(t), split))
        if self.lowercase:
            texts = [t.lower() for t in texts]
        return Samples(
            inputs=texts, labels=np.array(labels, dtype=np.int64), num_classes=len(LABELS), task="multi-class",
            modality="text", groups={"abstract": group_ids(abstracts)}, source_split=np.concatenate(source),
            label_names=list(LABELS), meta={"dataset": self.name},
        )
