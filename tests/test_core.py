"""The core's contracts: a small algorithm contract, a task plug-in, one record definition, imports that follow the
layers, and LoRA naming in one file."""

from __future__ import annotations

import ast
import inspect
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import fedhb.algorithms as algorithms
from fedhb.algorithms import Algorithm, FedAvg
from fedhb.algorithms.base import Aggregate
from fedhb.config import FabricArgs, FederationArgs, ModelArgs, OptimArgs, PartitionArgs, is_result_neutral
from fedhb.record import LOOP_FIELDS, Field, report_columns, round_record, tensorboard_scalars
from fedhb.tasks import Classification, Task

ROOT = Path(__file__).resolve().parents[1]
#: What a new algorithm may override (the contract in fedhb/algorithms/base.py's docstring).
CONTRACT = {"setup", "init_client_state", "local_update", "upload", "aggregate", "global_state", "personalized_model",
            "state_dict", "load_state_dict"}


# -- the algorithm contract --------------------------------------------------------------------------------------------
def test_the_algorithm_base_has_the_contract_and_two_helpers_only():
    public = {n for n, v in vars(Algorithm).items() if not n.startswith("_") and callable(v)}

    assert public == CONTRACT | {"model_part", "hparams"}


def test_no_algorithm_overrides_anything_outside_the_contract():
    for name in algorithms.__all__:
        cls = getattr(algorithms, name)
        if not (inspect.isclass(cls) and issubclass(cls, Algorithm)) or cls is Algorithm:
            continue
        overridden = {n for klass in cls.__mro__[:-2] for n in vars(klass) if hasattr(Algorithm, n)
                      and not n.startswith("_") and callable(getattr(Algorithm, n))}
        assert overridden <= CONTRACT | {"hparams"}, (name, overridden - CONTRACT)


class MeanOfUploads(Algorithm):
    """A toy written against the contract: unweighted mean; local steps with a gradient clip and an L2 term."""

    has_global_model = True

    def __init__(self, clip: float = 1.0, l2: float = 0.01) -> None:
        self.clip, self.l2 = clip, l2
        self._global: dict[str, Tensor] | None = None

    def local_update(self, trainer, state):
        def l2(batch, out, rows):
            return self.l2 * sum(p.pow(2).sum() for p in trainer.trainable().values())

        def clip(params):
            torch.nn.utils.clip_grad_norm_(list(params.values()), self.clip)

        trainer.fit(loss=l2, before_step=clip)

    def aggregate(self, uploads, num_samples):
        ids = sorted(uploads)
        self._global = {k: torch.stack([uploads[i][k] for i in ids]).mean(0) for k in uploads[ids[0]]}
        return {i: self._global for i in ids}

    def global_state(self):
        return self._global


def test_a_toy_algorithm_of_under_40_lines_runs_a_federation_end_to_end(make_loop):
    assert len(inspect.getsource(MeanOfUploads).splitlines()) < 40
    algo = MeanOfUploads()
    loop = make_loop(algo, clients=3, rounds=2)

    results = [loop.run_round(r) for r in (1, 2)]

    assert not results[-1].failed and results[-1].metrics is not None
    assert 0 <= results[-1].metrics["personalized_acc"] <= 1 and results[-1].metrics["global_acc"] is not None
    glob = algo.global_state()
    for state in loop.states.values():  # every client holds the mean after the last round
        assert all(torch.equal(state[k], glob[k]) for k in glob)


class PoisonedMean(FedAvg):
    def local_update(self, trainer, state):
        if trainer.client == 1:
            trainer.load({k: torch.full_like(v, float("nan")) for k, v in trainer.read().items()})
        trainer.fit()


def test_a_failed_client_keeps_its_reason_in_its_status_and_the_warning(make_loop, capsys):
    loop = make_loop(PoisonedMean(), clients=3)

    result = loop.run_round(1)

    assert result.failed == {1: "non-finite loss or parameters"}
    assert "client 1 excluded from aggregation (non-finite loss or parameters: non-finite loss at step 0)" in \
        capsys.readouterr().out


def test_aggregate_reads_as_the_mapping_of_what_clients_receive():
    agg = Aggregate({0: {"w": torch.ones(1)}}, bytes_down={0: 3})

    assert list(agg) == [0] and agg[0]["w"].item() == 1.0 and len(agg) == 1 and Aggregate.of(agg) is agg
    assert Aggregate.of({1: {}}).received == {1: {}} and Aggregate.of({1: {}}).bytes_down is None


