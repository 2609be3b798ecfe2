"""``fedhb report`` on run folders written by hand: exact means and stds, best marks, exclusions, figures, the CLI."""

from __future__ import annotations

import csv
import json
import math
import shutil
import warnings

import numpy as np
import pytest
import yaml

from fedhb.cli import main
from fedhb.report import find_runs, load_run, runs_as_options, setting, tensorboard_hparams, write_report

ALGORITHMS = {"FedAvg": "fedhb.algorithms.fedavg.FedAvg", "Local": "fedhb.algorithms.local.Local",
              "EPFL": "fedhb.algorithms.epfl.EPFL"}


def write_run(folder, dataset, algorithm, seed, accs, bytes_per_round=1000, global_accs=None, wall=10.0,
              finished=True, lam=None, rounds=None, options=None):
    """A run folder as fedhb fit writes it: config.yaml, metrics.jsonl (one line per round) and summary.json.

    ``options`` sets more config entries by dotted name (``{"optim.lr": 0.1}``)."""
    folder.mkdir(parents=True)
    init = {} if lam is None else {"lam": lam}
    config = {"data": {"class_path": "fedhb.data.medmnist.MedMNIST",
                       "init_args": {"flag": dataset, "root": f"/data/{seed}", "size": 28}},
              "algorithm": {"class_path": ALGORITHMS[algorithm], "init_args": init},
              "out_dir": str(folder), "seed": seed, "partition": {"num_clients": 4, "alpha": 0.1},
              "federation": {"rounds": rounds or len(accs)}, "fabric": {"devices": 1 + seed % 2}}
    for dotted, value in (options or {}).items():
        *parents, leaf = dotted.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    records = []
    for t, acc in enumerate(accs, start=1):
        records.append({"round": t, "personalized_acc": acc, "worst_client_acc": acc - 0.1, "personalized_f1": acc / 2,
                        "global_acc": None if global_accs is None else global_accs[t - 1],
                        "bytes_total": bytes_per_round * t, "client_acc": {"0": acc}})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if finished:
        summary = {"algorithm": algorithm, "dataset": dataset, "seed": seed, "rounds": len(accs),
                   "bytes_total": bytes_per_round * len(accs), "wall_time_s": wall, "final": records[-1]}
        (folder / "summary.json").write_text(json.dumps(summary))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report") / "runs"
    write_run(root / "a" / "fedavg0", "organamnist", "FedAvg", 0, [0.5, 0.6], 3000, [0.4, 0.7], wall=10.0)
    write_run(root / "a" / "fedavg1", "organamnist", "FedAvg", 1, [0.6, 0.8], 3000, [0.5, 0.9], wall=14.0)
    write_run(root / "b" / "local0", "organamnist", "Local", 0, [0.7, 0.9], 0, wall=4.0)
    write_run(root / "b" / "local1", "organamnist", "Local", 1, [0.5, 0.7], 0, wall=6.0)
    write_run(root / "deep" / "x" / "epfl0", "organamnist", "EPFL", 0, [0.6, 0.7], 1000, lam=0.5)
    write_run(root / "deep" / "x" / "epfl1", "organamnist", "EPFL", 1, [0.6, 0.9], 1000, lam=0.3)
    write_run(root / "other" / "fedavg", "pathmnist", "FedAvg", 0, [0.2, 0.3], 500, [0.1, 0.2], wall=3.0)
    write_run(root / "other" / "local", "pathmnist", "Local", 0, [0.4, 0.4], 0, wall=2.0)
    write_run(root / "unfinished", "organamnist", "FedAvg", 2, [0.99], 3000, [0.99], finished=False, rounds=5)
    write_run(root / "diverged", "organamnist", "FedAvg", 3, [0.99], 3000, [0.99])
    summary = json.loads((root / "diverged" / "summary.json").read_text())
    summary["final"]["personalized_acc"] = None  # what io._clean makes of NaN
    (root / "diverged" / "summary.json").write_text(json.dumps(summary))
    (root / "crashed").mkdir()
    (root / "crashed" / "grid_error.txt").write_text("Traceback ...\nFileNotFoundError: no organamnist.npz\n")
    return root


