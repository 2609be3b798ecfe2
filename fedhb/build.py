"""``build_loop``: the one place that wires Fabric, the client model, its optimizer and the loop.

``fedhb fit``, the tests and the benchmarks all build their federations here, so that what they measure is what
users run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedhb.algorithms.base import Algorithm
from fedhb.config import FederationArgs, ModelArgs, OptimArgs
from fedhb.data.base import Samples
from fedhb.data.partition import ClientSplit

if TYPE_CHECKING:
    from lightning.fabric import Fabric

    from fedhb.client import ClientModule
    from fedhb.loop import FederatedLoop


def training_splits(algorithm: Algorithm, splits: list[ClientSplit]) -> list[ClientSplit]:
    """The train/val/test indices each client uses: as partitioned, or, for an algorithm that pools the training
    data (``Centralized``), every client's training split on client 0 and none on the others."""
    if not algorithm.pools_training_data:
        return splits
    pooled = np.sort(np.concatenate([s.train for s in splits]))
    empty = pooled[:0]
    return [ClientSplit(pooled if c == 0 else empty, s.val, s.test) for c, s in enumerate(splits)]


def build_module(model: ModelArgs, samples: Samples, optim: OptimArgs, seed: int) -> ClientModule:
    """The client model, initialised from ``seed`` (the same backbone, LoRA and head on every rank)."""
    from fedhb.client import ClientModule
    from fedhb.models import build_encoders, build_fusion
    from fedhb.tasks import build_task

    torch.manual_seed(seed)
    task = build_task(samples)
    own = task.build_encoders(model, samples)
    if own is not None:  # the task's own model (one encoder: no fusion step)
        fusion = None if len(own) == 1 else build_fusion(model, own, multimodal=samples.modality == "multimodal")
        return ClientModule(own, task, optim, model.head_dropout, fusion)
    encoders = build_encoders(model, samples)
    fusion = build_fusion(model, encoders, multimodal=samples.modality == "multimodal")
    return ClientModule(encoders, task, optim, model.head_dropout, fusion)


def build_loop(fabric: Fabric, samples: Samples, splits: list[ClientSplit], algorithm: Algorithm, *,
               model: ModelArgs, federation: FederationArgs, optim: OptimArgs, seed: int,
               module: ClientModule | None = None,
               init: Callable[[ClientModule], None] | None = None) -> FederatedLoop:
    """A :class:`~fedhb.loop.FederatedLoop` for ``samples`` split as ``splits``, on a launched ``fabric``.

    Args:
        module: A client model built already (default: :func:`build_module` from ``model`` and ``seed``).
        init: Called with the module before Fabric sets it up (tests copy another run's initial weights with it).
    """
    from fedhb.loop import FederatedLoop

    module = build_module(model, samples, optim, seed) if module is None else module
    if init is not None:
        init(module)
    tensors = module.prepare(samples)
    if fabric.device.type == "cuda":  # page-locked host copies of what lives in RAM; never of an on-disk cache
        mapped = file_mappings()
        tensors = {k: v if _in_mappings(v, mapped) else v.pin_memory() for k, v in tensors.items()}
    # Fabric's wrappers forward every attribute of what they wrap, so the loop types them as what they wrap.
    wrapped: Any = fabric.setup_module(module)
    optimizer: Any = fabric.setup_optimizers(module.configure_optimizers())
    return FederatedLoop(fabric, wrapped, optimizer, algorithm, tensors, training_splits(algorithm, splits),
                         federation, optim, seed)


def file_mappings() -> list[tuple[int, int]]:
    """The address ranges of this process's file-backed memory maps (Linux ``/proc/self/maps``; ``[]`` elsewhere)."""
    try:
        lines = open("/proc/self/maps").read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 6 and parts[5].startswith("/"):  # a path: a mapped file (not the heap, stack, anonymous)
            lo, hi = parts[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def _in_mappings(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    """Whether ``tensor``'s memory is a memory-mapped file (an image or volume cache read lazily from disk): pinning
    it would copy the whole cache into page-locked RAM."""
    ptr = tensor.data_ptr()
    return any(lo <= ptr < hi for lo, hi in ranges)
