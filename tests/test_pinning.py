"""On CUDA, build_loop pins the prepared tensors that live in RAM and leaves an on-disk cache mapped (pinning a
memory-mapped image or volume cache would copy all of it into page-locked RAM)."""

from __future__ import annotations

import numpy as np
import torch

from fedhb.build import _in_mappings, file_mappings


def test_a_memory_mapped_cache_is_told_apart_from_tensors_in_ram(tmp_path):
    np.save(tmp_path / "cache.npy", np.arange(1 << 16, dtype=np.uint8).reshape(16, 64, 64))
    mapped = torch.from_numpy(np.load(tmp_path / "cache.npy", mmap_mode="r+"))
    in_ram = torch.from_numpy(np.load(tmp_path / "cache.npy"))
    ranges = file_mappings()

    assert _in_mappings(mapped, ranges) and _in_mappings(mapped[8:], ranges)
    assert not _in_mappings(in_ram, ranges) and not _in_mappings(torch.zeros(1 << 16), ranges)