@pytest.fixture(scope="module")
def made(runs):
    """The report of every run above, written once for the tests that only read it."""
    out = runs.parent / "report"
    return write_report([runs], out), out


def read_rows(path):
    with open(path) as f:
        return {(r["dataset"], r["algorithm"], r["setting"]): r for r in csv.DictReader(f)}


def test_the_table_holds_mean_and_sample_std_over_seeds_and_marks_the_best(made):
    result, out = made

    rows = read_rows(out / "report.csv")
    fedavg = rows[("organamnist", "FedAvg", "")]
    assert fedavg["runs"] == "2" and fedavg["seeds"] == "0 1"
    assert float(fedavg["personalized_acc_mean"]) == pytest.approx(0.7)  # final rounds 0.6 and 0.8
    assert float(fedavg["personalized_acc_std"]) == pytest.approx(math.sqrt(0.02))  # n - 1: ((0.1)^2 * 2) / 1
    assert float(fedavg["worst_client_acc_mean"]) == pytest.approx(0.6)
    assert float(fedavg["global_acc_mean"]) == pytest.approx(0.8)
    assert float(fedavg["personalized_f1_mean"]) == pytest.approx(0.35)
    assert float(fedavg["bytes_total_mean"]) == 6000 and float(fedavg["bytes_total_std"]) == 0
    assert float(fedavg["wall_time_s_mean"]) == pytest.approx(12.0)
    local = rows[("organamnist", "Local", "")]
    assert float(local["personalized_acc_mean"]) == pytest.approx(0.8)
    assert local["global_acc_mean"] == "" and local["global_acc_std"] == ""  # undefined, not 0
    # Best per dataset: EPFL with lam 0.3 is the most accurate, Local sends nothing and is fastest, FedAvg alone has a
    # global model.
    epfl = rows[("organamnist", "EPFL", "algorithm.lam=0.3")]
    assert set(epfl["best"].split(";")) == {"personalized_acc", "worst_client_acc", "personalized_f1"}
    assert set(local["best"].split(";")) == {"bytes_total", "wall_time_s"}
    assert fedavg["best"] == "global_acc"
    # One run per setting: std is undefined, and pathmnist's best is decided among pathmnist's rows only.
    assert rows[("pathmnist", "Local", "")]["personalized_acc_std"] == ""
    assert "personalized_acc" in rows[("pathmnist", "Local", "")]["best"].split(";")
    assert len(result.groups) == 6


def test_runs_with_different_options_are_never_averaged_together(made):
    _, out = made

    rows = read_rows(out / "report.csv")
    # The two EPFL runs differ in lam; devices and data root differ too, but those do not change the numbers.
    assert float(rows[("organamnist", "EPFL", "algorithm.lam=0.3")]["personalized_acc_mean"]) == pytest.approx(0.9)
    assert float(rows[("organamnist", "EPFL", "algorithm.lam=0.5")]["personalized_acc_mean"]) == pytest.approx(0.7)
    assert ("organamnist", "FedAvg", "") in rows


def test_unfinished_and_failed_runs_are_listed_not_averaged(made):
    result, out = made

    reasons = {r.path.name: (r.status, r.reason) for r in result.excluded}
    assert reasons["unfinished"] == ("unfinished", "no summary.json; last evaluated round 1 of 5")
    assert reasons["diverged"][0] == "failed" and "not finite" in reasons["diverged"][1]
    assert reasons["crashed"] == ("failed", "FileNotFoundError: no organamnist.npz")
    text = (out / "report.md").read_text()
    section = text.split("## Runs not averaged")[1].split("##")[0]
    for name in ("unfinished", "diverged", "crashed"):
        assert name in section
    # Their 0.99 accuracy would have moved FedAvg's mean; it is 0.7 from the two finished seeds.
    assert "| FedAvg | — | 2 | 70.00 ± 14.14 |" in text
    assert "| Local | — | 2 | 80.00 ± 14.14 |" in text
    # The two EPFL settings are EPFL-a and EPFL-b in the figures; the table is the key to them.
    assert "| EPFL-a | algorithm.lam=0.3 | 1 | **90.00** |" in text  # one seed: no std; bold as the best
    assert "| EPFL-b | algorithm.lam=0.5 | 1 | 70.00 |" in text


