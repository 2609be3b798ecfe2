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
import yaml

from fedhb.algorithms.base import Algorithm
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
    AuditArgs,
    CheckpointArgs,
    FabricArgs,
    FederationArgs,
    ModelArgs,
    OptimArgs,
    PartitionArgs,
    PrivacyArgs,
    SecureAggregationArgs,
)
from fedhb.data.base import FederatedDataset, Samples
from fedhb.data.partition import (
    ClientSplit,
    class_counts,
    client_modalities,
    drop_modality,
    partition_samples,
    subsample,
)
from fedhb.io import append_jsonl, json_line, write_atomic, write_json
from fedhb.paths import check_out_dir
from fedhb.record import task_columns, tensorboard_scalars
from fedhb.signals import Interrupted, StopRequest


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


def prepare_partition(dataset: FederatedDataset, partition: PartitionArgs, seed: int, min_keep: int = 0
                      ) -> tuple[Samples, list[ClientSplit], str | None]:
    """Load, subsample (``--data.fraction``, but at least ``min_keep`` samples when there are) and partition the
    data: identical on every rank."""
    samples = dataset.load()
    fraction = max(getattr(dataset, "fraction", 1.0), min(1.0, min_keep / max(1, len(samples))))
    keep = subsample(samples.stratify_labels, fraction, seed)
    if len(keep) < len(samples):
        samples = samples.subset(keep)
    scheme = partition.scheme
    key, groups = group_key(samples, dataset, partition.group_by)
    natural = natural_key(samples, dataset, partition) if scheme == "natural" else None
    if scheme == "natural" and groups is None and natural is None:
        raise ValueError("--partition.scheme natural needs a group key; set --partition.group_by to one of "
                         f"{sorted(samples.groups) or '(none: this dataset has no natural groups)'}")
    splits = partition_samples(samples, scheme, partition.num_clients, partition.alpha, partition.min_samples,
                               partition.split, seed, groups, natural)
    if partition.missing_modality is not None:
        samples, _ = drop_modality(samples, splits, partition.missing_modality, partition.missing_fraction,
                                   partition.missing_level, seed)
    return samples, splits, key


def natural_key(samples: Samples, dataset: FederatedDataset, partition: PartitionArgs) -> np.ndarray | None:
    """The key whose values are the clients of a natural partition, when it is not the group key."""
    name = partition.natural_by if partition.natural_by is not None else dataset.default_natural_by
    if name in (None, "none"):
        return None
    if name not in samples.groups:
        raise ValueError(f"--partition.natural_by {name!r}: this dataset has the keys "
                         f"{sorted(samples.groups) or 'none'}")
    return samples.groups[name]


