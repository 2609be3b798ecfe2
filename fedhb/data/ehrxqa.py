"""EHRXQA (Bae et al., "EHRXQA: A Multi-Modal Question Answering Dataset for Electronic Health Records with Chest X-ray
Images", NeurIPS 2023 Datasets and Benchmarks, arXiv 2310.18652): questions over MIMIC-CXR chest X-rays and MIMIC-IV
tables, read in its PhysioNet layout (EHRXQA 1.0; credentialed access to EHRXQA, MIMIC-CXR-JPG and MIMIC-IV needed).

The release folder (``--data.root``) holds

- ``dataset/{train,valid,test}.json`` (also accepted under ``dataset/mimic_iv_cxr/``): a list of questions, each a
  dict with ``db_id``, ``split``, ``id``, ``question``, ``template``, ``query`` (NeuralSQL: image questions call
  ``func_vqa("...", t1.study_id)``), ``value`` (the sampled values, e.g. ``{"study_id": 56222792}`` or
  ``{"patient_id": 18679317}``), the tags, ``is_impossible`` and ``answer`` (the executed query's result, a list:
  ``[true]``, ``["left lung", "right lung"]``, ``[3]``, ``[]``);
- ``database/mimic_iv_cxr/{train,test}/``: the integrated database's tables as CSV (``tb_cxr.csv``: ``row_id,
  subject_id, hadm_id, study_id, image_id, viewposition, studydatetime``, one image per study; ``admissions.csv``,
  ...). The valid split uses the train database, as EHRXQA's answer script does.

The images (``--data.images``, the MIMIC-CXR-JPG folder holding ``files/``) are read from
``files/p<first 2 digits of subject>/p<subject>/s<study>/<image_id>.jpg``, decoded once into fedhb's on-disk image
cache (``--data.cache_dir``, :mod:`fedhb.data.image_cache`) at the ViT's input size and memory-mapped from it.

A sample is image + question (+ EHR text) -> answer. ``--data.questions study`` (the default) keeps the image questions
about one study (``value`` names a ``study_id``): the questions BLIP can answer from one image. ``all`` keeps every
question; those naming no study get a blank (black) image and rely on the question and EHR text.
``--data.ehr_tables`` appends the patient's rows of those tables (at most ``--data.ehr_rows`` each) to the question as
``context: <table>: <column> <value> ...``. Answers become text: ``true``/``false`` -> yes/no, values joined by
``, ``; impossible questions and empty answers are skipped. The group key ``patient`` (the study's ``subject_id``,
else ``value.patient_id``) keeps a patient's questions on one client and one side of each split.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedhb.data.base import FederatedDataset, Samples
from fedhb.data.pathvqa import CLASSIFY_LABELS, GENERATE_LABELS, VQAInputs, check_vqa_options, vqa_labels
from fedhb.data.text_common import check_fraction, group_ids

SPLITS = ("train", "valid", "test")
#: The database each split's questions were answered on.
DATABASE = {"train": "train", "valid": "train", "test": "test"}
QUESTION_KEYS = ("question", "query", "value", "answer")
TB_CXR_COLUMNS = ("subject_id", "study_id", "image_id")
QUESTION_SETS = ("study", "all")


def question_files(root: Path) -> dict[str, Path]:
    """``{split: dataset/<split>.json}`` (or under ``dataset/mimic_iv_cxr/``) of the splits present."""
    out = {}
    for split in SPLITS:
        for folder in (root / "dataset", root / "dataset" / "mimic_iv_cxr"):
            if (folder / f"{split}.json").is_file():
                out[split] = folder / f"{split}.json"
                break
    if not out:
        raise FileNotFoundError(
            f"--data.root {root}: no dataset/{{train,valid,test}}.json; point it at the EHRXQA release, after its "
            f"answers were generated (EHRXQA's build_dataset.sh writes them; the _train.json pre-release files hold "
            f"no answers)")
    return out


def read_questions(path: Path) -> list[dict[str, Any]]:
    """The questions of one split file; a malformed file or question is an error naming the file."""
    try:
        items = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON file ({err})") from err
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a list of questions, got {type(items).__name__}")
    for i, item in enumerate(items):
        missing = [k for k in QUESTION_KEYS if not isinstance(item, dict) or k not in item]
        if missing:
            hint = " (the pre-release _<split>.json files hold no answers)" if missing == ["answer"] else ""
            raise ValueError(f"{path}: question {i} has no {', '.join(missing)}{hint}")
        if not isinstance(item["answer"], list) or not isinstance(item["value"], dict):
            raise ValueError(f"{path}: question {i}: 'answer' must be a list and 'value' a dict")
    return items


def read_table(path: Path, columns: Sequence[str] = ()) -> list[dict[str, str]]:
    """Rows of one of the database's CSV tables; missing ``columns`` are an error naming the file."""
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            fields = reader.fieldnames or []
            missing = [c for c in columns if c not in fields]
            if missing:
                raise ValueError(f"{path}: no {', '.join(missing)} column (it has {fields})")
            return list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path}: not a readable CSV table ({err})") from err