def test_figures_are_readable_pngs(made):
    from matplotlib.image import imread

    result, out = made

    pngs = sorted(p.name for p in result.files if p.suffix == ".png")
    assert pngs == ["organamnist_personalized_acc_vs_bytes.png", "organamnist_personalized_acc_vs_round.png",
                    "pathmnist_personalized_acc_vs_bytes.png", "pathmnist_personalized_acc_vs_round.png"]
    for name in pngs:
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 15_000
        pixels = imread(path)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 500
        rgb = (pixels[..., :3] * 255).astype(np.int64)
        colours = np.unique(rgb[..., 0] * 65536 + rgb[..., 1] * 256 + rgb[..., 2])
        assert len(colours) > 50  # lines, bands, text: far from a blank canvas
        assert f"]({name})" in (out / "report.md").read_text()
    assert not list((out).glob(".*"))  # no temporary files left behind


def test_a_report_is_not_overwritten_unless_asked(runs, tmp_path):
    write_report([runs / "a"], tmp_path / "report")
    before = (tmp_path / "report" / "report.md").read_text()

    with pytest.raises(FileExistsError, match="--overwrite true"):
        write_report([runs / "b"], tmp_path / "report")

    assert (tmp_path / "report" / "report.md").read_text() == before
    write_report([runs / "b"], tmp_path / "report", overwrite=True)
    assert "Local" in (tmp_path / "report" / "report.md").read_text()
    assert "FedAvg" not in (tmp_path / "report" / "report.md").read_text()


def test_bad_inputs_say_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report([tmp_path / "nope"], tmp_path / "report")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no run folder under"):
        write_report([tmp_path / "empty"], tmp_path / "report")
    write_run(tmp_path / "only" / "r", "organamnist", "FedAvg", 0, [0.5], finished=False, rounds=3)
    with pytest.raises(ValueError, match="none of the 1 runs found has finished"):
        write_report([tmp_path / "only"], tmp_path / "report")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "summary.json").write_text("{not json")
    assert load_run(tmp_path / "broken").status == "failed"


def test_run_folders_are_found_at_any_depth_without_entering_them(runs):
    found = find_runs([runs, runs / "a"])  # overlapping arguments: each run once

    assert len(found) == 11
    assert len(set(found)) == 11
    assert not any(p.name == "logs" for p in found)


def test_positional_run_folders_become_options():
    assert runs_as_options(["report", "runs/", "more/", "--out", "rep"]) == [
        "report", "--out", "rep", "--runs+", "runs/", "--runs+", "more/"]
    assert runs_as_options(["report", "--out=rep", "a", "--overwrite", "true", "b"]) == [
        "report", "--out=rep", "--overwrite", "true", "--runs+", "a", "--runs+", "b"]
    assert runs_as_options(["report", "--help"]) == ["report", "--help"]
    assert runs_as_options(["fit", "--data", "MedMNIST", "x"]) == ["fit", "--data", "MedMNIST", "x"]


def test_the_command_line_takes_folders_positionally(runs, tmp_path, capsys):
    main(["report", str(runs / "a"), str(runs / "b"), "--out", str(tmp_path / "rep")])

    assert "4 finished runs in 2 groups" in capsys.readouterr().out
    rows = read_rows(tmp_path / "rep" / "report.csv")
    assert set(rows) == {("organamnist", "FedAvg", ""), ("organamnist", "Local", "")}
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(runs / "a"), "--out", str(tmp_path / "rep")])
    assert exit_info.value.code == 2
    assert "--overwrite true" in capsys.readouterr().err


