"""``fedhb report``: a folder of runs into the paper's table and figures.

``fedhb report runs/ --out report/`` finds every run folder below ``runs/`` (a folder with ``summary.json``,
``metrics.jsonl``, ``config.yaml`` or a grid's ``grid_error.txt``), groups the finished runs by dataset and algorithm
over seeds and writes ``report.md``, ``report.csv`` and two PNG figures per dataset. Runs that did not finish, or
finished without a usable final evaluation, are listed with the reason and never averaged.

Numbers come from the final evaluated round of each run (``summary.json``'s ``final`` record, which is the last line of
``metrics.jsonl``), bytes and wall time from the summary. Runs of one dataset and algorithm whose configs differ in
anything but the seed, the output folder, the data location, devices and checkpointing are kept apart, labelled by
the options that differ, so that two settings are never silently averaged; a run with the options and seed of another
(a copy in a second folder) is listed as a duplicate, not counted as a second seed. In the figures each setting is a
short name (``EPFL-a``) that the table spells out, and the legend sits below the plot, so 1 to 20 settings stay
readable.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedhb.config import is_result_neutral
from fedhb.io import read_jsonl, write_atomic
from fedhb.record import PER_CLIENT, Field, columns_of, final_keys, report_columns

#: Written by ``benchmarks/fhbench/grid.py`` when a cell fails; its last line is the error.
GRID_ERROR = "grid_error.txt"
#: Files that mark a folder as a run folder.
RUN_MARKERS = ("summary.json", "metrics.jsonl", "config.yaml", GRID_ERROR)


#: The table's columns for classification runs: the recorded fields with a report title (:mod:`fedhb.record`), in
#: its report order; a run of another task names its own in ``summary.json`` (``task_columns``).
METRICS = report_columns()
Metric = Field
#: Whole-run values, read from ``summary.json`` rather than its final round.
_SUMMARY_KEYS = tuple(f.key for f in METRICS if f.summary)
#: Privacy columns, shown when some run has them: the ε reached (``summary.json``'s ``privacy``; runs without DP
#: show ``—``) and the membership-inference audit (``audit``, averaged over clients); lower is more private.
PRIVACY_METRICS = (
    Field("epsilon", None, "ε", "epsilon", higher_is_better=False, summary=True),
    Field("lira_auc", None, "MIA AUC (LiRA)", "auc", higher_is_better=False, summary=True),
    Field("lira_tpr_at_1pct_fpr", None, "MIA TPR @1% FPR", "fraction", higher_is_better=False, summary=True),
    Field("loss_auc", None, "MIA AUC (loss)", "auc", higher_is_better=False, summary=True),
)
_PRIVACY_KEYS = tuple(f.key for f in PRIVACY_METRICS)


@dataclass
class Run:
    """One run folder as read from disk."""

    path: Path
    status: str
    """``finished``, ``unfinished``, ``failed`` or ``duplicate`` (same options and seed as another run)."""
    reason: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def dataset(self) -> str:
        return str(self.summary.get("dataset") or _dig(self.config, "data.init_args.flag") or "?")

    @property
    def algorithm(self) -> str:
        name = self.summary.get("algorithm")
        if name is None:
            name = str(_dig(self.config, "algorithm.class_path") or "?").rsplit(".", 1)[-1]
        return str(name)

    @property
    def seed(self) -> Any:
        return self.summary.get("seed", self.config.get("seed"))

    def value(self, key: str) -> float:
        """The run's final value of a metric (NaN where it is not defined, e.g. global accuracy of Local)."""
        if key == "epsilon":
            value = (self.summary.get("privacy") or {}).get("epsilon")
            return math.inf if value is None and self.summary.get("privacy") else (
                float(value) if isinstance(value, (int, float)) else math.nan)
        source = (self.summary.get("audit") or {}) if key in _PRIVACY_KEYS else (
            self.summary if key in _SUMMARY_KEYS else (self.summary.get("final") or {}))
        value = source.get(key)
        return float(value) if isinstance(value, (int, float)) else math.nan


@dataclass
class Group:
    """Finished runs of one dataset, algorithm and setting, one per seed."""

    dataset: str
    algorithm: str
    setting: str
    runs: list[Run]
    short: str = ""
    """The group's name in its dataset's figures and table: the algorithm, plus a letter when the algorithm ran in
    several settings (``EPFL-a``); the table spells out each letter's options."""

    @property
    def label(self) -> str:
        return f"{self.algorithm} ({self.setting})" if self.setting else self.algorithm

    @property
    def name(self) -> str:
        return self.short or self.algorithm

    def values(self, key: str) -> np.ndarray:
        return np.array([r.value(key) for r in self.runs], dtype=np.float64)


