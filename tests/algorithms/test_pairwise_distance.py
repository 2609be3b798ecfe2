"""EPFL's pairwise distances in row blocks: the same numbers whatever the block size or the number of clients."""

from __future__ import annotations

import pytest
import torch

from fedhb.algorithms._ops import pairwise_distance


def _reference(v: torch.Tensor) -> torch.Tensor:
    """The ``(n, n, d)`` difference tensor of the first implementation, kept here as the reference."""
    v = v.double()
    return (v[:, None, :] - v[None, :, :]).pow(2).sum(-1).sqrt()


@pytest.mark.parametrize("block_elements", [1, 7, 50, 1 << 22])
def test_blocked_distances_equal_the_full_difference_tensor(block_elements):
    v = torch.randn(23, 40, generator=torch.Generator().manual_seed(0))

    d = pairwise_distance(v, block_elements=block_elements)

    torch.testing.assert_close(d, _reference(v), rtol=0, atol=1e-12)
    assert torch.equal(d, d.T) and not d.diagonal().any()


def test_distances_do_not_depend_on_the_other_clients():
    v = torch.randn(30, 16, generator=torch.Generator().manual_seed(1))

    some, all_ = pairwise_distance(v[:7], block_elements=5), pairwise_distance(v, block_elements=1 << 10)

    torch.testing.assert_close(some, all_[:7, :7], rtol=0, atol=1e-12)


def test_distances_by_hand():
    v = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])

    d = pairwise_distance(v, block_elements=2)

    assert d.tolist() == [[0.0, 5.0, 1.0], [5.0, 0.0, 18 ** 0.5], [1.0, 18 ** 0.5, 0.0]]