def test_hparams_are_the_settings_and_the_final_metrics():
    config = {"data": {"class_path": "fedhb.data.MedMNIST", "init_args": {"flag": "organamnist", "root": "/d"}},
              "algorithm": {"class_path": "fedhb.algorithms.EPFL", "init_args": {"lam": 0.3}}, "seed": 1,
              "partition": {"alpha": 0.1, "split": [0.4, 0.3, 0.3], "group_by": None}, "out_dir": "/r"}
    summary = {"algorithm": "EPFL", "dataset": "organamnist", "seed": 1, "bytes_total": 10, "wall_time_s": 2.5,
               "algorithm_options": {"lam": 0.3, "layers": "all"},
               "final": {"personalized_acc": 0.5, "global_acc": None, "worst_client_acc": 0.25}}

    params, metrics = tensorboard_hparams(config, summary)

    own = {"algorithm": "EPFL", "dataset": "organamnist", "seed": 1, "data.flag": "organamnist", "algorithm.lam": 0.3,
           "algorithm.layers": "all", "partition.alpha": 0.1, "partition.split": "[0.4, 0.3, 0.3]",
           "partition.group_by": "none"}
    assert {k: params[k] for k in own} == own
    # Every other registered option is a column too, neutral here: NaN for numbers, n/a for text.
    assert math.isnan(params["algorithm.mu"]) and math.isnan(params["data.sampling_rate"])
    assert params["data.pad"] == "n/a" and params["algorithm.distance"] == "n/a"
    assert metrics == {"final/personalized_acc": 0.5, "final/worst_client_acc": 0.25, "final/bytes_total": 10.0,
                       "final/wall_time_s": 2.5}
    assert "out_dir" not in setting(config) and "seed" not in setting(config)


def test_every_run_logs_the_same_hparam_columns_with_the_same_types():
    """TensorBoard takes the HParams columns from the first run it reads: EPFL on MedMNIST and FedALA on PTB-XL must
    log the same names, each with one type, or one of them loses its columns."""
    epfl = ({"data": {"class_path": "fedhb.data.MedMNIST", "init_args": {"flag": "organamnist", "size": 28}},
             "algorithm": {"class_path": "fedhb.algorithms.EPFL", "init_args": {"lam": 0.3, "layers": "all"}},
             "partition": {"alpha": 0.1}},
            {"algorithm": "EPFL", "dataset": "organamnist", "seed": 0, "final": {}})
    fedala = ({"data": {"class_path": "fedhb.data.PTBXL", "init_args": {"sampling_rate": 500, "folds": None}},
               "algorithm": {"class_path": "fedhb.algorithms.FedALA", "init_args": {"layers": 2, "eta": 1.0}},
               "partition": {"alpha": 0.5}},
              {"algorithm": "FedALA", "dataset": "ptbxl", "seed": 1, "final": {}})

    a, _ = tensorboard_hparams(*epfl)
    b, _ = tensorboard_hparams(*fedala)

    assert set(a) == set(b)
    assert {"algorithm.lam", "algorithm.eta", "data.flag", "data.size", "data.sampling_rate"} <= set(a)
    for key in a:
        assert isinstance(a[key], str) == isinstance(b[key], str), (key, a[key], b[key])
    assert a["algorithm.lam"] == 0.3 and math.isnan(b["algorithm.lam"])
    assert a["data.flag"] == "organamnist" and b["data.flag"] == "n/a"
    assert a["algorithm.layers"] == "all" and b["algorithm.layers"] == "2"  # EPFL's layers is text, so all are
    assert b["data.sampling_rate"] == 500.0 and math.isnan(a["data.sampling_rate"])
    assert b["data.folds"] == "none"


def many_settings(root, n, rounds=1):
    """``n`` single-seed runs of two algorithms that differ in three options each (labels that used to run off)."""
    combos = [(alg, alpha, lr, r) for alg in ("EPFL", "FedAvg") for alpha in (0.1, 0.5, 1.0)
              for lr in (0.01, 0.05) for r in (8, 16)]
    for i, (alg, alpha, lr, r) in enumerate(combos[:n]):
        accs = [0.5 + 0.01 * i + 0.02 * t for t in range(rounds)]
        write_run(root / f"run{i}", "organamnist", alg, 0, accs, 1000 * (i + 1),
                  options={"partition.alpha": alpha, "optim.lr": lr, "model.lora.r": r,
                           "model.backbone": "google/vit-base-patch16-224-in21k"})
    return root