@dataclass
class Report:
    """What ``write_report`` produced."""

    groups: list[Group]
    rows: list[dict[str, Any]]
    excluded: list[Run]
    files: list[Path]


# -- reading --------------------------------------------------------------------------------------------------------
def _dig(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Every run folder at or below ``paths``, sorted; a run folder's own subfolders (``logs/``) are not searched."""
    found: dict[Path, None] = {}
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise FileNotFoundError(f"fedhb report: {path} does not exist; pass run folders or folders that hold them")
        if not path.is_dir():
            raise ValueError(f"fedhb report: {path} is a file; pass run folders (holding summary.json, metrics.jsonl "
                             f"and config.yaml) or folders that hold them")
        for root, dirs, files in os.walk(path):
            if any(marker in files for marker in RUN_MARKERS):
                found[Path(root).resolve()] = None
                dirs.clear()
            else:
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(found)


def load_run(path: Path) -> Run:
    """Read a run folder and decide whether it can be averaged; never raises for a damaged folder."""
    config: dict[str, Any] = {}
    if (path / "config.yaml").exists():
        try:
            config = yaml.safe_load((path / "config.yaml").read_text()) or {}
        except yaml.YAMLError as err:
            return Run(path, "failed", f"config.yaml is not valid YAML ({str(err).splitlines()[0]})")
    history: list[dict[str, Any]] = []
    if (path / "metrics.jsonl").exists():
        try:
            history = read_jsonl(path / "metrics.jsonl")
        except json.JSONDecodeError as err:
            return Run(path, "failed", f"metrics.jsonl has a malformed line ({err})", config=config)
    if not (path / "summary.json").exists():
        if (path / GRID_ERROR).exists():
            lines = [line for line in (path / GRID_ERROR).read_text().splitlines() if line.strip()]
            return Run(path, "failed", lines[-1].strip() if lines else GRID_ERROR, config=config, history=history)
        rounds = _dig(config, "federation.rounds")
        done = f"last evaluated round {history[-1]['round']}" if history else "no evaluated round"
        of = f" of {rounds}" if rounds is not None else ""
        return Run(path, "unfinished", f"no summary.json; {done}{of}", config=config, history=history)
    try:
        summary = json.loads((path / "summary.json").read_text())
    except json.JSONDecodeError as err:
        return Run(path, "failed", f"summary.json is not valid JSON ({err})", config=config, history=history)
    run = Run(path, "finished", summary=summary, config=config, history=history)
    if not isinstance(summary, dict) or "dataset" not in summary or "algorithm" not in summary:
        return Run(path, "failed", "summary.json lacks dataset or algorithm (not written by fedhb fit?)",
                   config=config, history=history)
    if not summary.get("final"):
        run.status, run.reason = "failed", "summary.json has no evaluated round"
    elif math.isnan(run.value(key := report_columns(columns_of(summary))[0].key)):
        run.status, run.reason = "failed", f"final {key} is not finite (the federation diverged?)"
    return run


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            # ``init_args`` is how a plug-in's options are spelled in YAML, not part of the option's name.
            name = prefix if key == "init_args" else (f"{prefix}.{key}" if prefix else str(key))
            out.update(_flatten(value, name))
        return out
    return {prefix: json.dumps(tree) if isinstance(tree, (list, tuple)) else tree}


def _optional_group_defaults() -> dict[str, Any]:
    """The defaults of the option groups that ``config.yaml`` holds only when they are used (``privacy``,
    ``secure_aggregation``, ``audit``), flattened: a run that leaves one at its default and a run without it have the
    same setting."""
    import dataclasses

    from fedhb.config import AuditArgs, PrivacyArgs, SecureAggregationArgs

    groups: dict[str, Any] = {"privacy": PrivacyArgs(), "secure_aggregation": SecureAggregationArgs(),
                              "audit": AuditArgs()}
    return _flatten({k: dataclasses.asdict(v) for k, v in groups.items()})


def setting(config: dict[str, Any]) -> dict[str, Any]:
    """The options of a run that can change its numbers, flattened to dotted names, seed excluded (and the optional
    groups' options left at their defaults)."""
    defaults = _optional_group_defaults()
    return {k: v for k, v in _flatten(config).items() if k != "seed" and not is_result_neutral(k)
            and not (k in defaults and v == defaults[k])}


def group_runs(runs: list[Run]) -> list[Group]:
    """Finished runs by (dataset, algorithm, setting), sorted by dataset then algorithm."""
    by_pair: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        if run.status == "finished":
            by_pair.setdefault((run.dataset, run.algorithm), []).append(run)
    groups = []
    for (dataset, algorithm), pair_runs in sorted(by_pair.items()):
        settings = [setting(r.config) for r in pair_runs]
        keys = sorted({k for s in settings for k in s})
        differing = [k for k in keys if len({json.dumps(s.get(k), sort_keys=True, default=str) for s in settings}) > 1]
        split: dict[str, list[Run]] = {}
        for run, s in zip(pair_runs, settings):
            label = ", ".join(f"{k}={s.get(k)}" for k in differing)
            split.setdefault(label, []).append(run)
        ordered = sorted(split.items())
        for k, (label, members) in enumerate(ordered):
            members.sort(key=lambda r: (str(r.seed), str(r.path)))
            short = f"{algorithm}-{_letters(k)}" if len(ordered) > 1 else algorithm
            groups.append(Group(dataset, algorithm, label, members, short))
    return groups


def _letters(k: int) -> str:
    """a, b, ..., z, aa, ab, ...: the settings of one algorithm, in the table's order."""
    word = ""
    k += 1
    while k:
        k, rest = divmod(k - 1, 26)
        word = chr(ord("a") + rest) + word
    return word


def mark_duplicates(runs: list[Run]) -> list[Run]:
    """Finished runs of the same dataset, algorithm, options and seed as an earlier one (by path), marked
    ``duplicate`` so that they are listed, not averaged: a copy of a run would count as a second seed and shrink the
    standard deviation towards 0."""
    first: dict[str, Run] = {}
    marked = []
    for run in sorted(runs, key=lambda r: str(r.path)):
        if run.status != "finished":
            continue
        key = json.dumps([run.dataset, run.algorithm, str(run.seed), setting(run.config)], sort_keys=True, default=str)
        if key in first:
            run.status = "duplicate"
            run.reason = (f"same dataset, algorithm, options and seed ({run.seed}) as `{_shown(first[key].path)}`, "
                          "which is averaged instead")
            marked.append(run)
        else:
            first[key] = run
    return marked


# -- the table ------------------------------------------------------------------------------------------------------
def _mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1) over the defined values; std is NaN for fewer than two."""
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return math.nan, math.nan
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else math.nan


def columns_for(groups: Sequence[Group]) -> tuple[Metric, ...]:
    """The table's columns: the runs' tasks' (:data:`METRICS` for classification; several tasks' in the order their
    runs come), then the privacy columns that some run records."""
    task: dict[str, Field] = {}
    for r in (r for g in groups for r in g.runs):
        task.update({f.key: f for f in columns_of(r.summary) if f.key not in task})
    extra = tuple(m for m in PRIVACY_METRICS if any(not math.isnan(r.value(m.key)) for g in groups for r in g.runs))
    return report_columns(task.values()) + extra


def summarize(groups: list[Group], columns: Sequence[Metric] = METRICS) -> list[dict[str, Any]]:
    """One row per group: mean and std of every metric, and the metrics in which the row is best in its dataset."""
    rows = []
    for g in groups:
        row: dict[str, Any] = {"dataset": g.dataset, "algorithm": g.algorithm, "setting": g.setting, "label": g.name,
                               "runs": len(g.runs), "seeds": " ".join(str(r.seed) for r in g.runs)}
        for m in columns:
            row[f"{m.key}_mean"], row[f"{m.key}_std"] = _mean_std(g.values(m.key))
        row["best"] = []
        rows.append(row)
    for dataset in {r["dataset"] for r in rows}:
        members = [r for r in rows if r["dataset"] == dataset]
        for m in columns:
            means = [r[f"{m.key}_mean"] for r in members if not math.isnan(r[f"{m.key}_mean"])]
            if not means:
                continue
            target = max(means) if m.higher_is_better else min(means)
            for r in members:
                if math.isclose(r[f"{m.key}_mean"], target, rel_tol=1e-12, abs_tol=1e-15):
                    r["best"].append(m.key)
    return rows


def human_bytes(n: float) -> str:
    """Decimal units, as network volumes are quoted: ``196.6 kB``."""
    if math.isnan(n):
        return "—"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _cell(m: Metric, mean: float, std: float) -> str:
    if math.isnan(mean):
        return "—"
    if m.kind == "fraction":
        text = f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if not math.isnan(std) else "")
    elif m.kind == "epsilon":
        text = "∞" if math.isinf(mean) else f"{mean:.2f}" + (f" ± {std:.2f}" if not math.isnan(std) and std > 0 else "")
    elif m.kind == "auc":
        text = f"{mean:.3f}" + (f" ± {std:.3f}" if not math.isnan(std) else "")
    elif m.kind == "bytes":
        text = human_bytes(mean) + (f" ± {human_bytes(std)}" if not math.isnan(std) and std > 0 else "")
    else:
        text = f"{mean:.1f}" + (f" ± {std:.1f}" if not math.isnan(std) else "") + " s"
    return text


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def modality_table(groups: Sequence[Group]) -> list[str]:
    """Markdown lines of a multimodal dataset's scores by the modalities a client holds (``summary.json``'s
    ``by_modalities``): one row per group, one column per set of modalities in the order the runs list them; each
    cell the mean over seeds of the mean per-client score of the clients holding that set, and in brackets of the
    worst such client's. No lines when no run records scores by modalities."""
    sets: dict[str, int] = {}
    for r in (r for g in groups for r in g.runs):
        for name, entry in (r.summary.get("by_modalities") or {}).items():
            sets.setdefault(name, len(entry.get("clients", [])))
    if not sets:
        return []
    share = Metric(PER_CLIENT, None, kind="fraction")
    lines = ["By the modalities a client holds: the mean over seeds of the final per-client score (`client_acc`, the "
             "task's first per-client metric) averaged over the clients holding each set, the worst such client's in "
             "brackets; the number of clients of each set in the header.", "",
             "| run | " + " | ".join(f"{name} ({k})" for name, k in sets.items()) + " |",
             "|---|" + "---:|" * len(sets)]
    for g in groups:
        cells = []
        for name in sets:
            entries = [(r.summary.get("by_modalities") or {}).get(name) or {} for r in g.runs]
            mean, std = _mean_std(np.array([_number(e.get(f"mean_{PER_CLIENT}")) for e in entries]))
            worst, _ = _mean_std(np.array([_number(e.get(f"worst_{PER_CLIENT}")) for e in entries]))
            cells.append(_cell(share, mean, std) + ("" if math.isnan(worst) else f" ({_cell(share, worst, math.nan)})"))
        lines.append(f"| {g.name} | " + " | ".join(cells) + " |")
    return lines + [""]


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def markdown(rows: list[dict[str, Any]], groups: list[Group], excluded: list[Run], figures: dict[str, list[Path]],
             out: Path, sources: list[str], metric: str = "personalized_acc",
             columns: Sequence[Metric] = METRICS) -> str:
    lines = ["# fedhb report", "",
             f"{sum(len(g.runs) for g in groups)} finished runs in {len(groups)} groups, from "
             f"{', '.join(f'`{s}`' for s in sources)}. Each cell is the mean ± sample standard deviation over seeds of "
             "the run's final evaluated round; **bold** is the best in its dataset (highest accuracy and F1, fewest "
             "bytes, shortest wall time). Global accuracy is defined only for methods with one global model. An "
             "algorithm run with several settings appears once per setting (`EPFL-a`, `EPFL-b`, the names in the "
             "figures), with the options that differ.", ""]
    for dataset in sorted({r["dataset"] for r in rows}):
        lines += [f"## {dataset}", "",
                  "| run | options | seeds | " + " | ".join(str(m.title) for m in columns) + " |",
                  "|---|---|---|" + "---:|" * len(columns)]
        for row in (r for r in rows if r["dataset"] == dataset):
            cells = []
            for m in columns:
                text = _cell(m, row[f"{m.key}_mean"], row[f"{m.key}_std"])
                cells.append(f"**{text}**" if m.key in row["best"] else text)
            options = row["setting"].replace("|", "/") or "—"
            lines.append(f"| {row['label']} | {options} | {row['runs']} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += modality_table([g for g in groups if g.dataset == dataset])
        for png in figures.get(dataset, []):
            lines += [f"![{png.stem.replace('_', ' ')}]({png.relative_to(out)})", ""]
        if not figures.get(dataset):
            lines += [f"No figure: no run of {dataset} records `{metric}` in its metrics.jsonl.", ""]
    if excluded:
        lines += ["## Runs not averaged", "", "| run | status | why |", "|---|---|---|"]
        lines += [f"| `{_shown(r.path)}` | {r.status} | {r.reason.replace('|', '/')} |" for r in excluded]
        lines.append("")
    first = columns[0]
    lines += ["## Runs averaged", "", f"| dataset | algorithm | seed | {first.title} | run |", "|---|---|---|---:|---|"]
    for g in groups:
        for r in g.runs:
            lines.append(f"| {g.dataset} | {g.name} | {r.seed} | {_cell(first, r.value(first.key), math.nan)} | "
                         f"`{_shown(r.path)}` |")
    return "\n".join(lines) + "\n"


def table_csv(rows: list[dict[str, Any]], columns: Sequence[Metric] = METRICS) -> str:
    """Raw numbers (accuracies as fractions, bytes, seconds); empty where undefined."""
    names = ["dataset", "algorithm", "setting", "label", "runs", "seeds"]
    names += [f"{m.key}_{stat}" for m in columns for stat in ("mean", "std")] + ["best"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, names, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else ";".join(v) if isinstance(v, list)
                             else repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


# -- figures --------------------------------------------------------------------------------------------------------
def curves(group: Group, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rounds evaluated in every seed, and per round the metric (seeds x rounds) and cumulative bytes (mean)."""
    histories = [{rec["round"]: rec for rec in r.history} for r in group.runs if r.history]
    if not histories:
        return np.zeros(0), np.zeros((0, 0)), np.zeros(0)
    rounds = sorted(set.intersection(*(set(h) for h in histories)))
    values = np.array([[h[t].get(metric) if h[t].get(metric) is not None else math.nan for t in rounds]
                       for h in histories], dtype=np.float64)
    sent = np.array([[h[t].get("bytes_total") or 0 for t in rounds] for h in histories], dtype=np.float64)
    return np.array(rounds), values, sent.mean(0)


def _save(fig: Any, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


#: Figure width (inches). Its height grows with the legend, which sits below the axes, so that neither the curves nor
#: the plotting area give way to it whatever the number of runs.
_WIDTH = 7.2


def line_styles(names: Sequence[str]) -> dict[str, tuple[Any, str, str]]:
    """``{name: (colour, marker, line style)}``, all different for up to 20 names (then colours repeat dashed).

    Ten distinct hues first (tab10); beyond ten, tab20's dark hues then its light ones, so neighbours differ.
    """
    from matplotlib import colormaps

    if len(names) <= 10:
        colours = [colormaps["tab10"](i) for i in range(10)]
    else:
        tab20 = colormaps["tab20"]
        colours = [tab20(i) for i in range(0, 20, 2)] + [tab20(i) for i in range(1, 20, 2)]
    markers, dashes = "osD^vP*Xph", ("-", "--", "-.", ":")
    return {name: (colours[i % len(colours)], markers[i % len(markers)], dashes[(i // len(colours)) % len(dashes)])
            for i, name in enumerate(names)}


def _value_limits(lo: float, hi: float, percent: bool) -> tuple[float, float]:
    """The y range: the data with a margin, at least 5 points wide for percentages (a flat curve at 81.3 % gets
    ticks a point apart, not 0.01 apart) and within [0, 100] for them."""
    floor = 5.0 if percent else max(abs(hi), abs(lo), 1e-12) * 0.1
    if hi - lo < floor:
        middle = (hi + lo) / 2
        lo, hi = middle - floor / 2, middle + floor / 2
    margin = 0.06 * (hi - lo)
    lo, hi = lo - margin, hi + margin
    if percent:
        if lo < 0:
            lo, hi = 0.0, min(100.0, hi - lo)
        if hi > 100:
            lo, hi = max(0.0, lo - (hi - 100)), 100.0
    return lo, hi


def dataset_figure(groups: list[Group], metric: str, x_name: str,
                   styles: dict[str, tuple[Any, str, str]]) -> Any | None:
    """The mean over seeds of ``metric`` for each group against ``x_name`` (``round`` or ``bytes``, cumulative),
    with a ±1 std band; ``None`` when no group records the metric."""
    # Figure without pyplot: no global backend switch inside a user's notebook or script.
    import textwrap
    import warnings

    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator

    percent = metric.endswith(("acc", "f1", "auroc"))
    scale = 100.0 if percent else 1.0
    drawn = []
    for g in groups:
        rounds, values, sent = curves(g, metric)
        if len(rounds) == 0 or np.isnan(values).all():
            continue
        with warnings.catch_warnings():  # a round no seed evaluated is NaN, not a warning
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(values, axis=0) * scale
            std = np.nanstd(values, axis=0, ddof=1) * scale if values.shape[0] > 1 else np.zeros_like(mean)
        drawn.append((g, rounds if x_name == "round" else sent, mean, np.nan_to_num(std), values.shape[0]))
    if not drawn:
        return None
    labels = [f"{g.name} (n={n})" for g, *_, n in drawn]
    # Legend columns from the longest label (about 0.075 in per character at the small font, plus the line sample).
    columns = max(1, min(len(labels), int(_WIDTH // (0.075 * max(map(len, labels)) + 0.7))))
    rows = -(-len(labels) // columns)
    fig = Figure(figsize=(_WIDTH, 4.0 + 0.22 * rows), layout="constrained")
    ax = fig.add_subplot()
    for (g, x, mean, std, _), label in zip(drawn, labels):
        colour, marker, dash = styles[g.name]
        ax.plot(x, mean, color=colour, linestyle=dash, marker=marker if len(x) < 30 else None, markersize=4,
                label=label)
        if np.any(std > 0):
            ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.15, linewidth=0)
    lows = [np.nanmin(mean - std) for _, _, mean, std, _ in drawn]
    highs = [np.nanmax(mean + std) for _, _, mean, std, _ in drawn]
    ax.set_ylim(*_value_limits(float(min(lows)), float(max(highs)), percent))
    xs = np.unique(np.concatenate([x for _, x, *_ in drawn]))
    if x_name == "round":
        ax.set_xlabel("round")
        if len(xs) <= 12:
            ax.xaxis.set_major_locator(FixedLocator(xs.tolist()))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        ax.set_xlabel("cumulative bytes communicated (up + down)")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: human_bytes(v)))
        ax.xaxis.set_major_locator(FixedLocator(xs.tolist()) if len(xs) <= 3 else MaxNLocator(nbins=5))
    if xs[0] == xs[-1]:  # one x value: centre it instead of letting matplotlib spread ticks over a tiny interval
        pad = max(abs(float(xs[0])) * 0.1, 1.0)
        ax.set_xlim(float(xs[0]) - pad, float(xs[0]) + pad)
    pretty = metric.replace("_", " ")
    ax.set_ylabel(f"{pretty} (%)" if percent else pretty)
    dataset = groups[0].dataset
    ax.set_title(textwrap.fill(f"{dataset}: {pretty} by {'round' if x_name == 'round' else 'bytes sent'}", 70),
                 loc="left")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=columns, fontsize="small", frameon=False,
               title="mean ± std over n seeds; options of each run in report.md", title_fontsize="small")
    return fig


def plot_dataset(groups: list[Group], metric: str, out: Path,
                 styles: dict[str, tuple[Any, str, str]] | None = None) -> list[Path]:
    """``{dataset}_{metric}_vs_round.png`` and ``..._vs_bytes.png`` (see :func:`dataset_figure`)."""
    styles = styles or line_styles([g.name for g in groups])
    written = []
    for x_name in ("round", "bytes"):
        fig = dataset_figure(groups, metric, x_name, styles)
        if fig is None:
            continue
        path = out / f"{groups[0].dataset}_{metric}_vs_{x_name}.png"
        _save(fig, path)
        written.append(path)
    return written


def epsilon_figure(groups: list[Group], metric: str) -> Any | None:
    """Utility against privacy: each algorithm's mean final ``metric`` at each ε it ran with (a line through its
    settings, ±1 std over seeds), and its runs without DP as a dashed line; ``None`` when no group has a finite ε."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    percent = metric.endswith(("acc", "f1", "auroc"))
    scale = 100.0 if percent else 1.0
    by_algorithm: dict[str, list[tuple[float, float, float]]] = {}
    plain: dict[str, tuple[float, Group]] = {}
    for g in groups:
        eps, values = g.values("epsilon"), g.values(metric) * scale
        mean, std = _mean_std(values)
        if math.isnan(mean):
            continue
        e = float(np.nanmean(eps)) if not np.isnan(eps).all() else math.nan
        if math.isnan(e):
            plain[g.algorithm] = (mean, g)
        elif math.isfinite(e):
            mode = (g.runs[0].summary.get("privacy") or {}).get("mode", "DP")
            by_algorithm.setdefault(f"{g.algorithm} ({mode}-level DP)", []).append(
                (e, mean, 0.0 if math.isnan(std) else std))
    if not by_algorithm:
        return None
    fig = Figure(figsize=(_WIDTH, 4.4), layout="constrained")
    ax = fig.add_subplot()
    colours = line_styles(sorted(set(by_algorithm) | set(plain)))
    for name, points in sorted(by_algorithm.items()):
        points.sort()
        colour, marker, dash = colours[name]
        x, y, err = (np.array(v) for v in zip(*points))
        ax.errorbar(x, y, yerr=err, color=colour, marker=marker, linestyle=dash, capsize=3, label=name)
    for name, (mean, _) in sorted(plain.items()):
        colour, _, _ = colours[name]
        ax.axhline(mean, color=colour, linestyle="--", linewidth=1, label=f"{name} without DP")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "2468" else ""))
    ax.set_xlabel("ε (at each run's δ; smaller is more private)")
    pretty = metric.replace("_", " ")
    ax.set_ylabel(f"{pretty} (%)" if percent else pretty)
    ax.set_title(f"{groups[0].dataset}: {pretty} against ε", loc="left")
    ax.grid(alpha=0.3, which="both")
    fig.legend(loc="outside lower center", ncols=min(4, len(by_algorithm) + len(plain)), fontsize="small",
               frameon=False)
    return fig