# -- the task plug-in --------------------------------------------------------------------------------------------------
def test_classification_scores_and_reduces_as_computed_by_hand():
    task = Classification("multi-class", 3)
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
    labels = torch.tensor([0, 1, 2, 2])

    row = task.score(logits, labels)
    metrics = task.reduce({0: row, 1: task.empty_score(), 2: torch.tensor([0.5, 0.5, math.nan, 2.0],
                                                                          dtype=torch.float64)})

    assert row[0].item() == 0.75 and row[-1].item() == 4 and task.width == 4
    assert metrics["personalized_acc"] == pytest.approx((0.75 + 0.5) / 2) and metrics["worst_client_acc"] == 0.5
    assert metrics["client_acc"]["0"] == 0.75 and metrics["client_acc"]["2"] == 0.5
    stats = task.global_stats(logits, labels) + task.global_stats(logits[:1], labels[:1])
    assert task.global_metrics(stats)["global_acc"] == pytest.approx(4 / 5)
    assert task.global_metrics(None) == {"global_acc": None, "global_f1": None}
    with pytest.raises(ValueError, match="unknown classification task"):
        Classification("regression", 1)


class Brier(Task):
    """A task written in a test file: the Brier score of the softmax, per client and for the global model."""

    score_names = ("brier",)
    selection_score = "brier"
    fields = (Field("personalized_brier", "personalized/brier", kind="loss", higher_is_better=False),
              Field("global_brier", "global/brier", kind="loss", higher_is_better=False))

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def head(self, in_features, dropout):
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, self.num_classes))

    def _per_sample(self, output, targets):
        onehot = torch.nn.functional.one_hot(targets, self.num_classes).to(output.dtype)
        return (output.softmax(1) - onehot).pow(2).sum(1)

    def loss(self, output, targets):
        return self._per_sample(output, targets).mean()

    def score(self, output, targets):
        n = len(targets)
        brier = float(self._per_sample(output, targets).mean()) if n else math.nan
        return torch.tensor([brier, float(n)], dtype=torch.float64)

    def reduce(self, scores):
        values = [float(r[0]) for r in scores.values() if r[1] > 0]
        return {"personalized_brier": float(np.mean(values)), "client_acc": {}}

    def global_stats(self, output, targets):
        return torch.tensor([float(self._per_sample(output, targets).sum()), float(len(targets))], dtype=torch.float64)

    def global_metrics(self, stats):
        return {"global_brier": None if stats is None else float(stats[0] / stats[1])}


def test_a_new_task_plugs_in_without_touching_the_loop_or_an_algorithm(tiny_data):
    from fedhb.build import build_loop
    from fedhb.client import ClientModule
    from fedhb.data.partition import partition_samples
    from fedhb.models import build_encoders
    from fedhb.strategy import make_fabric

    optim = OptimArgs(lr=0.05, schedule="constant", min_lr=0.0)
    torch.manual_seed(0)
    module = ClientModule(build_encoders(ModelArgs(), tiny_data), Brier(tiny_data.num_classes), optim)
    splits = partition_samples(tiny_data, "iid", 2, 0.5, 10, PartitionArgs().split, 0, None)
    loop = build_loop(make_fabric(FabricArgs(accelerator="cpu")), tiny_data, splits, FedAvg(), model=ModelArgs(),
                      federation=FederationArgs(rounds=1), optim=optim, seed=0, module=module)

    loop.run(None)

    record = loop.history[-1]
    assert 0 <= record["personalized_brier"] <= 2 and 0 <= record["global_brier"] <= 2
    assert list(record)[:3] == ["round", "personalized_brier", "global_brier"]
    assert "personalized/brier" in tensorboard_scalars(record, Brier.fields)


# -- one record definition ---------------------------------------------------------------------------------------------
def test_a_round_record_lists_the_task_fields_then_the_loops_then_the_per_client_scores():
    task = Classification("multi-class", 2)
    metrics = {**{f.key: 0.5 for f in task.fields}, "global_acc": None, "client_acc": {"0": 0.5}}
    loop_values = {f.key: 1 for f in LOOP_FIELDS} | {"train_loss": math.nan, "failures": []}

    record = round_record(3, metrics, loop_values, task.fields)
    tags = tensorboard_scalars(record, task.fields)

    assert list(record) == ["round", *[f.key for f in task.fields], *[f.key for f in LOOP_FIELDS], "client_acc"]
    assert tags["personalized/acc"] == 0.5 and tags["comm/bytes_total"] == 1 and tags["clients/trained"] == 1
    assert "global/acc" not in tags and "train/loss" not in tags  # undefined values are left out
    with pytest.raises(KeyError):
        round_record(3, {"client_acc": {}}, loop_values, task.fields)
    assert [f.key for f in report_columns()] == ["personalized_acc", "worst_client_acc", "global_acc",
                                                 "personalized_f1", "bytes_total", "wall_time_s"]


