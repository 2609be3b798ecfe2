"""A memory-mapped cache gives the pages a batch touched back to the kernel after each batch (fedhb.mapped): after an
epoch over a tracked cache the process holds none of its pages, while a bare map holds all it touched."""

from __future__ import annotations

import gc
import sys

import numpy as np
import pytest
import torch

from fedhb import mapped
from fedhb.resources import memory_status

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


class Host:
    """The part of Fabric that gather uses, on the CPU."""

    @staticmethod
    def to_device(t):
        return t


def rss_file_mb() -> float:
    return memory_status()["RssFile"] / 1024


def epoch(tensors, n):
    total = 0
    for start in range(0, n, 64):
        batch = mapped.gather(Host, tensors, torch.arange(start, min(n, start + 64)))
        total += int(batch["pixels"].sum())
    return total


@pytest.mark.parametrize("tracked", [True, False])
def test_an_epoch_over_a_tracked_cache_leaves_none_of_its_pages_in_the_process(tmp_path, tracked):
    values = (np.arange(4096 * 128 * 128) % 251).astype(np.uint8).reshape(4096, 128, 128)  # 64 MB
    np.save(tmp_path / "cache.npy", values)
    expected = int(values.sum(dtype=np.int64))
    del values
    gc.collect()
    array = np.load(tmp_path / "cache.npy", mmap_mode="c")
    tensors = {"pixels": torch.from_numpy(mapped.track(array) if tracked else array)}
    before = rss_file_mb()

    assert epoch(tensors, 4096) == expected  # the same rows as read without the release
    grown = rss_file_mb() - before

    if tracked:
        assert grown < 12, grown  # a batch's pages and the library pages the epoch touched
    else:
        assert grown > 48, grown
        mapped.track(array)  # released from now on
        mapped.release()
        assert rss_file_mb() - before < 12


def test_release_forgets_caches_that_were_closed_or_collected(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 8), dtype=np.uint8))
    mapped._TRACKED.clear()
    kept = mapped.track(np.load(tmp_path / "a.npy", mmap_mode="c"))
    gone = mapped.track(np.load(tmp_path / "a.npy", mmap_mode="c"))
    assert mapped.track(np.zeros(3)) is not None and len(mapped._TRACKED) == 2  # an array in RAM is not tracked
    del gone
    gc.collect()

    assert mapped.release() == 1 and len(mapped._TRACKED) == 1
    kept._mmap.close()
    assert mapped.release() == 0 and not mapped._TRACKED