# -- the command ----------------------------------------------------------------------------------------------------
def write_report(runs: Sequence[str | Path], out: str | Path = "report", metric: str | None = None,
                 overwrite: bool = False) -> Report:
    """Read ``runs`` (run folders or folders holding them) and write the report into ``out``.

    Returns:
        The groups, the table rows, the runs that were not averaged and the files written.
    """
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        raise ModuleNotFoundError("fedhb report draws figures with matplotlib: pip install 'fedhb[report]'") from None
    out = Path(out)
    if (out / "report.md").exists() and not overwrite:
        raise FileExistsError(f"--out {out} already holds a report (report.md); choose another --out or pass "
                              "--overwrite true to replace it")
    if not runs:
        raise ValueError("fedhb report: give at least one run folder or a folder of runs, e.g. fedhb report runs/")
    found = find_runs(list(runs))
    if not found:
        raise ValueError(f"fedhb report: no run folder under {', '.join(map(str, runs))} (a run folder holds the "
                         "summary.json, metrics.jsonl and config.yaml that fedhb fit writes)")
    loaded = [load_run(p) for p in found]
    mark_duplicates(loaded)
    groups = group_runs(loaded)
    excluded = [r for r in loaded if r.status != "finished"]
    if not groups:
        listing = "; ".join(f"{_shown(r.path)}: {r.status}, {r.reason}" for r in excluded[:5])
        raise ValueError(f"fedhb report: none of the {len(loaded)} runs found has finished ({listing})")
    columns = columns_for(groups)
    metric = metric or columns[0].key
    check_metric(metric, [r for g in groups for r in g.runs])
    rows = summarize(groups, columns)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, list[Path]] = {}
    for dataset in sorted({g.dataset for g in groups}):
        members = [g for g in groups if g.dataset == dataset]
        figures[dataset] = plot_dataset(members, metric, out)
        privacy = epsilon_figure(members, metric)
        if privacy is not None:
            path = out / f"{dataset}_{metric}_vs_epsilon.png"
            _save(privacy, path)
            figures[dataset].append(path)
    write_atomic(out / "report.csv", table_csv(rows, columns))
    write_atomic(out / "report.md", markdown(rows, groups, excluded, figures, out, [str(r) for r in runs], metric,
                                             columns))
    files = [out / "report.md", out / "report.csv"] + [p for ps in figures.values() for p in ps]
    return Report(groups, rows, excluded, files)