def test_one_list_of_settings_that_do_not_change_results_serves_resume_and_report():
    from fedhb.checkpoint import config_differences
    from fedhb.report import setting

    base = {"out_dir": "a", "seed": 1, "data": {"class_path": "MedMNIST", "init_args": {"root": "x", "size": 28}},
            "fabric": {"devices": 1, "precision": "32-true"}, "checkpoint": {"every": 1}}
    other = {"out_dir": "b", "seed": 1, "data": {"class_path": "MedMNIST", "init_args": {"root": "y", "size": 28}},
             "fabric": {"devices": 2, "precision": "bf16-mixed"}, "checkpoint": {"every": 5}}

    assert config_differences(base, other) == ["--fabric.precision: checkpoint has '32-true', this run has "
                                               "'bf16-mixed'"]
    assert set(setting(base)) == {"data.class_path", "data.size", "fabric.precision"}
    assert is_result_neutral("data.init_args.root") and not is_result_neutral("data.init_args.size")


# -- small untruths ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("make", "flag"), [
    (lambda: OptimArgs(name="rmsprop"), "--optim.name"),
    (lambda: OptimArgs(schedule="linear"), "--optim.schedule"),
    (lambda: FederationArgs(eval_protocol="fhbnch"), "--federation.eval_protocol"),
    (lambda: PartitionArgs(scheme="label_skew"), "--partition.scheme"),
])
def test_every_option_is_checked_even_when_built_in_python(make, flag):
    with pytest.raises(ValueError, match=flag):
        make()


def test_the_named_random_streams_draw_what_the_bare_numbers_drew():
    from fedhb import seeds

    assert (seeds.rng(5, 3, seeds.Stream.SELECTION).random(4) == np.random.default_rng([5, 3, 7]).random(4)).all()
    assert seeds.client_seed(5, 3, 2) == int(np.random.SeedSequence([5, 3, 2]).generate_state(1)[0])
    assert len({s.value for s in seeds.Stream}) == len(seeds.Stream)


# -- layers ------------------------------------------------------------------------------------------------------------
def _fedhb_imports(path: Path) -> set[str]:
    """Every fedhb module ``path`` imports, anywhere in it (module level, functions, ``TYPE_CHECKING``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedhb"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fedhb"))
    return found


def test_the_import_graph_of_the_package_has_no_cycle():
    modules = {}
    for path in (ROOT / "fedhb").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    # A package's __init__ re-exports its modules; an edge to a package counts as an edge to its __init__ only.
    graph = {m: {i for i in _fedhb_imports(p) if i in modules and i != m} for m, p in modules.items()}
    graph = {m: {i for i in deps if not (modules[m].name == "__init__.py" and i.startswith(m + "."))}
             for m, deps in graph.items()}
    assert {"fedhb.client", "fedhb.collectives"} <= graph["fedhb.loop"]  # it sees the imports it checks
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            if modules[n].name == "__init__.py" and m.startswith(n + "."):
                continue  # importing a sibling through its package is the package's own business
            assert state.get(n) != 1, "import cycle: " + " -> ".join([*path, m, n])
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_the_package_the_maths_and_the_algorithms_import_no_heavy_library():
    code = ("import sys, fedhb, fedhb.algorithms._ops, fedhb.algorithms.fedprox, fedhb.algorithms, fedhb.record, "
            "fedhb.config, fedhb.models.lora, fedhb.tasks, fedhb.seeds; "
            "print(sorted(m for m in ('lightning', 'transformers', 'torchmetrics', 'tensorboard', 'matplotlib', "
            "'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)

    assert out.stdout.strip() == "[]"


def test_no_file_outside_lora_py_spells_a_lora_parameter_name_and_only_base_spells_algo_prefix():
    offenders = []
    for folder in ("fedhb", "benchmarks", "cli"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            rel = path.relative_to(ROOT).as_posix()
            if rel != "fedhb/models/lora.py" and any(f in text for f in ("lora_A", "lora_B", '"lora_', "'lora_")):
                offenders.append(rel)
            if rel != "fedhb/algorithms/base.py" and ('"algo/' in text or "'algo/" in text):
                offenders.append(rel)
    assert offenders == []