def partition_report(samples: Samples, splits: list[ClientSplit], key: str | None,
                     public: np.ndarray | None = None) -> dict[str, Any]:
    """``partition.json``: each client's split sizes and class counts (and modality counts), as the clients train on
    them; samples held out for the server (``public``, CreamFL's public data) are listed apart, not as a client's."""
    clients = {}
    for c, s in enumerate(splits):
        clients[str(c)] = {
            "train": len(s.train), "val": len(s.val), "test": len(s.test),
            "class_counts": {name: class_counts(samples.labels, getattr(s, name), samples.num_classes)
                             for name in ("train", "val", "test")},
        }
        if samples.modality == "multimodal":  # samples holding each modality, per split
            clients[str(c)]["modality_counts"] = {
                name: {m: int(samples.presence(m)[getattr(s, name)].sum()) for m in samples.modalities}
                for name in ("train", "val", "test")}
    report: dict[str, Any] = {"num_samples": len(samples), "group_by": key, "label_names": samples.label_names,
                              "clients": clients}
    if public is not None and len(public):
        report["public"] = {"train": len(public),
                            "class_counts": class_counts(samples.labels, public, samples.num_classes)}
    return report


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
    privacy: PrivacyArgs = PrivacyArgs(),
    secure_aggregation: SecureAggregationArgs = SecureAggregationArgs(),
    audit: AuditArgs = AuditArgs(),
    resume: str | None = None,
    overwrite: bool = False,
    fast_dev_run: bool = False,
) -> dict[str, Any] | None:
    """Run one federation and write its outputs to ``out_dir``.

    Args:
        data: The dataset (``class_path`` one of ``fedhb.data``'s classes, e.g. ``MedMNIST``).
        algorithm: The federated algorithm (``FedAvg``, ``EPFL``, ``Local``, ...; the end of ``fedhb fit --help`` names
            them all); default FedAvg.
        out_dir: Run folder: ``config.yaml``, ``partition.json``, ``metrics.jsonl``, ``summary.json``, ``logs/``.
        seed: Seed of the partition, the initial model and every client's local training.
        partition: How samples are split over clients.
        model: Backbone, LoRA and head.
        federation: Rounds, client sampling, local training and evaluation.
        optim: Local optimizer and learning-rate schedule.
        fabric: Devices, processes, precision.
        checkpoint: Checkpoint frequency and retention.
        privacy: Differential privacy (client-level DP-FedAvg or sample-level DP-SGD) and its accounting.
        secure_aggregation: Masked uploads that the server can only sum (SecAgg+).
        audit: A membership-inference audit of every client's final model after the run.
        resume: ``auto`` continues from the newest complete checkpoint in ``out_dir`` (or starts afresh when there is
            none); a path continues from that checkpoint. The config must match the checkpoint's, except for
            ``out_dir``, ``fabric``, ``checkpoint`` and ``federation.eval_batch_size``.
        overwrite: Replace the outputs of an earlier run in ``out_dir``.
        fast_dev_run: Run end to end in seconds to find mistakes: the data read and partitioned with the configured
            scheme over at most 3 clients, every backbone replaced by the tiny random-init preset of its family, 2
            rounds, at most 2 batches per client per epoch (see :mod:`fedhb.fast_dev_run`); outputs written as usual.

    Returns:
        The summary (also written to ``summary.json``) on rank 0 of a ``ddp`` run or a single process; ``None`` on
        other ranks.
    """
    if data is None:
        raise ValueError("--data is required: e.g. --data MedMNIST --data.root DIR, or a config with a data: block")
    if algorithm is None:
        from fedhb.algorithms import FedAvg

        algorithm = FedAvg()
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
    if fast_dev_run:  # in config.yaml only when set, so earlier runs' checkpoints still match their config
        from fedhb.fast_dev_run import dev_federation, dev_partition

        config["fast_dev_run"] = True
        federation, partition = dev_federation(federation), dev_partition(partition)
    # The privacy groups are in config.yaml only when used, so that earlier runs' checkpoints still match theirs.
    for name, group, default in (("privacy", privacy, PrivacyArgs()), ("secure_aggregation", secure_aggregation,
                                                                         SecureAggregationArgs()),
                                 ("audit", audit, AuditArgs())):
        if group != default:
            config[name] = resolved_config(group=group)["group"]
    from fedhb.privacy import wrap_privacy

    if privacy.mode == "sample" and str(fabric.precision) == "16-mixed":
        # DP-SGD clips per-sample gradients, which under fp16's loss scale would be clipped at the scaled norm.
        raise ValueError("--privacy.mode sample cannot run with --fabric.precision 16-mixed (per-sample gradients are "
                         "clipped before the loss scale is divided out); use bf16-mixed or 32-true")
    # Built once here so that an algorithm or option the privacy modes refuse stops the run before any work.
    wrap_privacy(algorithm, privacy, secure_aggregation, seed=seed, federation=federation,
                 num_clients=partition.num_clients)
    run = _Run(config, data, algorithm, out, seed, partition, model, federation, optim, fabric, checkpoint, resume,
               overwrite, fast_dev_run, privacy, secure_aggregation, audit)
    from lightning.fabric.loggers import TensorBoardLogger

    loggers = [TensorBoardLogger(root_dir=str(out), name="logs", version="")]
    from fedhb.strategy import make_fabric  # imports lightning: only once the config is known to be valid

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
    fast_dev_run: bool = False
    privacy: PrivacyArgs = dataclasses.field(default_factory=PrivacyArgs)
    secure_aggregation: SecureAggregationArgs = dataclasses.field(default_factory=SecureAggregationArgs)
    audit: AuditArgs = dataclasses.field(default_factory=AuditArgs)

    @classmethod
    def of(cls, *, out_dir: str, fabric: FabricArgs, **options: Any) -> _Run:
        """The run :func:`fit` builds from these options (its keyword names), without fit's checks of the output
        folder and the options: what tests and benchmarks launch on a Fabric of their own."""
        return cls(config=resolved_config(out_dir=out_dir, fabric=fabric, **options), out=Path(out_dir),
                   fabric_args=fabric, **options)
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
        import torch

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
        import torch

        state = loop.state_dict()
        state["config"] = config_text(self.config)
        state["wall_time_s"] = self.wall_time()
        state["partition"] = {str(c): {k: torch.from_numpy(getattr(s, k).copy()) for k in ("train", "val", "test")}
                              for c, s in enumerate(splits)}
        state["bytes_up_by_modality"] = dict(self._bytes_up)
        state["bytes_down_by_modality"] = dict(self._bytes_down)
        save_checkpoint(fabric, self.out, loop.round, state, self.checkpoint.keep)

    def __call__(self, fabric: Any) -> dict[str, Any] | None:
        from fedhb.build import build_loop

        self._start, self._elapsed = time.perf_counter(), 0.0
        fabric.seed_everything(self.seed, verbose=False)
        rank0 = fabric.global_rank == 0
        with warnings.catch_warnings():
            if not rank0:  # the partition's warnings once, not once per process
                warnings.simplefilter("ignore")
            samples, splits, key = prepare_partition(self.data, self.partition, self.seed,
                                                     DEV_SAMPLES if self.fast_dev_run else 0)
        if self.fast_dev_run:
            from fedhb.fast_dev_run import dev_model, dev_splits

            self.model, splits = dev_model(self.model, samples), dev_splits(splits, self.federation)
        from fedhb.privacy import wrap_privacy

        trained = wrap_privacy(self.algorithm, self.privacy, self.secure_aggregation, seed=self.seed,
                               federation=self.federation, num_clients=len(splits))
        loop = build_loop(fabric, samples, splits, trained, model=self.model, federation=self.federation,
                          optim=self.optim, seed=self.seed)
        initial = {k: v.detach().cpu().clone() for k, v in loop.client_module.get_state().items()}
        trainable = sum(v.numel() for v in loop.client_module.trainable().values())
        resumed = self.restore(fabric, loop, splits)
        # The partition as the clients hold it: without the samples the server took as public data (CreamFL). Not
        # loop.splits, where a method that pools the training data (Centralized) has moved it all to client 0.
        held = [ClientSplit(np.setdiff1d(s.train, loop.public), s.val, s.test) for s in splits] if len(loop.public) \
            else splits
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
            write_json(self.out / "partition.json", partition_report(samples, held, key, loop.public))
            fabric.print(f"fedhb: {type(self.algorithm).__name__} on {self.data.name}, {len(splits)} clients, "
                         f"{self.federation.rounds} rounds, {trainable:,} trainable parameters per client, "
                         f"world size {fabric.world_size}")
        fabric.barrier()

        last_save = time.perf_counter()
        self._bytes_up = dict(resumed.get("bytes_up_by_modality", {})) if resumed is not None else {}
        self._bytes_down = dict(resumed.get("bytes_down_by_modality", {})) if resumed is not None else {}
        upload_parts = {c: upload_by_modality(layout) for c, layout in loop.upload_layouts.items()}
        if samples.modality == "multimodal":  # the rounds' metrics by modality set use the partition's view
            loop.modality_sets = {str(c): client_modalities(samples, s) for c, s in enumerate(held)}

        def on_round(result: Any) -> None:
            nonlocal last_save
            for c in result.selected:  # what the loop counts in bytes_up: every usable upload
                if c not in result.dropped and c not in result.failed:
                    for part, size in upload_parts[c].items():
                        self._bytes_up[part] = self._bytes_up.get(part, 0) + size
            for part, size in result.bytes_down_by_modality.items():
                self._bytes_down[part] = self._bytes_down.get(part, 0) + size
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
            "task_columns": task_columns(loop.task.fields),
            "bytes_up_by_modality": dict(self._bytes_up),
            "bytes_down_by_modality": dict(self._bytes_down),
            "state_bytes_by_modality": upload_by_modality([(k, v.shape, v.dtype) for k, v in
                                                           loop.client_module.trainable().items()]),
        }
        if len(loop.public):  # server-held public data (CreamFL), out of the clients' training splits
            summary["public_samples"] = len(loop.public)
        if samples.modality == "multimodal":
            summary.update(modality_summary(samples, held, self.model, summary["final"]))
        if trained is not self.algorithm:
            from fedhb.privacy.stack import privacy_summary

            summary["privacy"] = privacy_summary(trained, loop.server_metrics)
        if self.audit.enabled:  # every rank audits its own clients
            from fedhb.privacy.audit import audit_federation

            summary["audit"] = audit_federation(loop, initial, self.audit, self.seed)
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