def recorded_metrics(runs: Sequence[Run]) -> list[str]:
    """The numeric keys of the runs' ``metrics.jsonl`` records (what ``--metric`` can plot), sorted."""
    keys = {k for r in runs for rec in r.history for k, v in rec.items()
            if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return sorted(keys)


def check_metric(metric: str, runs: Sequence[Run]) -> None:
    """Refuse a ``--metric`` that none of ``runs`` records, naming the closest one and those that exist."""
    import difflib

    known = recorded_metrics(runs)
    if metric in known:
        return
    close = difflib.get_close_matches(metric, known, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]}?" if close else "."
    raise ValueError(f"--metric {metric}: no run records it{hint} The runs record: {', '.join(known) or 'nothing'}")


def report(runs: list[str], out: str = "report", metric: str | None = None, overwrite: bool = False) -> None:
    """Compare runs: mean and std over seeds per dataset and algorithm, as a Markdown and CSV table and PNG figures.

    ``fedhb report runs/ --out report/`` reads every run folder below ``runs/``. Unfinished and failed runs are listed
    in the report, not averaged.

    Args:
        runs: Run folders, or folders that hold run folders at any depth (given as positional arguments).
        out: Folder for ``report.md``, ``report.csv`` and the figures.
        metric: The metric plotted against round and against bytes communicated (a key of ``metrics.jsonl``:
            ``personalized_acc``, ``worst_client_acc``, ``global_acc``, ``personalized_f1``, ``personalized_dice``,
            ...); default: the task's first column (``personalized_acc`` for classification); a key no run records
            is refused.
        overwrite: Replace an earlier report in ``out``.
    """
    result = write_report(runs, out, metric, overwrite)
    finished = sum(len(g.runs) for g in result.groups)
    duplicates = sum(r.status == "duplicate" for r in result.excluded)
    print(f"fedhb report: {finished} finished runs in {len(result.groups)} groups"
          + (f", {len(result.excluded)} not averaged (listed in report.md)" if result.excluded else "")
          + (f", of which {duplicates} duplicate{'s' if duplicates > 1 else ''} of another run (same options and seed)"
             if duplicates else "")
          + f"; wrote {', '.join(str(p) for p in result.files)}")


