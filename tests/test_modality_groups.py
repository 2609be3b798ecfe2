"""What a multimodal run records by modality: bytes sent and received by each modality's encoder, and each round's
per-client scores grouped by the modalities the clients hold, in metrics.jsonl, summary.json and TensorBoard."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from fedhb.algorithms.base import Aggregate
from fedhb.loop import download_parts, split_bytes, tensor_parts
from fedhb.record import MODALITY_FIELDS, modality_groups, tensorboard_scalars

sys.path.insert(0, str(Path(__file__).resolve().parent))


def test_scores_are_grouped_by_the_modalities_each_client_holds():
    held = {"0": ["text", "tabular"], "1": ["tabular"], "2": ["text", "tabular"], "3": ["tabular"]}

    groups = modality_groups(held, {"0": 0.5, "1": 0.25, "2": 0.75, "3": float("nan")})

    assert groups == {"text+tabular": {"clients": [0, 2], "mean_client_acc": 0.625, "worst_client_acc": 0.5},
                      "tabular": {"clients": [1, 3], "mean_client_acc": 0.25, "worst_client_acc": 0.25}}
    assert modality_groups({"0": ["image"]}, {})["image"]["mean_client_acc"] is None  # nobody scored


def test_bytes_of_a_smaller_wire_form_are_split_in_proportion_and_sum_to_it():
    assert split_bytes(10, {"text": 6, "head": 2}) == {"text": 8, "head": 2}  # 7.5 and 2.5: the first tie rounds up
    assert split_bytes(16, {"text": 6, "head": 2}) == {"text": 12, "head": 4}  # a multiple: exact
    assert split_bytes(0, {"text": 6}) == {} and split_bytes(5, {}) == {"other": 5}
    state = {"encoders.text.q": torch.zeros(3), "head.1.weight": torch.zeros(1, dtype=torch.float64)}
    assert tensor_parts(state) == {"text": 12, "head": 8}
    # Two clients receive the state; one downloads it whole, the other a wire form of 10 bytes.
    whole = Aggregate({0: state, 1: state})
    wire = Aggregate({0: state, 1: state}, bytes_down={0: 20, 1: 10})

    assert download_parts(whole) == {"text": 24, "head": 16}
    assert download_parts(wire) == {"text": 12 + 6, "head": 8 + 4}


def test_tensorboard_shows_each_number_inside_the_by_modality_fields():
    record = {"bytes_up_by_modality": {"text": 4, "head": 2}, "bytes_down_by_modality": {"text": 8},
              "by_modalities": {"tabular": {"clients": [1], "mean_client_acc": 0.5, "worst_client_acc": None}}}

    tags = tensorboard_scalars(record, ())

    assert tags == {"comm/bytes_up_by_modality/text": 4, "comm/bytes_up_by_modality/head": 2,
                    "comm/bytes_down_by_modality/text": 8, "modalities/tabular/mean_client_acc": 0.5}
    assert [f.key for f in MODALITY_FIELDS] == ["bytes_up_by_modality", "bytes_down_by_modality", "by_modalities"]


@pytest.mark.slow
def test_a_run_with_a_client_missing_its_reports_records_its_metrics_by_modality_set(padchest_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_multimodal_federation import make_run

    from fedhb.fit import fit
    from fedhb.io import read_jsonl

    run = make_run(padchest_file, tmp_path / "FedAvg-concat", "FedAvg", 1, images=False)
    summary = fit(data=run.data, algorithm=run.algorithm, out_dir=str(run.out), seed=run.seed, partition=run.partition,
                  model=run.model, federation=run.federation, optim=run.optim, fabric=run.fabric_args,
                  checkpoint=run.checkpoint)
    assert summary is not None
    summary["history"] = read_jsonl(run.out / "metrics.jsonl")

    held = summary["client_modalities"]
    [silent] = [int(c) for c, m in held.items() if m == ["tabular"]]
    assert sorted(map(tuple, held.values())) == [("tabular",), ("text", "tabular"), ("text", "tabular")]
    history = summary["history"]
    for record in history:
        groups = record["by_modalities"]
        scores = record["client_acc"]
        both = [c for c in range(3) if c != silent]
        assert groups["tabular"] == {"clients": [silent], "mean_client_acc": scores[str(silent)],
                                     "worst_client_acc": scores[str(silent)]}
        assert groups["text+tabular"]["clients"] == both
        assert groups["text+tabular"]["mean_client_acc"] == pytest.approx(sum(scores[str(c)] for c in both) / 2)
        assert groups["text+tabular"]["worst_client_acc"] == min(scores[str(c)] for c in both)
        # Every byte is counted with a part of the model; FedAvg's clients receive the whole state each round.
        assert sum(record["bytes_up_by_modality"].values()) == record["bytes_up"]
        assert sum(record["bytes_down_by_modality"].values()) == record["bytes_down"]
        assert record["bytes_down_by_modality"] == {k: 3 * v for k, v in summary["state_bytes_by_modality"].items()}
    assert summary["bytes_down_by_modality"] == {k: sum(r["bytes_down_by_modality"][k] for r in history)
                                                 for k in history[0]["bytes_down_by_modality"]}
    assert summary["by_modalities"] == history[-1]["by_modalities"]  # the final round's, as summary.json had it
    events = EventAccumulator(str(tmp_path / "FedAvg-concat" / "logs"))
    events.Reload()
    logged = events.Scalars("modalities/tabular/mean_client_acc")
    assert [e.step for e in logged] == [1, 2]
    assert [e.value for e in logged] == pytest.approx([r["by_modalities"]["tabular"]["mean_client_acc"]
                                                       for r in history], rel=1e-6)
    assert {"comm/bytes_down_by_modality/text", "comm/bytes_up_by_modality/fusion"} <= set(events.Tags()["scalars"])
    assert json.loads((tmp_path / "FedAvg-concat" / "summary.json").read_text())["bytes_down_by_modality"]
