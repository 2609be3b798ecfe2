"""TensorBoard: per-round scalars under the same names for every algorithm, and the HParams tab, read back from the
event files as TensorBoard reads them."""

from __future__ import annotations

import json
import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from fedhb.algorithms import EPFL, FedAvg
from fedhb.config import FabricArgs, FederationArgs, OptimArgs, PartitionArgs
from fedhb.data import MedMNIST
from fedhb.data.fixtures import write_medmnist_fixture
from fedhb.fit import fit
from fedhb.io import read_jsonl


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """EPFL (personalized) and FedAvg (with a global model), 2 rounds of 3 clients on a small fixture."""
    root = tmp_path_factory.mktemp("tb")
    write_medmnist_fixture(root / "data", "organamnist", 28, (150, 30, 90), seed=0)
    out = {}
    for algorithm in (EPFL(lam=0.3), FedAvg()):
        name = type(algorithm).__name__
        fit(data=MedMNIST(root=str(root / "data")), algorithm=algorithm, out_dir=str(root / name), seed=3,
            partition=PartitionArgs(num_clients=3, alpha=0.5), federation=FederationArgs(rounds=2),
            optim=OptimArgs(name="adamw", lr=0.01), fabric=FabricArgs(accelerator="cpu"))
        events = EventAccumulator(str(root / name / "logs"))
        events.Reload()
        out[name] = (root / name, events)
    return out


def hparams_data(events):
    return {tag: plugin_data_pb2.HParamsPluginData.FromString(content)
            for tag, content in events.PluginTagToContent("hparams").items()}


def test_scalars_have_the_same_names_for_every_algorithm(runs):
    tags = {name: set(events.Tags()["scalars"]) for name, (_, events) in runs.items()}

    common = {"personalized/acc", "personalized/worst_client_acc", "personalized/f1", "personalized/auroc",
              "train/loss", "comm/bytes_up", "comm/bytes_down", "comm/bytes_total", "time/round_s",
              "clients/trained"}
    assert common <= tags["EPFL"] and common <= tags["FedAvg"]
    # Only a method with one global model has global scores; nothing else differs.
    assert tags["FedAvg"] - tags["EPFL"] == {"global/acc", "global/f1", "final/global_acc", "final/global_f1"}
    assert tags["EPFL"] <= tags["FedAvg"]


def test_per_round_scalars_are_the_metrics_of_the_run(runs):
    folder, events = runs["FedAvg"]
    records = read_jsonl(folder / "metrics.jsonl")

    for tag, key in (("personalized/acc", "personalized_acc"), ("global/acc", "global_acc"),
                     ("comm/bytes_total", "bytes_total")):
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in logged] == [1, 2]
        assert [v for _, v in logged] == pytest.approx([r[key] for r in records], rel=1e-6)


def test_hparams_tab_holds_the_settings_and_final_metrics(runs):
    folder, events = runs["EPFL"]
    summary = json.loads((folder / "summary.json").read_text())

    data = hparams_data(events)

    assert set(data) == {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}
    start = data["_hparams_/session_start_info"].session_start_info.hparams
    assert start["algorithm"].string_value == "EPFL"
    assert start["dataset"].string_value == "organamnist"
    assert start["algorithm.lam"].number_value == pytest.approx(0.3)
    assert start["partition.num_clients"].number_value == 3
    assert start["optim.name"].string_value == "adamw"
    assert start["seed"].number_value == 3
    assert "out_dir" not in start and "data.root" not in start  # where a run lives is not a hyperparameter
    metric_tags = {m.name.tag for m in data["_hparams_/experiment"].experiment.metric_infos}
    assert {"final/personalized_acc", "final/worst_client_acc", "final/bytes_total", "final/wall_time_s"} <= metric_tags
    assert "final/global_acc" not in metric_tags  # EPFL has no global model: left blank, not a fake number
    final = events.Scalars("final/personalized_acc")
    assert [e.step for e in final] == [2]
    assert final[0].value == pytest.approx(summary["final"]["personalized_acc"], rel=1e-6)
    assert events.Scalars("final/bytes_total")[0].value == pytest.approx(summary["bytes_total"])


def test_every_run_has_the_same_hparams_columns(runs):
    """TensorBoard reads the columns of whichever run comes first; FedAvg's must include EPFL's ``algorithm.lam``
    (as NaN) and EPFL's FedAvg's, so that ``--logdir`` over both shows every column for both."""
    columns = {}
    for name, (_, events) in runs.items():
        infos = hparams_data(events)["_hparams_/experiment"].experiment.hparam_infos
        columns[name] = {info.name: info.type for info in infos}

    assert columns["EPFL"] == columns["FedAvg"]
    assert {"algorithm.lam", "algorithm.mu", "data.flag", "data.size", "data.sampling_rate"} <= set(columns["EPFL"])
    fedavg = hparams_data(runs["FedAvg"][1])["_hparams_/session_start_info"].session_start_info.hparams
    assert math.isnan(fedavg["algorithm.lam"].number_value)  # FedAvg has no lam: neutral, not a fake number
    assert fedavg["data.flag"].string_value == "organamnist"
