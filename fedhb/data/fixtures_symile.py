"""A small Symile-MIMIC folder in the published layout (:mod:`fedhb.data.symile_mimic`), for tests and dev runs.

``python -m fedhb.data.fixtures_symile --root data/fixture/symile_mimic`` writes ``train.csv``, ``val.csv``,
``val_retrieval.csv``, ``test.csv`` (queries followed by their negative candidates, as Symile's
``create_dataset_splits.py`` writes them), ``labs_means.json`` and ``data_npy/<split>/`` with every array, at a
reduced size: X-rays of ``image_size`` px (published: 320) and 1-s ECGs (500 samples at 500 Hz; published: 10 s).
The three modalities of an admission share a latent vector, so that they can be aligned: it sets the X-ray's
brightness pattern, the ECG leads' amplitudes and the lab percentiles. Patients have one or two admissions and lie
in one split each.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from fedhb.data.symile_mimic import CHEXPERT, IMAGENET_MEAN, IMAGENET_STD, LAB_ORDER, LEADS, array_path

LATENT = 4


def _admission(u: np.ndarray, rng: np.random.Generator, size: int, length: int,
               lab_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One admission's X-ray ``(3, size, size)`` (normalised), ECG ``(1, length, 12)``, lab percentiles and
    measured flags, all functions of the latent ``u`` plus noise."""
    y, x = np.mgrid[0:size, 0:size] / size
    gray = 0.5 + 0.15 * (u[0] * np.sin(np.pi * x) + u[1] * np.cos(np.pi * y) + u[2] * x * y)
    gray = np.clip(gray + rng.normal(0, 0.02, gray.shape), 0, 1)
    image = (gray[None] - np.array(IMAGENET_MEAN)[:, None, None]) / np.array(IMAGENET_STD)[:, None, None]
    t = np.arange(length) / 500.0
    amplitude = 1.0 + 0.5 * np.tanh(u[np.arange(LEADS) % LATENT])
    ecg = amplitude[None, :] * np.sin(2 * np.pi * (1.0 + 0.3 * u[3]) * t[:, None] + np.arange(LEADS)[None, :])
    ecg = ecg + rng.normal(0, 0.05, ecg.shape)
    ecg = 2 * (ecg - ecg.min()) / (ecg.max() - ecg.min()) - 1
    percentiles = 1 / (1 + np.exp(-(lab_weights @ u)))
    measured = (rng.random(len(LAB_ORDER)) < 0.7).astype(np.int64)
    measured[0] = 1  # every admission has at least one lab
    return image.astype(np.float32), ecg[None].astype(np.float32), percentiles.astype(np.float32), measured


def write_symile_fixture(root: str | Path, patients: int = 40, seed: int = 0, image_size: int = 32,
                         ecg_length: int = 500, candidates: int = 4) -> Path:
    """Write the fixture under ``root`` (returned); ``patients`` split 70/15/15 by patient."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    lab_weights = rng.normal(0, 1.5, (len(LAB_ORDER), LATENT))
    order = rng.permutation(patients)
    n_train, n_val = int(0.7 * patients), int(0.15 * patients)
    split_of = {int(p): "train" if i < n_train else "val" if i < n_train + n_val else "test"
                for i, p in enumerate(order)}
    rows: dict[str, list[dict[str, object]]] = {s: [] for s in ("train", "val", "test")}
    arrays: dict[str, dict[str, list[Any]]] = {s: {} for s in rows}
    hadm = 20_000_000
    for p in range(patients):
        for _ in range(1 + int(rng.random() < 0.4)):
            hadm += int(rng.integers(1, 50))
            u = rng.normal(0, 1, LATENT)
            image, ecg, pct, measured = _admission(u, rng, image_size, ecg_length, lab_weights)
            split = split_of[p]
            row: dict[str, object] = {"subject_id": 10_000_000 + 7 * p, "hadm_id": hadm,
                                      "cxr_path": f"files/p10/p{10_000_000 + 7 * p}/s{hadm}/{hadm:x}.jpg",
                                      "ecg_path": f"files/p1000/p{10_000_000 + 7 * p}/s{hadm}/{hadm}"}
            for name in CHEXPERT:
                row[name] = "" if rng.random() < 0.5 else float(rng.choice([1.0, 0.0, -1.0]))
            row["No Finding"] = 1.0 if u[0] > 0.3 else ""
            for j, item in enumerate(LAB_ORDER):
                row[item] = round(float(50 + 40 * pct[j]), 3) if measured[j] else ""
                row[f"{item}_percentile"] = round(float(pct[j]), 6) if measured[j] else ""
            rows[split].append(row)
            for key, value in (("cxr", image), ("ecg", ecg), ("labs_percentiles", pct),
                               ("labs_missingness", measured), ("hadm_id", np.int64(hadm))):
                arrays[split].setdefault(key, []).append(value)
    # Training means of the percentiles stand in for an unmeasured lab (Symile's labs_means.json).
    train_pct = np.stack(arrays["train"]["labs_percentiles"])
    train_obs = np.stack(arrays["train"]["labs_missingness"]).astype(bool)
    means = {f"{item}_percentile": float(train_pct[train_obs[:, j], j].mean()) for j, item in enumerate(LAB_ORDER)}
    for split in rows:
        pct = np.stack(arrays[split]["labs_percentiles"])
        obs = np.stack(arrays[split]["labs_missingness"])
        mean = np.array([means[f"{item}_percentile"] for item in LAB_ORDER], dtype=np.float32)
        arrays[split]["labs_percentiles"] = list(np.where(obs == 1, pct, mean[None]).astype(np.float32))
    retrieval = {"val_retrieval": "val", "test": "test"}
    for name, source in retrieval.items():
        queries = rows[source]
        extra_rows, extra_index = [], []
        for i, query in enumerate(queries):
            others = [j for j in range(len(queries)) if j != i]
            for j in rng.choice(others, size=min(candidates - 1, len(others)), replace=False):
                extra_rows.append({**queries[int(j)], "label_hadm_id": query["hadm_id"], "label": 0})
                extra_index.append(int(j))
        labelled = [{**q, "label_hadm_id": q["hadm_id"], "label": 1} for q in queries] + extra_rows
        index = list(range(len(queries))) + extra_index
        rows[name] = labelled
        arrays[name] = {k: [v[i] for i in index] for k, v in arrays[source].items()}
        arrays[name]["label"] = [int(str(r["label"])) for r in labelled]
        arrays[name]["label_hadm_id"] = [int(str(r["label_hadm_id"])) for r in labelled]
    root.mkdir(parents=True, exist_ok=True)
    for split, table in rows.items():
        header = list(table[0])
        with open(root / f"{split}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(table)
        for key, values in arrays[split].items():
            path = array_path(root, split, key)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, np.stack(values))
    (root / "labs_means.json").write_text(json.dumps(means, indent=4))
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="folder to write the Symile-MIMIC fixture into")
    parser.add_argument("--patients", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_symile_fixture(args.root, args.patients, args.seed))


if __name__ == "__main__":
    main()
