"""Every collective the federation uses, in one place.

Clients are sharded over ranks (``owner[c]`` is client ``c``'s rank). What crosses ranks is flat float rows of
adapter tensors (uploads, checkpoint states), short float rows per client (status, scores), sums of scalars and of
task statistics, and, at set-up or when a client failed, small picklable objects. Raw data never crosses. With one
process every operation is the identity and no collective runs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fedhb.algorithms._ops import State

if TYPE_CHECKING:
    from lightning.fabric import Fabric

#: How a state is packed for a collective: ``(name, shape, dtype)`` of each tensor, in order.
Layout = list[tuple[str, torch.Size, torch.dtype]]

# Lightning's all_gather goes through a torch function that warns on every call; the call itself is what we want.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")


def layout_of(state: Mapping[str, Tensor]) -> Layout:
    return [(k, v.shape, v.dtype) for k, v in state.items()]


class Collectives:
    """Collectives over Fabric's ranks for clients placed by ``owner``.

    Args:
        fabric: The launched Fabric.
        owner: The rank of every client.
    """

    def __init__(self, fabric: Fabric, owner: list[int]) -> None:
        self.fabric, self.owner = fabric, owner
        self.world, self.rank = fabric.world_size, fabric.global_rank

    def from_every_rank(self, own: dict[int, Any]) -> dict[int, Any]:
        """The union of every rank's ``own`` (picklable objects, one broadcast per rank; for set-up and failures)."""
        if self.world == 1:
            return dict(own)
        union: dict[int, Any] = {}
        for r in range(self.world):
            theirs: Any = self.fabric.broadcast(own if r == self.rank else None, src=r)
            union.update(theirs)
        return union

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj if self.world == 1 else self.fabric.broadcast(obj, src=src)

    def rows(self, clients: list[int], rows: dict[int, Tensor], width: int) -> dict[int, Tensor]:
        """All ranks' ``{client: 1-D float64 tensor of length width}`` for ``clients``, via one all_gather."""
        per_rank, block = self._block(clients, width, torch.float64)
        for j, c in enumerate(per_rank[self.rank]):
            block[j] = rows[c]
        return self._gather(per_rank, block)

    def states(self, clients: list[int], local: dict[int, State], layouts: Mapping[int, Layout]) -> dict[int, State]:
        """Every rank's ``{client: state}`` for ``clients``, client ``c``'s laid out as ``layouts[c]``.

        Each state is packed into its row of one block (as wide as the largest), all-gathered once and unpacked as
        views of the gathered block, so the result holds each state once. The block is float32 when every tensor is
        float32 or narrower (bit-exact) and float64 otherwise.
        """
        width = max((sum(math.prod(shape) for _, shape, _ in layouts[c]) for c in clients), default=0)
        if width == 0:
            return {c: {} for c in clients}
        narrow = all(dtype in (torch.float32, torch.bfloat16, torch.float16) for c in clients for _, _, dtype in
                     layouts[c])
        carrier = torch.float32 if narrow else torch.float64
        per_rank, block = self._block(clients, width, carrier)
        for j, c in enumerate(per_rank[self.rank]):
            offset = 0
            for k, shape, _ in layouts[c]:
                n = math.prod(shape)
                block[j, offset:offset + n] = local[c][k].detach().reshape(-1)
                offset += n
        out: dict[int, State] = {}
        for c, row in self._gather(per_rank, block).items():
            parts, offset = {}, 0
            for k, shape, dtype in layouts[c]:
                n = math.prod(shape)
                part = row[offset:offset + n].view(shape)
                parts[k] = part if dtype == carrier else part.to(dtype)
                offset += n
            out[c] = parts
        return out

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        total: Any = self.fabric.all_reduce(torch.tensor(value, dtype=torch.float64), reduce_op="sum")
        return float(total)

    def max(self, value: float) -> float:
        """The largest ``value`` over the ranks (a stop request on any rank stops them all)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        op: Any = dist.ReduceOp.MAX
        total: Any = self.fabric.all_reduce(torch.tensor(value, dtype=torch.float64), reduce_op=op)
        return float(total)

    def sum_tensor(self, tensor: Tensor) -> Tensor:
        if self.world == 1:
            return tensor
        total: Any = self.fabric.all_reduce(self.fabric.to_device(tensor), reduce_op="sum")
        return total.cpu()

    def _block(self, clients: list[int], width: int, dtype: torch.dtype) -> tuple[list[list[int]], Tensor]:
        """Each rank's share of ``clients`` and a zero ``(largest share, width)`` block for this rank's rows."""
        per_rank = [[c for c in clients if self.owner[c] == r] for r in range(self.world)]
        return per_rank, torch.zeros(max(1, max(len(p) for p in per_rank)), width, dtype=dtype)

    def _gather(self, per_rank: list[list[int]], block: Tensor) -> dict[int, Tensor]:
        if self.world == 1:
            gathered = block[None]
        else:
            out: Any = self.fabric.all_gather(self.fabric.to_device(block))
            gathered = out.cpu()
        return {c: gathered[r, j] for r in range(self.world) for j, c in enumerate(per_rank[r])}
