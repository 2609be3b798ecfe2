"""Every algorithm: selectable from the command line, and a short federation on the tiny ViT that gives the same numbers
on one process and on two (``ddp_spawn``). All runs of one world size share one launch, so processes start once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import fedhb.algorithms as algorithms
from fedhb.algorithms import (
    APFL,
    APPLE,
    EPFL,
    MMOON,
    MOON,
    SCAFFOLD,
    Centralized,
    CreamFL,
    Ditto,
    FedAdagrad,
    FedAdam,
    FedALA,
    FedAvg,
    FedAvgM,
    FedBABU,
    FedDPA,
    FedDyn,
    FedNova,
    FedPer,
    FedProx,
    FedRep,
    FedSALoRA,
    FedYogi,
    FFALoRA,
    FLoRA,
    HetLoRA,
    Local,
    PerFedAvg,
    PFedMe,
)
from fedhb.cli import main
from fedhb.config import CheckpointArgs, FabricArgs, FederationArgs, ModelArgs, OptimArgs, PartitionArgs
from fedhb.data import MedMNIST
from fedhb.fit import _Run
from fedhb.strategy import make_fabric

NAMES = sorted(n for n in algorithms.__all__ if n not in ("Algorithm", "LocalTrainer"))


def every_algorithm():
    """``{label: algorithm}``: every algorithm once under its name; FLoRA and HetLoRA once more with a LoRA rank per
    client, FedAvg with each robust server step, the FedOpt family in Flower's variant."""
    runs = [FedAvg(), Local(), EPFL(lam=0.3, layers="second_half", distance="cosine"), FedProx(mu=0.1),
            SCAFFOLD(), APFL(), APPLE(), FedALA(max_start_epochs=2), MOON(), FedNova(), FedAdam(), FedYogi(),
            FedAdagrad(), FedAvgM(), Ditto(), FedRep(), FedPer(), FedSALoRA(), FFALoRA(), FLoRA(), Centralized(),
            FedDyn(), FedBABU(), PerFedAvg(), PFedMe(inner_steps=2), HetLoRA(), FedDPA(),
            MMOON(contrast="both"), CreamFL()]
    return {**{type(a).__name__: a for a in runs}, "FLoRA-ranks": FLoRA(ranks=[8, 4, 2]),
            "HetLoRA-ranks": HetLoRA(ranks=[8, 4, 2], lam=0.1), "FedAvg-median": FedAvg(aggregation="median"),
            "FedAvg-trimmed_mean": FedAvg(aggregation="trimmed_mean", trim=0.25),
            "FedAvg-krum": FedAvg(aggregation="krum", krum_keep=2), "FedAdam-flower": FedAdam(variant="flower"),
            "FedAdagrad-flower": FedAdagrad(variant="flower")}


LABELS = list(every_algorithm())


def test_the_list_covers_every_registered_algorithm():
    assert sorted({type(a).__name__ for a in every_algorithm().values()}) == NAMES


def test_every_algorithm_is_selectable_by_name_with_its_options(organamnist_root, capsys):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_subclass_arguments(algorithms.Algorithm, "algorithm")
    for name in NAMES:
        cfg = parser.parse_args(["--algorithm", name])
        assert cfg.algorithm.class_path.endswith(f".{name}"), name
        assert type(parser.instantiate_classes(cfg).algorithm).__name__ == name

    # The real command line, with an option.
    with pytest.raises(SystemExit):
        main(["fit", "--data", "MedMNIST", "--data.root", organamnist_root, "--algorithm", "FedProx",
              "--algorithm.mu", "0.01", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["algorithm"]["class_path"] in ("fedhb.algorithms.FedProx", "fedhb.algorithms.fedprox.FedProx")
    assert printed["algorithm"]["init_args"] == {"mu": 0.01}


def run_all(fabric, runs):
    """Module level so that ``ddp_spawn`` can import it in the spawned processes."""
    return [run(fabric) for run in runs]


def _runs(root: str, out: Path, world: int) -> list[_Run]:
    runs = []
    for label, algorithm in every_algorithm().items():
        args = dict(
            data=MedMNIST(root=root, fraction=0.3), algorithm=algorithm, out_dir=str(out / label),
            seed=3, partition=PartitionArgs(num_clients=4, alpha=0.5), model=ModelArgs(),
            # 3 of 4 clients per round: clients that sat out a round sync to the global state before training.
            # Centralized needs its pooled client in every round.
            federation=FederationArgs(rounds=2, fraction=1.0 if isinstance(algorithm, Centralized) else 0.75,
                                      batch_size=32, eval_every=2),
            optim=OptimArgs(name="adamw", lr=0.01, schedule="constant", min_lr=0.0),
            fabric=FabricArgs(accelerator="cpu", devices=world, strategy="ddp_spawn" if world > 1 else "auto"),
            checkpoint=CheckpointArgs(),
        )
        runs.append(_Run.of(**args))
    return runs


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_every_algorithm_gives_the_same_numbers_on_one_and_two_processes(organamnist_root, tmp_path):
    one = make_fabric(FabricArgs(accelerator="cpu"))
    one.launch(run_all, _runs(organamnist_root, tmp_path / "one", 1))
    two = make_fabric(FabricArgs(accelerator="cpu", devices=2, strategy="ddp_spawn"))
    summaries = two.launch(run_all, _runs(organamnist_root, tmp_path / "two", 2))

    assert [s["world_size"] for s in summaries] == [2] * len(LABELS)
    for name in LABELS:
        a, b = _records(tmp_path / "one" / name), _records(tmp_path / "two" / name)
        assert [r["round"] for r in a] == [r["round"] for r in b] == [2], name
        ra, rb = a[-1], b[-1]
        assert ra["clients_trained"] == rb["clients_trained"] == (4 if name == "Centralized" else 3), name
        for key in ("bytes_up", "bytes_down", "bytes_total"):
            assert ra[key] == rb[key], (name, key)
        for key in ("personalized_acc", "worst_client_acc", "personalized_f1", "train_loss", "global_acc"):
            if ra[key] is None:
                assert rb[key] is None, (name, key)
            else:
                assert rb[key] == pytest.approx(ra[key], abs=1e-6), (name, key)
        assert ra["client_acc"] == pytest.approx(rb["client_acc"], abs=1e-6), name
        has_global = every_algorithm()[name].has_global_model
        assert (ra["global_acc"] is not None) == has_global, name
    # Clients of rank 8, 4 and 2 upload less than clients all of rank 8.
    for method in ("FLoRA", "HetLoRA"):
        ranked, full = _records(tmp_path / "one" / f"{method}-ranks")[-1], _records(tmp_path / "one" / method)[-1]
        assert ranked["bytes_up"] < full["bytes_up"], method
