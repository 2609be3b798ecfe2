"""Federation checkpoints: one dict per file, written atomically, loaded with ``weights_only``, never with pickle.

A checkpoint holds everything a run needs to continue exactly: the round counter, every client's state (trainable and
algorithm tensors), the algorithm's server state, the loop's bookkeeping, the metric history, the partition, RNG
states, and the resolved config that produced it.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any

import yaml

from fedhb.config import is_result_neutral

_NAME = re.compile(r"^round-(\d{6})\.ckpt$")


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def checkpoint_path(out_dir: str | Path, rnd: int) -> Path:
    return checkpoint_dir(out_dir) / f"round-{rnd:06d}.ckpt"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints (temporary files of an interrupted write are not listed), oldest first."""
    folder = checkpoint_dir(out_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def _fault(point: str, rnd: int) -> None:
    """Fault injection for the crash tests: ``FEDHB_FAULT=checkpoint:3`` SIGKILLs the process mid-write of round 3's
    checkpoint. Unset in normal use."""
    if os.environ.get("FEDHB_FAULT") == f"{point}:{rnd}":
        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(fabric: Any, out_dir: str | Path, rnd: int, state: dict[str, Any], keep: int) -> Path:
    """Save ``state`` as round ``rnd``'s checkpoint: temporary file, fsync, rename; then prune to the newest ``keep``.

    Every rank must call it (``state`` is identical everywhere); rank 0 writes.
    """
    path = checkpoint_path(out_dir, rnd)
    tmp = path.with_name(f".{path.name}.tmp")
    if fabric.global_rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
    fabric.barrier()
    fabric.save(tmp, state)
    if fabric.global_rank == 0:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _fault("checkpoint", rnd)
        os.replace(tmp, path)
        for old in list_checkpoints(out_dir)[:-keep]:
            old.unlink(missing_ok=True)
        for stale in path.parent.glob(".round-*.ckpt.tmp"):  # left by a crash mid-write
            stale.unlink(missing_ok=True)
    fabric.barrier()
    return path


def load_checkpoint(fabric: Any, path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a truncated or foreign file gives an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {path}: no such checkpoint file")
    try:
        state = fabric.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several types for corrupt zip/pickle data
        raise ValueError(
            f"--resume {path}: the checkpoint cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            f"it is truncated or not a fedhb checkpoint. Pass an older one from {path.parent} or start afresh."
        ) from err
    required = {"round", "clients", "algorithm", "loop", "config"}
    if not isinstance(state, dict) or not required <= set(state):
        missing = sorted(required - set(state)) if isinstance(state, dict) else sorted(required)
        raise ValueError(f"--resume {path}: not a fedhb checkpoint (missing {missing})")
    return state


def find_resume_checkpoint(fabric: Any, out_dir: str | Path) -> Path | None:
    """The newest readable checkpoint in ``out_dir`` (``--resume auto``), skipping unreadable ones with a warning."""
    for path in reversed(list_checkpoints(out_dir)):
        try:
            load_checkpoint(fabric, path)
            return path
        except ValueError as err:
            fabric.print(f"fedhb: warning: skipping {path}: {err}")
    return None


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``--field: checkpoint has X, this run has Y`` for every field that changes the numbers."""

    a, b = _flatten(saved), _flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if not is_result_neutral(key) and a.get(key) != b.get(key):
            flag = key.replace(".init_args.", ".")
            diffs.append(f"--{flag}: checkpoint has {a.get(key)!r}, this run has {b.get(key)!r}")
    return diffs


def config_text(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=True)