@pytest.mark.parametrize("n", [1, 20])
def test_figures_stay_readable_from_one_to_twenty_runs(n, tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from fedhb.report import dataset_figure, group_runs, line_styles

    root = many_settings(tmp_path / "runs", n)
    groups = group_runs([load_run(p) for p in find_runs([root])])
    styles = line_styles([g.name for g in groups])

    for x_name in ("round", "bytes"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # matplotlib's constrained_layout warnings included
            fig = dataset_figure(groups, "personalized_acc", x_name, styles)
            FigureCanvasAgg(fig).draw()
        ax = fig.axes[0]
        figure_box, axes_box = fig.bbox, ax.get_window_extent()
        legend_box = fig.legends[0].get_window_extent()
        assert len(ax.lines) == n  # every run drawn
        assert axes_box.width > 0.8 * figure_box.width  # the legend does not squeeze the plot
        assert legend_box.y1 <= axes_box.y0 and not legend_box.overlaps(axes_box)  # below it, covering nothing
        for box in (legend_box, ax.title.get_window_extent()):
            assert box.x0 >= 0 and box.x1 <= figure_box.width and box.y1 <= figure_box.height  # nothing cut off
        labels = [t.get_text() for t in fig.legends[0].get_texts()]
        assert max(map(len, labels)) <= 20, labels  # short labels, the options are in report.md's table
        ticks = ax.get_yticks()
        assert np.diff(ticks).min() >= 0.5  # percentage points, not ±0.04 % around a flat value
        if x_name == "round":
            assert [t.get_text() for t in ax.get_xticklabels()] == ["1"]  # one round: one integer tick
    assert len(set(styles.values())) == n  # colour, marker and dash differ for every run


def test_the_report_table_is_the_key_to_the_short_labels(tmp_path):
    result = write_report([many_settings(tmp_path / "runs", 3)], tmp_path / "report")

    text = (tmp_path / "report" / "report.md").read_text()
    assert [g.name for g in result.groups] == ["EPFL-a", "EPFL-b", "EPFL-c"]
    # Only the options that differ between the runs (partition.alpha is 0.1 in all three).
    assert "| EPFL-a | model.lora.r=16, optim.lr=0.01 | 1 |" in text
    assert "| EPFL-c | model.lora.r=8, optim.lr=0.05 | 1 |" in text
    assert read_rows(tmp_path / "report" / "report.csv")[
        ("organamnist", "EPFL", "model.lora.r=8, optim.lr=0.05")]["label"] == "EPFL-c"


def test_an_unknown_metric_is_refused_before_anything_is_written(runs, tmp_path, capsys):
    with pytest.raises(ValueError, match="--metric worst_acc: no run records it; did you mean worst_client_acc?"):
        write_report([runs / "a"], tmp_path / "report", metric="worst_acc")
    assert not (tmp_path / "report").exists()

    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(runs / "a"), "--out", str(tmp_path / "report"), "--metric", "worst_acc"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "did you mean worst_client_acc" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_a_run_copied_to_another_folder_is_a_duplicate_not_a_second_seed(runs, tmp_path):
    shutil.copytree(runs / "a" / "fedavg0", tmp_path / "runs" / "copy" / "fedavg0")
    shutil.copytree(runs / "a" / "fedavg0", tmp_path / "runs" / "orig" / "fedavg0")

    result = write_report([tmp_path / "runs"], tmp_path / "report")

    row = read_rows(tmp_path / "report" / "report.csv")[("organamnist", "FedAvg", "")]
    assert row["runs"] == "1" and row["personalized_acc_std"] == ""  # not "2 seeds, ± 0.00"
    (dup,) = result.excluded
    assert dup.status == "duplicate" and dup.path.parent.name == "orig"
    assert "same dataset, algorithm, options and seed (0)" in dup.reason and "copy/fedavg0" in dup.reason
    assert "| duplicate |" in (tmp_path / "report" / "report.md").read_text()


def test_a_run_of_another_task_is_reported_in_its_own_columns(tmp_path):
    """A segmentation run names its columns in summary.json (task_columns): the table shows them, its first column
    is the default metric plotted, and a run whose first column is NaN is the one called diverged."""
    from fedhb.record import task_columns
    from fedhb.tasks.segmentation import Segmentation

    for seed, dice in ((0, 0.5), (1, 0.7), (2, None)):
        folder = tmp_path / "runs" / f"seg{seed}"
        write_run(folder, "brats", "FedAvg", seed, [0.4, 0.6])
        records = [{"round": t, "personalized_dice": d, "worst_client_dice": 0.1, "personalized_hd95": 9.0 - t,
                    "global_dice": None, "global_hd95": None, "bytes_total": 1000 * t}
                   for t, d in ((1, 0.3), (2, dice))]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        summary = json.loads((folder / "summary.json").read_text())
        summary.update(final=records[-1], task_columns=task_columns(Segmentation.fields))
        (folder / "summary.json").write_text(json.dumps(summary))

    result = write_report([str(tmp_path / "runs")], tmp_path / "report")

    [row] = result.rows
    assert row["runs"] == 2 and row["personalized_dice_mean"] == pytest.approx(0.6)
    assert row["personalized_hd95_mean"] == pytest.approx(7.0) and "personalized_acc_mean" not in row
    text = (tmp_path / "report" / "report.md").read_text()
    assert "personalized Dice (%)" in text and "HD95 (mm)" in text and "personalized acc" not in text
    [failed] = result.excluded
    assert failed.reason == "final personalized_dice is not finite (the federation diverged?)"
    assert any("personalized_dice" in p.name for p in result.files)


def test_a_multimodal_run_is_reported_by_the_modalities_its_clients_hold(tmp_path):
    """summary.json's by_modalities becomes a table: per group and set, the mean over seeds of the mean client score
    of that set's clients, the worst client's in brackets; a group without a set shows a dash."""
    sets = {0: {"text+tabular": (0.6, 0.5), "tabular": (0.4, 0.3)},
            1: {"text+tabular": (0.8, 0.7), "tabular": (0.2, 0.1)}}
    for seed, by in sets.items():
        folder = tmp_path / "runs" / f"fedavg{seed}"
        write_run(folder, "padchest", "FedAvg", seed, [0.5, 0.6])
        summary = json.loads((folder / "summary.json").read_text())
        summary["by_modalities"] = {name: {"clients": [0, 1] if name == "text+tabular" else [2],
                                           "mean_client_acc": m, "worst_client_acc": w} for name, (m, w) in by.items()}
        (folder / "summary.json").write_text(json.dumps(summary))
    folder = tmp_path / "runs" / "local0"
    write_run(folder, "padchest", "Local", 0, [0.5, 0.6])
    summary = json.loads((folder / "summary.json").read_text())
    summary["by_modalities"] = {"text+tabular": {"clients": [0, 1], "mean_client_acc": 0.9, "worst_client_acc": None}}
    (folder / "summary.json").write_text(json.dumps(summary))

    write_report([str(tmp_path / "runs")], tmp_path / "report")

    text = (tmp_path / "report" / "report.md").read_text()
    assert "| run | text+tabular (2) | tabular (1) |" in text
    # FedAvg: text+tabular mean (0.6, 0.8) = 70.00 ± 14.14, worst mean 60.00; tabular 30.00 ± 14.14, worst 20.00.
    assert "| FedAvg | 70.00 ± 14.14 (60.00) | 30.00 ± 14.14 (20.00) |" in text
    assert "| Local | 90.00 | — |" in text


def test_a_unimodal_report_has_no_table_by_modalities(made):
    report, out = made
    assert (out / "report.md").is_file() and "By the modalities a client holds" not in (out / "report.md").read_text()
