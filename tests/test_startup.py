"""Start-up and per-round work (issue 17): ``fedhb fit --help`` imports no heavy library (not even torch), the
algorithm registry imports an algorithm only when it is asked for, a client whose model is the global model is
predicted once per evaluation, and client-state swaps give the same numbers with their copies made non-blocking."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "lightning", "transformers", "torchmetrics", "tensorboard", "matplotlib", "peft", "monai")


def _imports_after(code: str) -> tuple[list[str], str]:
    """The heavy libraries in ``sys.modules`` after running ``code`` in a fresh interpreter, and what it printed."""
    probe = (f"import sys, io, contextlib\nout = io.StringIO()\nwith contextlib.redirect_stdout(out):\n"
             f"    try:\n        {code}\n    except SystemExit:\n        pass\n"
             f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\nprint(out.getvalue(), file=sys.stderr)")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    return eval(run.stdout.strip().splitlines()[-1]), run.stderr  # noqa: S307 - our own printed list


def test_fit_help_imports_no_heavy_library_and_still_names_every_algorithm_and_dataset():
    from fedhb.registry import known_plugins

    heavy, printed = _imports_after("from fedhb.cli import main; main(['fit', '--help'])")

    assert heavy == []
    assert "--federation.rounds" in printed and "--algorithm ALGORITHM" in printed
    listed = printed.split("algorithms (--algorithm NAME;")[1]
    words = {w.strip(",") for w in listed.split()}
    assert set(known_plugins("algorithm")) <= words and set(known_plugins("data")) <= words


def test_top_level_and_report_help_import_no_heavy_library():
    assert _imports_after("from fedhb.cli import main; main(['--help'])")[0] == []
    assert _imports_after("from fedhb.cli import main; main(['report', '--help'])")[0] == []


def test_the_registry_imports_an_algorithm_only_when_asked_and_lists_them_without_importing():
    heavy, _ = _imports_after("import fedhb.algorithms as a, fedhb.algorithms.base; assert 'fedhb.algorithms.fedavg' "
                              "not in sys.modules; print(a.names())")
    assert heavy == []

    import fedhb.algorithms as algorithms
    from fedhb.algorithms import EPFL, FedAvg
    from fedhb.algorithms.epfl import EPFL as EPFLDefined
    from fedhb.registry import known_plugins

    assert EPFL is EPFLDefined and FedAvg.__module__ == "fedhb.algorithms.fedavg"
    assert algorithms.names() == known_plugins("algorithm")  # the no-import list is the registry's
    assert set(algorithms.__all__) == {"Algorithm", *algorithms.names(), "LocalTrainer"}
    with pytest.raises(AttributeError, match="NoSuchAlgorithm"):
        algorithms.NoSuchAlgorithm  # noqa: B018


def test_an_option_besides_help_still_resolves_algorithm_names(capsys):
    from fedhb.cli import main

    with pytest.raises(SystemExit) as done:
        main(["fit", "--algorithm", "EPFL", "--algorithm.lam", "0.25", "--help"])

    assert done.value.code == 0 and "--federation.rounds" in capsys.readouterr().out


def test_fedavg_evaluation_predicts_each_client_once_with_the_numbers_of_two_passes(make_loop):
    from fedhb.algorithms import FedAvg

    loop = make_loop(FedAvg(), clients=3, rounds=1)
    calls = []
    predict = loop.predict
    loop.predict = lambda index: calls.append(len(index)) or predict(index)

    metrics = loop.run_round(1).metrics

    assert len(calls) == 3  # one pass per client: its own model is the global one
    # The two passes as they were: every client's own model, then the global model on every client's test split.
    glob = loop.algorithm.global_state()
    rows = {}
    for cid in loop.mine:
        loop.load(loop.algorithm.personalized_model(loop.states[cid]))
        rows[cid] = loop.task.score(*predict(loop.splits[cid].test))
    expected = loop.task.reduce(loop.comm.rows(list(range(3)), rows, loop.task.width))
    loop.load({**loop.client_module.get_state(), **glob})
    stats = sum(loop.task.global_stats(*predict(loop.splits[c].test)) for c in loop.mine)
    expected.update(loop.task.global_metrics(stats))
    assert repr(metrics) == repr(expected)  # repr: NaN scores compare equal


def test_a_personalized_algorithm_is_still_scored_on_its_own_and_the_global_model(make_loop):
    from fedhb.algorithms import Ditto

    loop = make_loop(Ditto(), clients=3, rounds=1)
    calls = []
    predict = loop.predict
    loop.predict = lambda index: calls.append(len(index)) or predict(index)

    loop.run_round(1)

    assert len(calls) == 6  # Ditto's personal models differ from the global one: both passes


def test_state_swaps_load_the_exact_tensors_on_cpu(make_loop):
    from fedhb.algorithms import FedAvg

    loop = make_loop(FedAvg(), clients=2, rounds=1)
    state = {k: torch.randn_like(v) for k, v in loop.client_module.get_state().items()}

    loop.load(state)

    assert not loop.pin_states  # pinned host memory only where the device is CUDA
    assert all(torch.equal(loop.client_module.get_state()[k], v) for k, v in state.items())


# -- benchmarks/gpu.sh: prepared for a GPU, checked here on CPU --------------------------------------------------------
def _gpu_driver():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fedhb_gpu_benchmark", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_script_parses_and_its_driver_imports_on_cpu():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu.sh")], check=True)
    gpu = _gpu_driver()

    assert set(gpu.CELLS) == {"fedavg bf16 sequential", "fedavg bf16 client_batch 8", "scaffold 16-mixed",
                              "apple 16-mixed"}
    assert "--federation.client_batch" in gpu.CELLS["fedavg bf16 client_batch 8"]


@pytest.mark.slow
def test_the_gpu_driver_runs_a_tiny_round_and_the_swap_check_on_cpu(tmp_path):
    import json

    gpu = _gpu_driver()
    data, model = gpu.prepare(tmp_path, tiny=True)
    result = tmp_path / "seq.json"
    gpu.run_cell(gpu.fit_args(data, model, tmp_path / "seq", True, 1, "cpu") + ["--fabric.precision", "32-true"],
                 result)
    swap = tmp_path / "swap.json"
    gpu.swap_check(data, model, True, "cpu", swap)

    row = gpu.summarise("fedavg bf16 sequential", 0, 1.0, {"smi_util_mean": None, "smi_mem_peak_mib": None}, result,
                        tmp_path / "none.log")
    assert row["finite_losses"] and row["updates_per_s"] > 0 and row["round_s"] > 0
    checked = json.loads(swap.read_text())
    assert checked["loaded_exactly"] and not checked["pin_states"] and not checked["pinned"]  # CPU: plain memory
    text = gpu.table([row, {"cell": "state swaps", "rc": 0, **checked}], "header")
    assert "| fedavg bf16 sequential |" in text and "loaded exactly True" in text
