"""Fixture writers for the VQA datasets, in their published layouts: PathVQA's Hugging Face parquet files (PNG bytes
in an ``image`` struct) and EHRXQA's PhysioNet folder (question JSON, database CSV tables, MIMIC-CXR-JPG images).

The images are small random pictures with a bright square whose side (left or right) answers the fixtures' yes/no
questions, so a model can learn them.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

OPEN_ANSWERS = ("mesothelioma", "left lung", "fibrosis", "right lower lobe", "carcinoma of the colon")


def _picture(rng: np.random.Generator, right: bool, size: int, fmt: str) -> bytes:
    from PIL import Image

    pixels = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
    half = size // 2
    column = slice(half, size) if right else slice(0, half)
    pixels[size // 4: 3 * size // 4, column] = 230
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def pathvqa_rows(images: int, questions: int, seed: int, size: int = 48) -> list[dict[str, object]]:
    """``questions`` rows per image: alternately a yes/no question (yes when the square is on the right) and an open
    one; each row carries its image's PNG bytes, as the release does."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, object]] = []
    for i in range(images):
        right = bool(i % 2)
        png = _picture(rng, right, size, "PNG")
        for q in range(questions):
            row: dict[str, object]
            if q % 2 == 0:
                row = {"question": "is the bright region on the right?", "answer": "yes" if right else "no"}
            else:
                answer = OPEN_ANSWERS[(i + q) % len(OPEN_ANSWERS)]
                row = {"question": "what does this image show?", "answer": answer}
            rows.append({"image": {"bytes": png, "path": f"img_{seed}_{i}.png"}, **row})
    return rows


def write_pathvqa_fixture(root: str | Path, images: tuple[int, int, int] = (8, 3, 3), questions: int = 4,
                          seed: int = 0, drop_column: str | None = None) -> Path:
    """``root/data/{train,validation,test}-00000-of-00001.parquet`` with the columns image (struct: bytes, path),
    question, answer; ``drop_column`` leaves one column out (a malformed file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for k, (split, count) in enumerate(zip(("train", "validation", "test"), images)):
        rows = pathvqa_rows(count, questions, seed + 100 * k)
        columns = {"image": pa.array([r["image"] for r in rows], type=image_type),
                   "question": pa.array([r["question"] for r in rows], type=pa.string()),
                   "answer": pa.array([r["answer"] for r in rows], type=pa.string())}
        if drop_column is not None:
            columns.pop(drop_column)
        pq.write_table(pa.table(columns), root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def write_ehrxqa_fixture(root: str | Path, patients: int = 6, studies: int = 2, seed: int = 0) -> tuple[Path, Path]:
    """An EHRXQA release under ``root/ehrxqa`` (``dataset/{train,valid,test}.json``, ``database/mimic_iv_cxr/
    {train,test}/{tb_cxr,admissions}.csv``) and MIMIC-CXR-JPG images under ``root/mimic-cxr-jpg/files``; returns
    ``(release, images)``. Each study has a yes/no image question, an open image question and a table question; the
    last patient's questions are the test split, the one before the valid split."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    release, images = root / "ehrxqa", root / "mimic-cxr-jpg"
    tables: dict[str, list[dict[str, object]]] = {"train": [], "test": []}
    admissions: dict[str, list[dict[str, object]]] = {"train": [], "test": []}
    questions: dict[str, list[dict[str, object]]] = {"train": [], "valid": [], "test": []}
    for p in range(patients):
        subject = 10000000 + 1111 * p
        split = "test" if p == patients - 1 else "valid" if p == patients - 2 else "train"
        db = "test" if split == "test" else "train"
        admissions[db].append({"row_id": len(admissions[db]), "subject_id": subject, "hadm_id": 20000000 + p,
                               "admittime": f"2105-0{1 + p % 9}-01 10:00:00", "admission_type": "ew emer."})
        for s in range(studies):
            study = 50000000 + 100 * p + s
            image_id = f"{p:08x}-{s:08x}-{seed:08x}"
            right = bool((p + s) % 2)
            file = images / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}" / f"{image_id}.jpg"
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_bytes(_picture(rng, right, 40, "JPEG"))
            tables[db].append({"row_id": len(tables[db]), "subject_id": subject, "hadm_id": 20000000 + p,
                               "study_id": study, "image_id": image_id, "viewposition": "PA",
                               "studydatetime": f"2105-0{1 + s}-02 08:00:00"})
            base = {"db_id": "mimic_iv_cxr", "split": split, "template": "", "q_tag": "", "t_tag": ["", "", "", "", ""],
                    "o_tag": {}, "v_tag": {"object": [], "category": [], "attribute": []}, "tag": "",
                    "para_type": "machine", "is_impossible": False}
            vqa = 'func_vqa("is the bright region on the right?", t1.study_id)'
            questions[split] += [
                {**base, "id": len(questions[split]), "question": f"given the {study} study, is the bright region on "
                 f"the right?", "query": f"select {vqa} from tb_cxr where study_id = {study}",
                 "value": {"study_id": study}, "answer": [right]},
                {**base, "id": len(questions[split]) + 1, "question": f"given the {study} study, list the anatomical "
                 f"locations related to any anomaly.", "query": f'select func_vqa("list anatomical locations", '
                 f"t1.study_id) from tb_cxr where study_id = {study}", "value": {"study_id": study},
                 "answer": ["right lung", "left lung"] if right else ["left lung"]},
                {**base, "id": len(questions[split]) + 2, "question": f"how many times did patient {subject} get "
                 f"admitted to the hospital?", "query": f"select count(*) from admissions where subject_id = {subject}",
                 "value": {"patient_id": subject}, "answer": [1]},
            ]
        questions[split].append({**base, "id": len(questions[split]), "question": "an impossible question?",
                                 "query": "select 1", "value": {"patient_id": subject}, "is_impossible": True,
                                 "answer": []})
    for split, items in questions.items():
        folder = release / "dataset"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{split}.json").write_text(json.dumps(items, indent=1))
    for db in ("train", "test"):
        folder = release / "database" / "mimic_iv_cxr" / db
        folder.mkdir(parents=True, exist_ok=True)
        for name, rows in (("tb_cxr", tables[db]), ("admissions", admissions[db])):
            header = list(rows[0])
            lines = [",".join(header)] + [",".join(str(r[h]) for h in header) for r in rows]
            (folder / f"{name}.csv").write_text("\n".join(lines) + "\n")
    return release, images


def main(argv: list[str] | None = None) -> None:
    """``python -m fedhb.data.fixtures_vqa --root DIR``: ``DIR/pathvqa`` and ``DIR/ehrxqa`` + ``DIR/mimic-cxr-jpg``."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--root", required=True, help="folder to write the fixtures into")
    args = parser.parse_args(argv)
    root = Path(args.root)
    pathvqa = write_pathvqa_fixture(root / "pathvqa")
    release, images = write_ehrxqa_fixture(root)
    print(f"PathVQA: --data.root {pathvqa}\nEHRXQA: --data.root {release} --data.images {images}")


if __name__ == "__main__":
    main()