#: Options of ``fedhb report`` that stand alone; every other ``--option`` takes the next word as its value.
_FLAGS = ("-h", "--help", "--print_config")


def runs_as_options(argv: list[str]) -> list[str]:
    """``report A B --out R`` -> ``report --runs+ A --runs+ B --out R``: run folders may be given positionally.

    jsonargparse's ``CLI`` makes every parameter an option, and positional lists would take one word only; other
    commands' arguments are returned unchanged.
    """
    if not argv or argv[0] != "report":
        return list(argv)
    out, rest = ["report"], iter(argv[1:])
    positional: list[str] = []
    for word in rest:
        if word == "--":
            positional.extend(rest)
        elif word.startswith("-") and len(word) > 1:
            out.append(word)
            if "=" not in word and word not in _FLAGS:
                value = next(rest, None)
                if value is not None:
                    out.append(value)
        else:
            positional.append(word)
    for path in positional:
        out += ["--runs+", path]
    return out


# -- TensorBoard ----------------------------------------------------------------------------------------------------
#: The value of an HParams text column for a run that does not have the option (a FedAvg run's ``algorithm.lam``);
#: number columns get NaN.
NOT_APPLICABLE = "n/a"


def hparam_columns() -> dict[str, str]:
    """Every option of every registered algorithm and dataset, as ``{"algorithm.lam": "number", "data.flag": "text",
    ...}``: the columns that each run logs, whether it has the option or not.

    TensorBoard's HParams tab takes its columns from the first run it reads; with the same columns, logged with the
    same type, in every run, any mix of runs compares. A column is a number when every option of that name is
    annotated ``int`` or ``float`` (``None`` allowed), else text (``algorithm.layers`` is EPFL's ``all`` and FedALA's
    ``2``). Options that do not change a run's numbers (``data.root``) are left out, as in :func:`setting`.
    """
    from fedhb.registry import PLUGINS, init_options, known_plugins, plugin_class

    kinds: dict[str, str] = {}
    for key in PLUGINS:
        for name in known_plugins(key):
            for option, param in init_options(plugin_class(key, name)).items():
                column = f"{key}.{option}"
                if is_result_neutral(column):
                    continue
                kind = _column_kind(param)
                kinds[column] = kind if kinds.get(column, kind) == kind else "text"
    return dict(sorted(kinds.items()))


