"""Multimodal federations end to end: every algorithm on image + report + tabular features with whole clients missing
their reports, the LoRA methods acting on every encoder's adapters, and the same numbers on 1 and 2 processes.

The data is the PadChest fixture (published format) with its images; the backbones are tiny random-init presets.
Multi-process runs use ``ddp_spawn`` on CPU; this module must stay importable by the spawned processes.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any

import pytest

import fedhb.algorithms as algorithms
from fedhb import seeds
from fedhb.algorithms import Algorithm
from fedhb.config import CheckpointArgs, FabricArgs, FederationArgs, ModelArgs, OptimArgs, PartitionArgs
from fedhb.data import PadChest
from fedhb.fit import _Run
from fedhb.models.lora import encoder_of, is_lora

BACKBONES = {"image": "tiny-vit", "text": "tiny-bert", "tabular": "tiny-mlp"}
#: One client in three holds no report (drawn from the seed's MISSING stream).
PARTITION = dict(scheme="iid", num_clients=3, min_samples=10, split=(0.5, 0.0, 0.5), missing_modality="text",
                 missing_fraction=0.34, missing_level="client")
ALGORITHMS = sorted(n for n in algorithms.__all__ if inspect.isclass(getattr(algorithms, n))
                    and issubclass(getattr(algorithms, n), Algorithm) and getattr(algorithms, n) is not Algorithm)


def make_run(path: str, out: Path, algorithm: str, world: int, fusion: str = "concat", images: bool = True,
             rounds: int = 2) -> _Run:
    data = (PadChest(path=path, images=str(Path(path).parent / "images"), image_size=28) if images
            else PadChest(path=path))
    backbones = {m: b for m, b in BACKBONES.items() if images or m != "image"}
    args = dict(
        data=data, algorithm=getattr(algorithms, algorithm)(),
        out_dir=str(out), seed=7, partition=PartitionArgs(**PARTITION),  # type: ignore[arg-type]
        model=ModelArgs(backbones=backbones, max_length=24, fusion=fusion, fusion_dim=16),  # type: ignore[arg-type]
        federation=FederationArgs(rounds=rounds, batch_size=16, eval_batch_size=64),
        optim=OptimArgs(name="adamw", lr=0.01, schedule="constant", min_lr=0.0),
        fabric=FabricArgs(accelerator="cpu", devices=world, strategy="ddp_spawn" if world > 1 else "auto"),
        checkpoint=CheckpointArgs(minutes=0),
    )
    return _Run.of(**args)


def federations(fabric: Any, path: str, out: str, plan: list[tuple[str, str]], images: bool = True,
                rounds: int = 2) -> None:
    """Run each ``(algorithm, fusion)`` of ``plan`` in these processes, each into its folder under ``out``."""
    for algorithm, fusion in plan:
        make_run(path, Path(out) / f"{algorithm}-{fusion}", algorithm, fabric.world_size, fusion, images,
                 rounds)(fabric)


def launch(world: int, path: str, out: Path, plan: list[tuple[str, str]], images: bool = True,
           rounds: int = 2) -> dict[str, Any]:
    """Each run's ``summary.json`` with its ``metrics.jsonl`` records as ``history``, read from disk once the
    processes are done (what they return crosses a pipe that a large result would block)."""
    from fedhb.strategy import make_fabric

    args = FabricArgs(accelerator="cpu", devices=world, strategy="ddp_spawn" if world > 1 else "auto")
    make_fabric(args).launch(federations, path, str(out), plan, images, rounds)
    summaries = {}
    for algorithm, fusion in plan:
        folder = Path(out) / f"{algorithm}-{fusion}"
        summary = json.loads((folder / "summary.json").read_text())
        summary["history"] = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        summaries[f"{algorithm}-{fusion}"] = summary
    return summaries


def finite(value: Any) -> bool:
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    return not isinstance(value, float) or not math.isnan(value)


@pytest.mark.slow
def test_every_algorithm_runs_a_multimodal_federation_with_a_client_missing_its_reports_on_1_and_2_processes(
        padchest_file, tmp_path):
    # Report + tabular features, 2 rounds; the images join in the 1-versus-2-process test below.
    plan = [(name, "concat") for name in ALGORITHMS]
    summaries = launch(1, padchest_file, tmp_path, plan, images=False)
    two = launch(2, padchest_file, tmp_path / "two", plan, images=False)

    for key, summary in summaries.items():  # the same numbers on 2 processes
        assert two[key]["world_size"] == 2, key
        for a, b in zip(summary["history"], two[key]["history"], strict=True):
            for field in ("personalized_acc", "train_loss", "bytes_total", "bytes_up_by_modality",
                          "bytes_down_by_modality"):
                assert a[field] == pytest.approx(b[field], abs=1e-6), (key, field)
            assert a["client_acc"] == pytest.approx(b["client_acc"], abs=1e-6), key

    [silent] = seeds.rng(7, seeds.Stream.MISSING).choice(3, 1, replace=False).tolist()
    held = {str(c): ["tabular"] if c == silent else ["text", "tabular"] for c in range(3)}
    assert len(summaries) == len(ALGORITHMS) >= 20
    for name, summary in summaries.items():
        final = summary["final"]
        assert final["failures"] == [] and finite(final["client_acc"]), name
        assert math.isfinite(final["train_loss"]) and 0 <= final["personalized_acc"] <= 1, name
        assert summary["client_modalities"] == held, name
        assert summary["by_modalities"]["tabular"]["clients"] == [silent], name
    # Bytes by modality: FedAvg uploads every client's whole state each round; EPFL the LoRA matrices only (the
    # tabular MLP has none).
    fedavg, epfl = summaries["FedAvg-concat"], summaries["EPFL-concat"]
    assert fedavg["bytes_up_by_modality"] == {k: 2 * 3 * v for k, v in fedavg["state_bytes_by_modality"].items()}
    assert set(epfl["bytes_up_by_modality"]) == {"text"}
    assert sum(epfl["bytes_up_by_modality"].values()) == sum(r["bytes_up"] for r in epfl["history"])
    # The checkpoint carries the per-modality count, so a resumed run goes on counting where it stopped.
    import torch

    from fedhb.checkpoint import list_checkpoints

    last = torch.load(list_checkpoints(tmp_path / "EPFL-concat")[-1], weights_only=True)
    assert last["bytes_up_by_modality"] == epfl["bytes_up_by_modality"]


def test_the_lora_methods_act_on_the_adapters_of_every_encoder(padchest_file):
    from fedhb.algorithms import EPFL, FedSALoRA, FFALoRA, FLoRA
    from fedhb.build import build_module
    from fedhb.fit import prepare_partition

    run = make_run(padchest_file, Path("unused"), "FedAvg", 1)
    samples, _, _ = prepare_partition(run.data, run.partition, run.seed)
    state = build_module(run.model, samples, run.optim, 0).get_state()
    lora = {n for n in state if is_lora(n)}

    assert {encoder_of(n) for n in lora} == {"image", "text"}
    for algorithm in (EPFL(), FedSALoRA(), FLoRA()):
        algorithm.setup(list(state), state, 3)
        uploaded = algorithm.upload(algorithm.init_client_state(dict(state), 0))
        assert {encoder_of(n) for n in uploaded if is_lora(n)} == {"image", "text"}, type(algorithm).__name__
    ffa = FFALoRA()
    ffa.setup(list(state), state, 3)
    sent = ffa.upload(ffa.init_client_state(dict(state), 0))
    assert {encoder_of(n) for n in sent if is_lora(n)} == {"image", "text"}  # the B matrices of both
    assert any(n.startswith("encoders.tabular.") for n in sent) and any(n.startswith("fusion.") for n in sent)


@pytest.mark.slow
def test_a_multimodal_federation_with_missing_reports_gives_the_same_numbers_on_1_and_2_processes(padchest_file,
                                                                                                   tmp_path):
    plan = [("FedAvg", "gated"), ("EPFL", "concat"), ("FLoRA", "concat"), ("SCAFFOLD", "gated")]

    one = launch(1, padchest_file, tmp_path / "one", plan)
    two = launch(2, padchest_file, tmp_path / "two", plan)

    for key in one:
        assert two[key]["world_size"] == 2 and one[key]["world_size"] == 1
        for a, b in zip(one[key]["history"], two[key]["history"], strict=True):
            for field in ("personalized_acc", "personalized_f1", "personalized_auroc", "train_loss", "bytes_total"):
                assert a[field] == pytest.approx(b[field], abs=1e-6), (key, field)
            assert a["client_acc"] == pytest.approx(b["client_acc"], abs=1e-6), key
        assert one[key]["bytes_up_by_modality"] == two[key]["bytes_up_by_modality"], key
        assert one[key]["client_modalities"] == two[key]["client_modalities"], key
    assert set(one["EPFL-concat"]["bytes_up_by_modality"]) == {"image", "text"}  # both backbones' LoRA
