"""The multimodal quick start: its baseline by hand, and the real thing (pretrained MiniLM on PadChest's reports plus
tabular features, one client per scanner manufacturer) against the README's table."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from fedhb import quickstart_padchest as qs

README = Path(__file__).resolve().parent.parent / "README.md"
# Scores may move by a few test predictions between CPUs and thread counts (float reductions differ).
TOLERANCE = {"macro AUROC": 0.02, "macro F1": 0.04, "label acc": 0.01, "worst client": 0.015}
KEYS = {"macro AUROC": "personalized_auroc", "macro F1": "personalized_f1", "label acc": "personalized_acc",
        "worst client": "worst_client_acc"}


def test_the_no_finding_baseline_by_hand():
    partition = {"label_names": ["a", "b"], "clients": {
        "0": {"test": 4, "class_counts": {"test": [1, 2]}},  # 3 positive cells of 8
        "1": {"test": 5, "class_counts": {"test": [0, 1]}},  # 1 of 10
    }}

    row = qs.no_finding_baseline(partition)
    table = qs.format_table({"rows": [row]}).splitlines()

    assert row["personalized_acc"] == pytest.approx((5 / 8 + 9 / 10) / 2) and row["worst_client_acc"] == 5 / 8
    assert table[0] == "| algorithm | macro AUROC | macro F1 | label acc | worst client | MB sent | time (s) |"
    assert table[2] == "| no finding (baseline) | 0.500 | 0.000 | 0.762 | 0.625 | - | - |"


def readme_rows() -> dict[str, dict[str, str]]:
    text = README.read_text()
    section = text[text.index("<!-- section:quickstart_padchest -->"):
                   text.index("<!-- /section:quickstart_padchest -->")]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == len(qs.COLUMNS) and cells[0] not in ("algorithm", "") and not set(cells[0]) <= {"-"}:
            rows[cells[0]] = dict(zip(qs.COLUMNS, cells))
    return rows


def test_readme_states_the_multimodal_quickstart_table_second():
    text = README.read_text()

    assert set(readme_rows()) == {"FedAvg", "EPFL", "Local", qs.BASELINE}
    assert text.index("<!-- /section:quickstart -->") < text.index("<!-- section:quickstart_padchest -->") < \
        text.index("## Run a federation")
    assert re.search(r"python -m fedhb\.quickstart_padchest|make quickstart-padchest", text)
    assert "## Multimodal" in text


@pytest.fixture
def torch_default_threads():
    """The quick start as a user runs it: torch's own thread count, not the test session's one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_the_multimodal_quickstart_reproduces_the_readme_figures(tmp_path, monkeypatch, torch_default_threads):
    monkeypatch.setenv("FEDHB_CACHE", str(tmp_path / "cache"))  # a fresh machine: tokenize from scratch
    result = qs.main(["--out_dir", str(tmp_path / "runs")])

    got = {r["algorithm"]: r for r in result["rows"]}
    for name, row in readme_rows().items():
        for column, key in KEYS.items():
            if name == qs.BASELINE:  # the partition is deterministic: exact
                assert f"{got[name][key]:.3f}" == row[column], (name, column)
            else:
                assert abs(got[name][key] - float(row[column])) <= TOLERANCE[column], (name, column, got[name][key])
        if row["MB sent"] != "-":
            assert f"{got[name]['bytes_total'] / 1e6:.1f}" == row["MB sent"], name
    # The point: every federation ranks findings far better than chance, and EPFL sends less than FedAvg.
    assert min(got[n]["personalized_auroc"] for n in ("FedAvg", "EPFL", "Local")) > 0.75
    assert got["Local"]["bytes_total"] == 0 < got["EPFL"]["bytes_total"] < got["FedAvg"]["bytes_total"]
    assert set(got["EPFL"]["bytes_up_by_modality"]) == {"text"}  # EPFL sends the reports' LoRA only
    assert (tmp_path / "runs" / "quickstart.json").is_file()