def _column_kind(param: Any) -> str:
    annotation = param.annotation
    if not isinstance(annotation, str):
        annotation = "" if annotation is param.empty else getattr(annotation, "__name__", str(annotation))
    parts = {p.strip() for p in annotation.split("|")} - {"None"}
    if parts and parts <= {"int", "float"}:
        return "number"
    default = param.default
    if not parts and isinstance(default, (int, float)) and not isinstance(default, bool):
        return "number"
    return "text"


def _hparam_value(value: Any, kind: str, present: bool) -> Any:
    """A run's value in a column of ``kind``: a float (NaN where absent or ``None``) or text."""
    if kind == "number":
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    if not present:
        return NOT_APPLICABLE
    if isinstance(value, bool):
        return "true" if value else "false"
    return "none" if value is None else str(value)


def tensorboard_hparams(config: dict[str, Any], summary: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    """What a run shows in TensorBoard's HParams tab: its settings, and its final metrics under ``final/...``.

    The settings are the same names for every algorithm (``partition.alpha``, ``optim.lr``, ...) plus every
    registered algorithm's and dataset's options (:func:`hparam_columns`): a run's own options with their values, the
    others as NaN (numbers) or ``n/a`` (text), so that every run has the same columns. Lists become text, ``None``
    becomes ``none``, so every value can be filtered on.
    """
    params: dict[str, Any] = {"algorithm": summary["algorithm"], "dataset": summary["dataset"], "seed": summary["seed"]}
    for key, value in setting(config).items():
        if key in ("algorithm.class_path", "data.class_path"):
            continue
        params[key] = "none" if value is None else value
    for key, value in (summary.get("algorithm_options") or {}).items():
        params.setdefault(f"algorithm.{key}", value)
    for column, kind in hparam_columns().items():
        params[column] = _hparam_value(params.get(column), kind, column in params)
    final = summary.get("final") or {}
    metrics = {f"final/{f.key}": (summary if f.summary else final).get(f.key) for f in final_keys()}
    return params, {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
