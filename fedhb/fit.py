"""``fedhb fit``: its signature is the config schema."""

from __future__ import annotations

import dataclasses
import inspect
import json
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from fedhb.algorithms import Algorithm, FedAvg
from fedhb.checkpoint import (
    checkpoint_dir,
    config_differences,
    config_text,
    find_resume_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from fedhb.config import (
    CheckpointArgs,
    FabricArgs,
    FederationArgs,
    ModelArgs,
    OptimArgs,
    PartitionArgs,
)
from fedhb.data.base import FederatedDataset, Samples
from fedhb.data.partition import ClientSplit, class_counts, partition_samples, subsample
from fedhb.io import append_jsonl, json_line, write_atomic, write_json
from fedhb.paths import check_out_dir
from fedhb.record import tensorboard_scalars
from fedhb.signals import Interrupted, StopRequest
from fedhb.strategy import make_fabric


def plugin_config(obj: Any) -> dict[str, Any]:
    """``{class_path, init_args}`` of a plug-in, read back from the attributes its ``__init__`` stored."""
    cls = type(obj)
    args = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if hasattr(obj, name):
            value = getattr(obj, name)
            args[name] = list(value) if isinstance(value, tuple) else value
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": args}


def resolved_config(**groups: Any) -> dict[str, Any]:
    """The whole run configuration as plain data (the ``config.yaml`` written into every run folder)."""
    out: dict[str, Any] = {}
    for key, value in groups.items():
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out[key] = json.loads(json.dumps(dataclasses.asdict(value)))
        elif isinstance(value, (FederatedDataset, Algorithm)):
            out[key] = plugin_config(value)
        else:
            out[key] = value
    return out


def group_key(samples: Samples, dataset: FederatedDataset,
              group_by: str | None) -> tuple[str | None, np.ndarray | None]:
    """The group array the partition must keep together (``--partition.group_by``)."""
    key = dataset.default_group_by if group_by is None else group_by
    if key in (None, "none"):
        return None, None
    if key not in samples.groups:
        raise ValueError(f"--partition.group_by {key!r}: this dataset has the keys {sorted(samples.groups) or 'none'}")
    return key, samples.groups[key]


def prepare_partition(dataset: FederatedDataset, partition: PartitionArgs, seed: int
                      ) -> tuple[Samples, list[ClientSplit], str | None]:
    """Load, subsample (``--data.fraction``) and partition the data: identical on every rank."""
    samples = dataset.load()
    keep = subsample(samples.stratify_labels, getattr(dataset, "fraction", 1.0), seed)
    if len(keep) < len(samples):
        samples = samples.subset(keep)
    scheme = partition.scheme
    key, groups = group_key(samples, dataset, partition.group_by)
    if scheme == "natural" and groups is None:
        raise ValueError("--partition.scheme natural needs a group key; set --partition.group_by to one of "
                         f"{sorted(samples.groups) or '(none: this dataset has no natural groups)'}")
    splits = partition_samples(samples, scheme, partition.num_clients, partition.alpha, partition.min_samples,
                               partition.split, seed, groups)
    return samples, splits, key


def partition_report(samples: Samples, splits: list[ClientSplit], key: str | None) -> dict[str, Any]:
    clients = {}
    for c, s in enumerate(splits):
        clients[str(c)] = {
            "train": len(s.train), "val": len(s.val), "test": len(s.test),
            "class_counts": {name: class_counts(samples.labels, getattr(s, name), samples.num_classes)
                             for name in ("train", "val", "test")},
        }
    return {"num_samples": len(samples), "group_by": key, "label_names": samples.label_names, "clients": clients}


def fit(
    data: FederatedDataset | None = None,
    algorithm: Algorithm | None = None,
    out_dir: str = "runs/fedhb",
    seed: int = 42,
    partition: PartitionArgs = PartitionArgs(),
    model: ModelArgs = ModelArgs(),
    federation: FederationArgs = FederationArgs(),
    optim: OptimArgs = OptimArgs(),
    fabric: FabricArgs = FabricArgs(),
    checkpoint: CheckpointArgs = CheckpointArgs(),
    resume: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any] | None:
    """Run one federation and write its outputs to ``out_dir``.

    Args:
        data: The dataset (``class_path`` one of ``fedhb.data``'s classes, e.g. ``MedMNIST``).
        algorithm: The federated algorithm (``FedAvg``, ``EPFL``, ``Local``, ...); default FedAvg.
        out_dir: Run folder: ``config.yaml``, ``partition.json``, ``metrics.jsonl``, ``summary.json``, ``logs/``.
        seed: Seed of the partition, the initial model and every client's local training.
        partition: How samples are split over clients.
        model: Backbone, LoRA and head.
        federation: Rounds, client sampling, local training and evaluation.
        optim: Local optimizer and learning-rate schedule.
        fabric: Devices, processes, precision.
        checkpoint: Checkpoint frequency and retention.
        resume: ``auto`` continues from the newest complete checkpoint in ``out_dir`` (or starts afresh when there is
            none); a path continues from that checkpoint. The config must match the checkpoint's, except for
            ``out_dir``, ``fabric``, ``checkpoint`` and ``federation.eval_batch_size``.
        overwrite: Replace the outputs of an earlier run in ``out_dir``.

    Returns:
        The summary (also written to ``summary.json``) on rank 0 of a ``ddp`` run or a single process; ``None`` on
        other ranks.
    """
    if data is None:
        raise ValueError("--data is required: e.g. --data MedMNIST --data.root DIR, or a config with a data: block")
    algorithm = algorithm if algorithm is not None else FedAvg()
    out = Path(out_dir)
    check_out_dir(out)
    if federation.min_clients > partition.num_clients:
        raise ValueError(f"--federation.min_clients={federation.min_clients} is more than "
                         f"--partition.num_clients={partition.num_clients}")
    if resume is not None and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: resuming keeps the run, overwriting replaces it")
    if resume not in (None, "auto") and not Path(resume).is_file():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint file (use --resume auto to pick the newest one "
                                f"in --out_dir)")
    if resume is None and not overwrite and any((out / name).exists() for name in ("metrics.jsonl", "checkpoints")):
        raise FileExistsError(f"--out_dir {out} already holds a run; continue it with --resume auto, choose another "
                              f"--out_dir, or pass --overwrite true to replace it")
    config = resolved_config(data=data, algorithm=algorithm, out_dir=out_dir, seed=seed, partition=partition,
                             model=model, federation=federation, optim=optim, fabric=fabric, checkpoint=checkpoint)
    run = _Run(config, data, algorithm, out, seed, partition, model, federation, optim, fabric, checkpoint, resume,
               overwrite)
    from lightning.fabric.loggers import TensorBoardLogger

    loggers = [TensorBoardLogger(root_dir=str(out), name="logs", version="")]
    fab = make_fabric(fabric, loggers)
    if fabric.strategy == "ddp_spawn":
        results = fab.launch(run)
        return results if isinstance(results, dict) else None
    fab.launch()
    return run(fab)


@dataclasses.dataclass
class _Run:
    """Everything a process needs to run the federation; picklable so ``ddp_spawn`` can ship it."""

    config: dict[str, Any]
    data: FederatedDataset
    algorithm: Algorithm
    out: Path
    seed: int
    partition: PartitionArgs
    model: ModelArgs
    federation: FederationArgs
    optim: OptimArgs
    fabric_args: FabricArgs
    checkpoint: CheckpointArgs
    resume: str | None = None
    overwrite: bool = False

    def restore(self, fabric: Any, loop: Any, splits: list[ClientSplit]) -> dict[str, Any] | None:
        """Load the checkpoint named by ``--resume`` into ``loop``; ``None`` when there is nothing to resume."""
        if self.resume is None:
            return None
        path = find_resume_checkpoint(fabric, self.out) if self.resume == "auto" else Path(self.resume)
        if path is None:
            fabric.print(f"fedhb: no checkpoint in {checkpoint_dir(self.out)}; starting from round 1")
            return None
        state = load_checkpoint(fabric, path)
        diffs = config_differences(yaml.safe_load(state["config"]), self.config)
        if diffs:
            raise ValueError(f"--resume {path}: the checkpoint was made with another config:\n  " + "\n  ".join(diffs)
                             + "\nResume with the checkpoint's config (" + str(self.out / "config.yaml") + ") or "
                             "start a new run in another --out_dir.")
        saved = state.get("partition", {})
        if any(not torch.equal(saved[str(c)][k], torch.from_numpy(getattr(s, k))) for c, s in enumerate(splits)
               for k in ("train", "val", "test")):
            raise ValueError(f"--resume {path}: the data now partitions differently than when the checkpoint was "
                             "made (the data files changed); resume with the same files or start a new run")
        loop.load_state_dict(state)
        self._elapsed = float(state.get("wall_time_s", 0.0))
        if fabric.global_rank == 0:
            _purge_tensorboard_after(fabric, loop.round)
        fabric.print(f"fedhb: resumed from {path} (round {loop.round} of {self.federation.rounds})")
        return state

    def wall_time(self) -> float:
        """Seconds this run has taken: this process's, plus those of the runs it resumed up to their checkpoint."""
        return self._elapsed + time.perf_counter() - self._start

    def save(self, fabric: Any, loop: Any, splits: list[ClientSplit]) -> None:
        state = loop.state_dict()
        state["config"] = config_text(self.config)
        state["wall_time_s"] = self.wall_time()
        state["partition"] = {str(c): {k: torch.from_numpy(getattr(s, k).copy()) for k in ("train", "val", "test")}
                              for c, s in enumerate(splits)}
        save_checkpoint(fabric, self.out, loop.round, state, self.checkpoint.keep)

    def __call__(self, fabric: Any) -> dict[str, Any] | None:
        from fedhb.build import build_loop

        self._start, self._elapsed = time.perf_counter(), 0.0
        fabric.seed_everything(self.seed, verbose=False)
        rank0 = fabric.global_rank == 0
        with warnings.catch_warnings():
            if not rank0:  # the partition's warnings once, not once per process
                warnings.simplefilter("ignore")
            samples, splits, key = prepare_partition(self.data, self.partition, self.seed)
        loop = build_loop(fabric, samples, splits, self.algorithm, model=self.model, federation=self.federation,
                          optim=self.optim, seed=self.seed)
        trainable = sum(v.numel() for v in loop.client_module.trainable().values())
        resumed = self.restore(fabric, loop, splits)
        if resumed is not None and loop.round >= self.federation.rounds and (self.out / "summary.json").is_file():
            fabric.print(f"fedhb: the run in {self.out} already finished all {self.federation.rounds} rounds; "
                         "nothing to do")
            return json.loads((self.out / "summary.json").read_text()) if rank0 else None
        if rank0:
            self.out.mkdir(parents=True, exist_ok=True)
            if resumed is None and self.overwrite:
                # Only now, with the config valid and the data and model loaded, is the old run replaced.
                for name in ("metrics.jsonl", "summary.json"):
                    (self.out / name).unlink(missing_ok=True)
                for old in list_checkpoints(self.out):
                    old.unlink()
            # On resume, metrics.jsonl is rewritten from the checkpoint's history: rounds logged after it are redone.
            write_atomic(self.out / "metrics.jsonl", "".join(json_line(r) for r in loop.history))
            write_atomic(self.out / "config.yaml", yaml.safe_dump(self.config, sort_keys=False))
            write_json(self.out / "partition.json", partition_report(samples, splits, key))
            fabric.print(f"fedhb: {type(self.algorithm).__name__} on {self.data.name}, {len(splits)} clients, "
                         f"{self.federation.rounds} rounds, {trainable:,} trainable parameters per client, "
                         f"world size {fabric.world_size}")
        fabric.barrier()

        last_save = time.perf_counter()

        def on_round(result: Any) -> None:
            nonlocal last_save
            if rank0 and result.metrics is not None:
                log(result)
            every, minutes = self.checkpoint.every, self.checkpoint.minutes
            due = minutes > 0 and time.perf_counter() - last_save >= 60 * minutes
            signum = stop.signum
            if fabric.world_size > 1:  # every rank must take the same decisions: saving is a collective
                signum = int(loop.comm.max(float(signum)))
                due = loop.comm.max(1.0 if rank0 and due else 0.0) > 0  # rank 0's clock decides
            if result.round == self.federation.rounds or (every and result.round % every == 0) or due or signum:
                self.save(fabric, loop, splits)
                last_save = time.perf_counter()
            if signum and result.round < self.federation.rounds:
                for logger in fabric.loggers if rank0 else []:
                    logger.finalize("interrupted")  # flush the rounds logged so far
                raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} after round {result.round} of "
                                          f"{self.federation.rounds}; its checkpoint is in {checkpoint_dir(self.out)}. "
                                          f"Continue with the same command and --resume auto")

        def log(result: Any) -> None:
            record = loop.history[-1]
            append_jsonl(self.out / "metrics.jsonl", record)
            fabric.log_dict(tensorboard_scalars(record, loop.task.fields), step=result.round)

        with StopRequest(announce=rank0) as stop:
            history = loop.run(on_round)
        summary = {
            "algorithm": type(self.algorithm).__name__,
            "algorithm_options": self.algorithm.hparams(),
            "dataset": self.data.name,
            "backbone": self.model.backbone,
            "clients": len(splits),
            "rounds": self.federation.rounds,
            "trainable_parameters": trainable,
            "bytes_total": loop.bytes_total,
            "wall_time_s": round(self.wall_time(), 3),
            "world_size": fabric.world_size,
            "seed": self.seed,
            "final": history[-1] if history else None,
        }
        if rank0:
            from lightning.fabric.loggers import TensorBoardLogger

            from fedhb.report import tensorboard_hparams

            # HParams tab: settings and final metrics, logged before summary.json marks the run finished.
            params, final = tensorboard_hparams(self.config, summary)
            for logger in fabric.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.log_hyperparams(params, final, step=self.federation.rounds)
            write_json(self.out / "summary.json", summary)
            for logger in fabric.loggers:
                logger.finalize("success")
            fabric.print(f"fedhb: done in {summary['wall_time_s']:.1f} s; outputs in {self.out}/ (summary.json, "
                         f"metrics.jsonl, checkpoints/); compare runs with `tensorboard --logdir {self.out.parent}` "
                         f"or `fedhb report {self.out.parent}`")
        fabric.barrier()
        return summary if rank0 else None


def _purge_tensorboard_after(fabric: Any, rnd: int) -> None:
    """Hide the TensorBoard events of rounds after ``rnd`` that a crashed run logged: they are logged again as they are
    redone. SummaryWriter's ``purge_step`` does it; Lightning's logger passes its extra keyword arguments to the writer,
    which it creates at the first log call, after this."""
    from lightning.fabric.loggers import TensorBoardLogger

    for logger in fabric.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger._kwargs["purge_step"] = rnd + 1
