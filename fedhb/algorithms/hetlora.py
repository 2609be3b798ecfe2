"""HetLoRA."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fedhb.algorithms._ops import State, state_bytes, weighted_average
from fedhb.algorithms.base import Aggregate, Algorithm, algo_key
from fedhb.models.lora import RANK_KEY, is_lora, lora_pairs, rank_of, rank_part

if TYPE_CHECKING:
    from fedhb.algorithms.trainer import LocalTrainer

#: The rank a client started the run with: its uploads keep that layout (zero beyond its current rank).
INITIAL = algo_key("hetlora", "rank0")
#: The norm of the client's prunable tail after its previous round (-1: none yet).
TAIL = algo_key("hetlora", "tail")


class HetLoRA(Algorithm):
    """HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
    arXiv 2401.06432): clients of different LoRA ranks, zero-padded sparsity-weighted aggregation, rank
    self-pruning. The baseline beside ``FLoRA(ranks=...)``, which aggregates the same clients exactly by stacking.

    The server holds a global adapter at ``--model.lora.r`` (the largest rank). Client ``k`` of rank ``r_k``
    receives its first ``r_k`` components (rows of A, columns of B) and runs at them (the model's job, through
    :data:`fedhb.models.lora.RANK_KEY`, with LoRA's scaling ``alpha / r_k``). Local training adds
    ``lam * sum_layers ||A_tail||_F ||B_tail||_F``, the tail being components ``floor(gamma r_k) .. r_k``; when the
    tail's norm after local training is smaller than after the client's previous round, the client prunes it:
    ``r_k <- floor(gamma r_k)`` (at least ``min_rank``), its pruned components set to zero (rank self-pruning).
    The server zero-pads every client's factors to the full rank and averages A and B separately with weights
    ``p_k = ||B_k A_k||_F / sum_j ||B_j A_j||_F`` per layer (sparsity-weighted aggregation;
    ``weighting="samples"``: ``n_k / n``, FederatedLLM's ``zero_padding`` aggregation). The head is averaged like
    FedAvg. The global adapter at full rank and the head are the global model.

    Deliberate differences: a client uploads the factors of its initial rank (zero beyond its current one), since
    the loop fixes each client's upload layout at set-up, so ``bytes_up`` counts the initial rank; downloads count a
    client's current rank. Factors of different ranks are averaged
    as they are, each trained at its own scaling ``alpha / r_k``, as zero-padding aggregation does.

    Client state: :data:`~fedhb.models.lora.RANK_KEY` (the current rank), ``algo/hetlora/rank0`` and
    ``algo/hetlora/tail`` (the tail's norm after the previous round).

    Under ``--federation.client_batch`` it trains one client at a time (its clients run their adapters at ranks of their
    own).
    """

    client_batchable = False

    has_global_model = True

    def __init__(self, ranks: list[int] | None = None, gamma: float = 0.99, lam: float = 0.01, min_rank: int = 1,
                 weighting: str = "sparsity") -> None:
        """
        Args:
            ranks: Initial LoRA rank of each client, repeated over the client ids (client ``c`` uses
                ``ranks[c % len(ranks)]``), each at most ``--model.lora.r``; default: every client at
                ``--model.lora.r``.
            gamma: Pruning decay: a pruned client keeps ``floor(gamma r_k)`` components (1: never prune).
            lam: Weight of the tail regulariser (0: no regulariser).
            min_rank: No client is pruned below this rank.
            weighting: ``sparsity`` (the paper) or ``samples``.
        """
        if ranks is not None:
            ranks = [int(r) for r in ranks]
            if not ranks or min(ranks) < 1:
                raise ValueError(f"--algorithm.ranks must be a non-empty list of ranks >= 1, got {ranks!r}")
        if not 0 < gamma <= 1:
            raise ValueError(f"--algorithm.gamma must be in (0, 1], got {gamma!r}")
        if lam < 0 or min_rank < 1:
            raise ValueError(f"--algorithm.lam must be >= 0 and --algorithm.min_rank >= 1, got {lam!r}, {min_rank!r}")
        if weighting not in ("sparsity", "samples"):
            raise ValueError(f"--algorithm.weighting must be sparsity or samples, got {weighting!r}")
        self.ranks, self.gamma, self.lam, self.min_rank, self.weighting = ranks, gamma, lam, min_rank, weighting
        self._rank = 0
        self._global: State | None = None

    def setup(self, names: list[str], initial: State | None = None, num_clients: int | None = None) -> None:
        super().setup(names, initial, num_clients)
        if initial is None or not lora_pairs(names):
            raise ValueError("HetLoRA needs a model with LoRA adapters (--model.lora) and its initial state")
        self._rank = rank_of(initial)
        if self.ranks is not None and max(self.ranks) > self._rank:
            raise ValueError(f"--algorithm.ranks has rank {max(self.ranks)} but --model.lora.r is {self._rank}: the "
                             f"model holds every client's adapters at --model.lora.r, so set --model.lora.r "
                             f"{max(self.ranks)}")

    def rank_of(self, client: int) -> int:
        """Client ``client``'s initial LoRA rank."""
        return self._rank if self.ranks is None else self.ranks[client % len(self.ranks)]

    def init_client_state(self, state: State, client: int) -> State:
        rank = self.rank_of(client)
        for k in self.model_part(state, keep=is_lora):
            state[k] = state[k].clone()
            rank_part(k, state[k], rank, beyond=True).zero_()
        state[RANK_KEY] = torch.tensor(rank)
        state[INITIAL] = torch.tensor(rank)
        state[TAIL] = torch.tensor(-1.0, dtype=torch.float64)
        return state

    def upload(self, state: State) -> State:
        initial = int(state[INITIAL])
        return {**{k: rank_part(k, v, initial) for k, v in self.model_part(state).items()}, RANK_KEY: state[RANK_KEY]}

    def tail_norm(self, tensors: dict[str, Tensor], rank: int) -> Tensor:
        """``sum_layers ||A[keep:rank]||_F ||B[:, keep:rank]||_F`` with ``keep = floor(gamma rank)``."""
        keep = int(self.gamma * rank)
        norms = [rank_part(a, rank_part(a, tensors[a], rank), keep, beyond=True).norm()
                 * rank_part(b, rank_part(b, tensors[b], rank), keep, beyond=True).norm()
                 for a, b in lora_pairs(list(tensors))]
        return torch.stack(norms).sum() if norms else torch.zeros(())

    def local_update(self, trainer: LocalTrainer, state: State) -> None:
        rank = int(state[RANK_KEY])
        keep = max(self.min_rank, int(self.gamma * rank))
        if self.lam == 0 or keep >= rank:
            trainer.fit()
            return

        def tail(batch: dict[str, Tensor], out: dict[str, Tensor], rows: Tensor) -> Tensor:
            return self.lam * self.tail_norm(dict(trainer.params), rank)

        trainer.fit(loss=tail)
        after = trainer.read()
        norm, previous = float(self.tail_norm(after, rank)), float(state[TAIL])
        if 0 <= previous and norm < previous:  # the tail shrank since the last round: drop it
            for k in after:
                if is_lora(k):
                    rank_part(k, after[k], keep, beyond=True).zero_()
            trainer.load(after)
            state[RANK_KEY] = torch.tensor(keep)
            norm = -1.0  # a new tail: nothing to compare it with yet
        state[TAIL] = torch.tensor(norm, dtype=torch.float64)

    def aggregate(self, uploads: dict[int, State], num_samples: dict[int, int]) -> Aggregate:
        ids = sorted(uploads)
        full = self._rank
        new: State = {}
        for a, b in lora_pairs(list(uploads[ids[0]])):
            pad_a = [_pad(uploads[i][a], full, rows=True) for i in ids]
            pad_b = [_pad(uploads[i][b], full, rows=False) for i in ids]
            if self.weighting == "sparsity":
                norms = torch.stack([(pb @ pa).norm() for pa, pb in zip(pad_a, pad_b)])
                weights = norms / norms.sum() if norms.sum() > 0 else torch.full((len(ids),), 1.0 / len(ids),
                                                                                  dtype=torch.float64)
            else:
                weights = torch.tensor([num_samples[i] for i in ids], dtype=torch.float64)
                weights = weights / weights.sum()
            dtype = uploads[ids[0]][a].dtype
            new[a] = sum(w * p for w, p in zip(weights.tolist(), pad_a)).to(dtype)
            new[b] = sum(w * p for w, p in zip(weights.tolist(), pad_b)).to(dtype)
        heads = [k for k in uploads[ids[0]] if k != RANK_KEY and not is_lora(k)]
        if heads:
            new.update(weighted_average([{k: uploads[i][k] for k in heads} for i in ids],
                                        [num_samples[i] for i in ids]))
        self._global = new
        received, down = {}, {}
        for i in ids:
            rank = int(uploads[i][RANK_KEY])
            mine = {k: v.clone() for k, v in new.items()}
            for k, v in mine.items():
                if is_lora(k):  # rank_part hands other tensors back whole
                    rank_part(k, v, rank, beyond=True).zero_()
            received[i] = mine
            down[i] = state_bytes({k: rank_part(k, v, rank) for k, v in mine.items()})
        return Aggregate(received, bytes_down=down)

    def global_state(self) -> State | None:
        return self._global

    def state_dict(self) -> dict[str, Any]:
        return {"global": self._global} if self._global is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._global = state.get("global")


def _pad(factor: Tensor, rank: int, rows: bool) -> Tensor:
    """A client's A (``rows``) or B zero-padded to ``rank`` components, in float64."""
    f = factor.to(torch.float64)
    missing = rank - (f.shape[0] if rows else f.shape[1])
    return torch.nn.functional.pad(f, (0, 0, 0, missing) if rows else (0, missing))