#: ``--fast_dev_run`` keeps at least this many samples whatever ``--data.fraction`` says (a fixture at a real run's
#: fraction may hold too few to partition).
DEV_SAMPLES = 200


def upload_by_modality(layout: list[tuple[str, Any, Any]]) -> dict[str, int]:
    """Bytes of one upload (its ``(name, shape, dtype)`` layout) by modality, fusion and head."""
    from math import prod

    from fedhb.models import bytes_by_modality

    return bytes_by_modality({k: (prod(shape), dtype.itemsize) for k, shape, dtype in layout})


def modality_summary(samples: Samples, splits: list[ClientSplit], model: ModelArgs,
                     final: dict[str, Any] | None) -> dict[str, Any]:
    """``summary.json``'s multimodal part: the backbones, the modalities each client holds, and the final per-client
    scores averaged over the clients that hold the same modalities."""
    from fedhb.record import PER_CLIENT, modality_groups

    held = {str(c): client_modalities(samples, s) for c, s in enumerate(splits)}
    groups = modality_groups(held, (final or {}).get(PER_CLIENT) or {})
    from fedhb.models import backbone_for

    backbones = {m: backbone_for(model, m, samples.modalities) for m in samples.modalities}
    return {"backbone": "+".join(backbones.values()), "backbones": backbones, "client_modalities": held,
            "by_modalities": groups}


def _purge_tensorboard_after(fabric: Any, rnd: int) -> None:
    """Hide the TensorBoard events of rounds after ``rnd`` that a crashed run logged: they are logged again as they are
    redone. SummaryWriter's ``purge_step`` does it; Lightning's logger passes its extra keyword arguments to the writer,
    which it creates at the first log call, after this."""
    from lightning.fabric.loggers import TensorBoardLogger

    for logger in fabric.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger._kwargs["purge_step"] = rnd + 1