def answer_text(answer: list[Any]) -> str:
    """A query result as text: booleans as yes/no, values joined by ``, ``."""
    def one(v: Any) -> str:
        if isinstance(v, list):
            return ", ".join(one(x) for x in v)
        if isinstance(v, bool):
            return "yes" if v else "no"
        return str(v).strip().lower()

    return ", ".join(one(v) for v in answer)


def image_path(images: Path, subject: str, study: str, image: str) -> Path:
    """MIMIC-CXR-JPG's path of one image."""
    return images / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{image}.jpg"


class EHRXQA(FederatedDataset):
    """EHRXQA questions about a patient's chest X-rays (and EHR): image + question (+ EHR text) -> answer."""

    default_group_by = "patient"

    def __init__(self, root: str, images: str, questions: str = "study", subset: str = "all",
                 mode: str | None = None, answer_length: int = 32, ehr_tables: list[str] | None = None,
                 ehr_rows: int = 5, cache_dir: str | None = None, fraction: float = 1.0) -> None:
        """
        Args:
            root: The EHRXQA release folder (``dataset/`` and ``database/``).
            images: The MIMIC-CXR-JPG folder (holding ``files/``).
            questions: ``study`` (image questions about one study) or ``all``.
            subset: ``yes_no``, ``open`` or ``all`` answers.
            mode: ``classify`` (yes/no only) or ``generate``; default: classify for ``yes_no``, generate otherwise.
            answer_length: Answer tokens the decoder is trained on and generates (start and end included).
            ehr_tables: Tables of the database (CSV names without ``.csv``: ``admissions``, ...) whose rows of the
                patient are appended to the question; none by default.
            ehr_rows: Rows per table appended.
            cache_dir: Folder of the image cache the images are decoded into once (default ``$FEDHB_IMAGE_CACHE``,
                ``$FEDHB_CACHE/images`` or ``~/.cache/fedhb/images``; see :mod:`fedhb.data.image_cache`).
            fraction: Fraction of the questions to keep (stratified by label, seeded by ``--seed``).
        """
        check_fraction(fraction)
        if questions not in QUESTION_SETS:
            raise ValueError(f"--data.questions must be study or all, got {questions!r}")
        if ehr_rows < 1:
            raise ValueError(f"--data.ehr_rows must be >= 1, got {ehr_rows}")
        self.mode = check_vqa_options(subset, mode, answer_length)
        self.root, self.images, self.questions, self.subset = root, images, questions, subset
        self.answer_length, self.ehr_tables, self.ehr_rows = answer_length, list(ehr_tables or []), ehr_rows
        self.cache_dir, self.fraction = cache_dir, fraction
        self.name = "ehrxqa"

    def load(self) -> Samples:
        root, images = Path(self.root).expanduser(), Path(self.images).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"--data.root {root} is not a folder; point it at the EHRXQA release")
        if not (images / "files").is_dir():
            raise FileNotFoundError(f"--data.images {images}: no files/ folder; point it at MIMIC-CXR-JPG (the "
                                    f"folder holding files/p10/...)")
        databases: dict[str, tuple[dict[str, dict[str, str]], dict[str, dict[str, list[dict[str, str]]]]]] = {}
        sources: list[Path | None] = [None]  # 0: the blank image of questions without a study
        names = ["(no image)"]
        by_path: dict[Path, int] = {}
        image_index: list[int] = []
        questions: list[str] = []
        answers: list[str] = []
        patients: list[str] = []
        splits: list[str] = []
        for split, path in question_files(root).items():
            db = DATABASE[split]
            if db not in databases:
                databases[db] = self._database(root / "database" / "mimic_iv_cxr" / db)
            studies, ehr = databases[db]
            for i, item in enumerate(read_questions(path)):
                if item.get("is_impossible") or not item["answer"]:
                    continue
                answer = answer_text(item["answer"])
                closed = answer in ("yes", "no")
                if (self.subset == "yes_no" and not closed) or (self.subset == "open" and closed):
                    continue
                value = item["value"]
                study = value.get("study_id")
                if self.questions == "study" and (study is None or "func_vqa" not in str(item["query"])):
                    continue
                source = 0
                subject = str(value.get("patient_id", ""))
                if study is not None:
                    row = studies.get(str(study))
                    if row is None:
                        raise ValueError(f"{path}: question {i} names study {study}, which tb_cxr.csv of the {db} "
                                         f"database does not hold")
                    subject = row["subject_id"]
                    file = image_path(images, subject, str(study), row["image_id"])
                    if not file.is_file():
                        raise FileNotFoundError(f"{file}: the image of study {study} ({path}, question {i}) is not "
                                                f"there; download the EHRXQA images of MIMIC-CXR-JPG into "
                                                f"--data.images")
                    if file not in by_path:
                        by_path[file] = len(sources)
                        sources.append(file)
                        names.append(str(file))
                    source = by_path[file]
                text = " ".join(str(item["question"]).split())
                context = self._context(ehr, subject)
                image_index.append(source)
                questions.append(f"{text} context: {context}" if context else text)
                answers.append(answer)
                patients.append(subject or f"question {split}/{i}")
                splits.append(split)
        if not questions:
            raise ValueError(f"--data.root {root}: no questions left (--data.questions {self.questions}, "
                             f"--data.subset {self.subset})")
        labels = vqa_labels(answers, self.mode)
        label_names = list(CLASSIFY_LABELS if self.mode == "classify" else GENERATE_LABELS)
        return Samples(
            inputs=VQAInputs(sources, np.array(image_index), questions, answers, names,
                             cache={"dataset": self.name, "root": images, "cache_dir": self.cache_dir}), labels=labels,
            num_classes=2, task="vqa", modality="image", groups={"patient": group_ids(patients)},
            source_split=np.array(splits), label_names=label_names,
            meta={"dataset": self.name, "vqa_mode": self.mode, "answer_length": self.answer_length,
                  "subset": self.subset},
        )

    def _database(self, folder: Path) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, list[dict[str, str]]]]]:
        """The database's studies (``study_id`` -> its ``tb_cxr`` row) and the EHR tables' rows by patient."""
        tb_cxr = folder / "tb_cxr.csv"
        if not tb_cxr.is_file():
            raise FileNotFoundError(f"{tb_cxr} not found: EHRXQA's database tables are built by its "
                                    f"build_dataset.sh (database/mimic_iv_cxr/{{train,test}}/tb_cxr.csv)")
        studies = {r["study_id"]: r for r in read_table(tb_cxr, TB_CXR_COLUMNS)}
        ehr: dict[str, dict[str, list[dict[str, str]]]] = {}
        for table in self.ehr_tables:
            path = folder / f"{table}.csv"
            if not path.is_file():
                raise FileNotFoundError(f"--data.ehr_tables {table}: {path} not found")
            rows: dict[str, list[dict[str, str]]] = {}
            for row in read_table(path, ("subject_id",)):
                rows.setdefault(row["subject_id"], []).append(row)
            ehr[table] = rows
        return studies, ehr

    def _context(self, ehr: dict[str, dict[str, list[dict[str, str]]]], subject: str) -> str:
        parts = []
        for table, rows in ehr.items():
            for row in rows.get(subject, [])[:self.ehr_rows]:
                fields = " ".join(f"{k} {v}" for k, v in row.items() if k not in ("row_id", "subject_id") and v)
                parts.append(f"{table}: {fields}")
        return " ; ".join(parts)
