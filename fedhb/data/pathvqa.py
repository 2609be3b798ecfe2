"""PathVQA (He et al., "PathVQA: 30000+ Questions for Medical Visual Question Answering", arXiv 2003.10286): questions
about pathology images, half of them yes/no, read from its published Hugging Face layout
(``flaviagiammarino/path-vqa``).

The release is a folder of parquet files ``data/{train,validation,test}-NNNNN-of-NNNNN[-hash].parquet`` (19,654 /
6,259 / 6,719 questions about 4,998 images), each row with the columns

- ``image``: a struct ``{bytes, path}``, the image file's bytes (JPEG or PNG); an image is repeated in the row of
  every question about it;
- ``question``: the question (``what does this image show?``);
- ``answer``: the answer, lower case (``yes``, ``no``, or an open answer such as ``mesothelioma``).

Download it on a machine with network (``hf download flaviagiammarino/path-vqa --repo-type dataset --local-dir DIR``)
and pass ``--data.root DIR``; fedhb reads the parquet files with pyarrow, keeps each distinct image once (by the hash of
its bytes) and decodes it only when the model prepares its inputs.

``--data.subset`` picks the questions: ``yes_no`` (answer yes or no), ``open`` (any other answer) or ``all``;
``--data.mode`` how they are answered: ``classify`` (yes/no as binary classification, Med-MMFL's protocol, arXiv
2602.04416; only for ``yes_no``) or ``generate`` (the answer decoder writes the answer; the default for ``open`` and
``all``). PathVQA carries no patient ids; questions about the same image are kept together by the group key ``image``
(the default), so no image is seen in training and test.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedhb.data.base import FederatedDataset, Samples
from fedhb.data.text_common import check_fraction, group_ids

SPLITS = ("train", "validation", "test")
COLUMNS = ("image", "question", "answer")
SUBSETS = ("yes_no", "open", "all")
MODES = ("classify", "generate")
#: Labels: the answer (classify) or the kind of question (generate, to stratify on).
CLASSIFY_LABELS = ("no", "yes")
GENERATE_LABELS = ("yes/no", "open")


class VQAInputs:
    """Questions, answers and their images, indexable by sample (what :class:`~fedhb.data.base.Samples` holds).

    Each distinct image is held once, as its file (``bytes`` or a path), and decoded only by :meth:`pixels`, for the
    samples still held after ``--data.fraction`` and the partition. Indexing with an index array selects samples
    without decoding anything. Images given as paths are decoded once into fedhb's on-disk image cache
    (:mod:`fedhb.data.image_cache`) when ``cache`` is given, and memory-mapped from it.

    Args:
        sources: The distinct images: file bytes or paths (``None``: a blank (black) image, for questions without
            one).
        image_index: ``(N,)`` each sample's image, an index into ``sources``.
        questions: Each sample's question text.
        answers: Each sample's answer text.
        names: Where each source came from, for error messages.
        cache: For path sources, :func:`fedhb.data.image_cache.open_cache`'s ``dataset``, ``root`` and
            ``cache_dir``; ``None``: decode into memory.
    """

    def __init__(self, sources: Sequence[bytes | Path | None], image_index: np.ndarray, questions: list[str],
                 answers: list[str], names: Sequence[str], cache: dict[str, Any] | None = None) -> None:
        if not (len(image_index) == len(questions) == len(answers)):
            raise ValueError("VQAInputs: image_index, questions and answers must have one entry per sample")
        self.sources, self.names, self.cache = sources, names, cache
        self.image_index = np.asarray(image_index, dtype=np.int64)
        self.questions, self.answers = questions, answers

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index: Any) -> VQAInputs:
        rows = np.arange(len(self))[index]
        rows = np.atleast_1d(rows)
        return VQAInputs(self.sources, self.image_index[rows], [self.questions[i] for i in rows],
                         [self.answers[i] for i in rows], self.names, self.cache)

    def pixels(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """The distinct images these samples use as ``(M, 3, size, size)`` uint8 RGB (in memory, resized bicubically
        as BLIP's processor does; or memory-mapped from the image cache, resized bilinearly), and each sample's index
        into them."""
        used, index = np.unique(self.image_index, return_inverse=True)
        index = index.reshape(-1).astype(np.int64)
        chosen = [self.sources[s] for s in used]
        if self.cache is not None and all(s is None or isinstance(s, Path) for s in chosen):
            from fedhb.data.image_cache import open_cache

            paths = [s if isinstance(s, Path) else None for s in chosen]
            return open_cache(paths, size, channels=3, **self.cache), index
        out = np.zeros((len(used), 3, size, size), dtype=np.uint8)
        for k, source in enumerate(used):
            out[k] = decode_image(self.sources[source], size, self.names[source])
        return out, index


def decode_image(source: bytes | Path | None, size: int, where: str) -> np.ndarray:
    """One image file (bytes or path; ``None``: black) as ``(3, size, size)`` uint8, resized bicubically."""
    from PIL import Image

    if source is None:
        return np.zeros((3, size, size), dtype=np.uint8)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            rgb = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
            return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1))
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises all three for damaged files
        raise ValueError(f"{where}: not a readable image ({err}); download the dataset again") from err


def parquet_files(root: Path) -> dict[str, list[Path]]:
    """``{split: files}`` of the release folder (``data/<split>-*.parquet``), in name order."""
    folder = root / "data"
    files = {s: sorted(folder.glob(f"{s}-*.parquet")) for s in SPLITS}
    if not any(files.values()):
        raise FileNotFoundError(
            f"--data.root {root}: no data/{{train,validation,test}}-*.parquet files; download PathVQA with `hf "
            f"download flaviagiammarino/path-vqa --repo-type dataset --local-dir DIR` and pass --data.root DIR")
    return files


def read_parquet(path: Path) -> tuple[list[bytes], list[str], list[str]]:
    """Image bytes, questions and answers of one parquet file; a file without one of :data:`COLUMNS` is an error
    naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise ValueError(f"{path}: not a readable parquet file ({err}); download it again") from err
    names = handle.schema_arrow.names
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise ValueError(f"{path}: no {', '.join(repr(c) for c in missing)} column (it has {names}); PathVQA's "
                         f"parquet files have the columns image, question, answer")
    images: list[bytes] = []
    questions: list[str] = []
    answers: list[str] = []
    for batch in handle.iter_batches(columns=list(COLUMNS), batch_size=256):
        column = batch.column("image")
        if not pa.types.is_struct(column.type) or column.type.get_field_index("bytes") < 0:
            raise ValueError(f"{path}: column 'image' is {column.type}, expected a struct with the image file's "
                             f"bytes (Hugging Face's Image feature)")
        raw = column.field("bytes").to_pylist()
        for i, (q, a) in enumerate(zip(batch.column("question").to_pylist(), batch.column("answer").to_pylist())):
            if raw[i] is None or q is None or a is None:
                raise ValueError(f"{path}: row {len(questions)} has no image, question or answer")
            images.append(raw[i])
            questions.append(str(q))
            answers.append(str(a))
    return images, questions, answers


def normalize_answer(answer: str) -> str:
    """Lower case, single spaces (PathVQA's answers are lower case already)."""
    return re.sub(r"\s+", " ", answer.strip().lower())


def vqa_labels(answers: list[str], mode: str) -> np.ndarray:
    """``classify``: 1 for yes, 0 for no; ``generate``: 0 for a yes/no answer, 1 for an open one."""
    closed = np.array([a in ("yes", "no") for a in answers])
    if mode == "classify":
        return np.array([a == "yes" for a in answers], dtype=np.int64)
    return (~closed).astype(np.int64)


def check_vqa_options(subset: str, mode: str | None, answer_length: int) -> str:
    """Validated ``(subset, mode)``: the mode, defaulted from the subset."""
    if subset not in SUBSETS:
        raise ValueError(f"--data.subset must be one of {', '.join(SUBSETS)}, got {subset!r}")
    mode = mode if mode is not None else ("classify" if subset == "yes_no" else "generate")
    if mode not in MODES:
        raise ValueError(f"--data.mode must be classify or generate, got {mode!r}")
    if mode == "classify" and subset != "yes_no":
        raise ValueError(f"--data.mode classify answers yes/no questions only: set --data.subset yes_no, or "
                         f"--data.mode generate for --data.subset {subset}")
    if answer_length < 3:
        raise ValueError(f"--data.answer_length must be >= 3 (start, one token, end), got {answer_length}")
    return mode


class PathVQA(FederatedDataset):
    """PathVQA questions about pathology images: yes/no classification or generated answers."""

    default_group_by = "image"  # no patient ids: an image's questions stay together

    def __init__(self, root: str, subset: str = "yes_no", mode: str | None = None, answer_length: int = 16,
                 fraction: float = 1.0) -> None:
        """
        Args:
            root: The release folder (holding ``data/*.parquet``).
            subset: ``yes_no``, ``open`` or ``all`` questions.
            mode: ``classify`` (yes/no only) or ``generate``; default: classify for ``yes_no``, generate otherwise.
            answer_length: Answer tokens the decoder is trained on and generates (start and end included); longer
                answers are truncated.
            fraction: Fraction of the questions to keep (stratified by label, seeded by ``--seed``).
        """
        check_fraction(fraction)
        self.mode = check_vqa_options(subset, mode, answer_length)
        self.root, self.subset, self.answer_length, self.fraction = root, subset, answer_length, fraction
        self.name = "pathvqa"

    def load(self) -> Samples:
        root = Path(self.root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"--data.root {root} is not a folder; point it at the PathVQA release (the folder "
                                    f"holding data/*.parquet)")
        sources: list[bytes] = []
        names: list[str] = []
        seen: dict[bytes, int] = {}
        image_index: list[int] = []
        questions: list[str] = []
        answers: list[str] = []
        splits: list[str] = []
        for split, files in parquet_files(root).items():
            for path in files:
                images, qs, ans = read_parquet(path)
                for row, (image, q, a) in enumerate(zip(images, qs, ans)):
                    a = normalize_answer(a)
                    closed = a in ("yes", "no")
                    if (self.subset == "yes_no" and not closed) or (self.subset == "open" and closed):
                        continue
                    digest = hashlib.sha1(image).digest()
                    if digest not in seen:
                        seen[digest] = len(sources)
                        sources.append(image)
                        names.append(f"{path} row {row}")
                    image_index.append(seen[digest])
                    questions.append(q)
                    answers.append(a)
                    splits.append(split)
        if not questions:
            raise ValueError(f"--data.root {root}: no {self.subset} questions in the parquet files")
        index = np.array(image_index, dtype=np.int64)
        labels = vqa_labels(answers, self.mode)
        label_names = list(CLASSIFY_LABELS if self.mode == "classify" else GENERATE_LABELS)
        return Samples(
            inputs=VQAInputs(sources, index, questions, answers, names), labels=labels, num_classes=2, task="vqa",
            modality="image", groups={"image": group_ids([str(i) for i in index])},
            source_split=np.array(splits), label_names=label_names,
            meta={"dataset": self.name, "vqa_mode": self.mode, "answer_length": self.answer_length,
                  "subset": self.subset},
        )
