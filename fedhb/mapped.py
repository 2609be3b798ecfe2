"""Memory-mapped caches whose pages each batch gives back, so that reading a cache larger than RAM keeps a process's
resident memory at a batch's pages rather than at every page it has touched.

Linux counts the pages of a mapped file that a process has touched in its RSS until they are unmapped, so one epoch
over a memory-mapped image cache makes the process look as large as the cache (page cache, reclaimable, but counted
by job schedulers and by ``benchmarks/``). :func:`track` registers a cache array when it is opened;
:func:`release` (called after each batch is gathered, :func:`gather`) tells the kernel that the process no longer
needs the pages it mapped (``madvise(MADV_DONTNEED)``): they leave the process's RSS and stay in the page cache, so a
later read costs a page-table fill, not a disk read. Only read-only use is safe: the caches are opened copy-on-write
and nothing writes to them (a written page would return to the file's content).
"""

from __future__ import annotations

import mmap
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

_TRACKED: list[weakref.ref[np.memmap]] = []


def track(array: np.memmap) -> np.memmap:
    """Register ``array`` (an ``np.load(..., mmap_mode=...)`` result) so that :func:`release` drops its pages."""
    if isinstance(array, np.memmap) and getattr(array, "_mmap", None) is not None:
        _TRACKED.append(weakref.ref(array))
    return array


def release() -> int:
    """Drop the touched pages of every tracked cache that is still open from this process's RSS; the number of
    caches released (0, at no cost, when none is open)."""
    if not _TRACKED:
        return 0
    live = 0
    for ref in list(_TRACKED):
        array = ref()
        handle = None if array is None else getattr(array, "_mmap", None)
        if handle is None or handle.closed:
            _TRACKED.remove(ref)
            continue
        handle.madvise(mmap.MADV_DONTNEED)
        live += 1
    return live


def gather(fabric: Any, tensors: Mapping[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
    """The batch of ``rows`` of every prepared tensor, on the device (a copy: a cache's pages are released after)."""
    batch = {k: fabric.to_device(v[rows]) for k, v in tensors.items()}
    release()
    return batch
