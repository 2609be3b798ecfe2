"""FLoRA."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from torch import Tensor

from fedhb import seeds
from fedhb.algorithms._ops import State, stack_lora, state_bytes, weighted_average
from fedhb.algorithms.base import Aggregate, Algorithm
from fedhb.models.lora import RANK_KEY, is_lora, is_lora_a, is_lora_b, layer_of, lora_pairs, rank_of, rank_part

#: A client's LoRA rank, kept in its state when ``--algorithm.ranks`` is given (the model runs its adapters at it).
RANK = RANK_KEY


def run_key(initial: State) -> int:
    """A 64-bit key of the run, the same on every rank: a digest of the initial LoRA A matrices.

    The contract hands :meth:`~fedhb.algorithms.base.Algorithm.setup` the initial model, not the run seed; the run
    seed determines the initial model (``fedhb.build.build_module`` seeds torch with it), so its A matrices stand in
    for it.
    """
    digest = hashlib.sha256()
    for name in sorted(k for k in initial if is_lora_a(k)):
        digest.update(name.encode())
        digest.update(initial[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "little")


def fresh_a(key: int, rnd: int, layer: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """LoRA A of adapted layer ``layer`` (its index in model order) after aggregation ``rnd``: peft's initialisation,
    ``kaiming_uniform_(a=sqrt(5))`` (uniform on ``+-1/sqrt(in)``), drawn from the stream
    ``[key, rnd, LORA_REDRAW, layer]``. One generator per layer, filled row by row, so the first ``r_k`` rows of a
    rank-``r`` draw are a rank-``r_k`` draw."""
    gen = torch.Generator().manual_seed(seeds.derive(key, rnd, seeds.Stream.LORA_REDRAW, layer))
    a = torch.empty(shape, dtype=torch.float32)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
    return a.to(dtype)


class FLoRA(Algorithm):
    """FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
    Adaptations", arXiv 2409.05976): exact aggregation of LoRA updates by stacking, for any ranks per client.

    Averaging A and B separately gives ``mean(B) mean(A)``, not the mean update ``mean(B A)``. FLoRA stacks the
    clients' factors, ``A = [p_1 s_1 A_1; ...; p_n s_n A_n]`` and ``B = [B_1, ..., B_n]``, so that
    ``B A = sum_k p_k s_k B_k A_k`` exactly (``p_k = n_k / n``, ``s_k = alpha / r_k`` client k's LoRA scaling), whatever
    the ranks ``r_k``; the update is merged into the frozen weights and the clients restart from fresh adapters. The
    head is averaged like FedAvg. Everyone shares one global model.

    Different ranks per client (``--algorithm.ranks``): the process's one model holds adapters of rank
    ``--model.lora.r``, the largest; client k uses the first ``r_k`` rows of every A and columns of every B, the rest
    held at zero (their gradients are then exactly zero, so they stay zero under any optimizer), and LoRA's scaling
    set to ``alpha / r_k`` while it is loaded. A client uploads its ``r_k``-rank factors only, so ``bytes_up`` counts
    what a rank-``r_k`` client sends.

    Here the server keeps the accumulated update ``sum_t sum_k p_k (r / r_k) B_k A_k`` of every adapted layer (``r`` =
    ``--model.lora.r``; it is checkpointed with the server state) and hands it to the loop with every aggregate
    (:class:`~fedhb.algorithms.base.Aggregate`'s ``backbone``), which writes ``W_0 + (alpha / r) * update`` into the
    process's frozen base weights that every client of the process shares. Running a client at its rank is the
    model's job (:class:`fedhb.models.lora.RankedAdapters`): its state carries the rank.
    ``bytes_down`` counts what the paper sends each client: the round's stacked factors and the head. Deliberate
    differences:

    - After aggregation ``t`` every client's adapter restarts from B = 0 and a fresh A drawn as peft initialises it
      (:func:`fresh_a`, from the stream ``[run key, t]``: the same on every client and rank, cut to the client's
      rank), as FederatedLLM's ``main.py`` re-creates the adapters every round; round 1 trains from the initial
      model's A. Restarting from one A every round instead keeps the accumulated update in that A's row space: on
      the tiny ViT (3 clients, 6 rounds, r = 8) its numerical rank (singular values above 1e-3 of the largest) stays
      at 8 or 9 per layer with all of its energy in the row space of the initial A; with the redraw it reaches 23 to
      26, and 0.26 to 0.29 of its energy stays there. FederatedLLM draws a different A on every client; one per
      round is the same in distribution and keeps round ``t``'s adapters a function of the run alone. The fresh A
      is not counted as downloaded: a client rebuilds it from the run key.
    - A client that missed aggregations (``--federation.fraction`` < 1) catches up by downloading the accumulated
      update of every adapted layer as a dense matrix (``out x in``) and the head, which is what is counted; the
      paper has every client take part in every round.

    Under ``--federation.client_batch`` it trains one client at a time (its clients run their adapters at ranks of their
    own).
    """

    client_batchable = False

    has_global_model = True

    def __init__(self, ranks: list[int] | None = None) -> None:
        """
        Args:
            ranks: LoRA rank of each client, repeated over the client ids (client ``c`` uses
                ``ranks[c % len(ranks)]``), each at most ``--model.lora.r``; e.g. ``[8, 4, 2]``. Default: every client
                uses ``--model.lora.r``.
        """
        if ranks is not None:
            ranks = [int(r) for r in ranks]
            if not ranks or min(ranks) < 1:
                raise ValueError(f"--algorithm.ranks must be a non-empty list of ranks >= 1, got {ranks!r}")
        self.ranks = ranks
        self._rank = 0  # --model.lora.r: the rank of the process's adapters
        self._itemsize = 4
        self._key = 0  # run_key(initial)
        self._initial: State = {}  # the initial adapters (B = 0)
        self._fresh: State = {}  # the adapters every client restarts from after the latest aggregation (full rank)
        self._resets: dict[int, State] = {}  # rank -> those adapters cut to that rank
        self._head: State | None = None
        self._update: dict[str, Tensor] = {}  # layer path -> accumulated sum_k p_k (r / r_k) B_k A_k (float64)
        self._stack_bytes = 0  # size of the last aggregation's stacked factors
        self._version = 0

    def setup(self, names: list[str], initial: State | None = None, num_clients: int | None = None) -> None:
        super().setup(names, initial, num_clients)
        if initial is None:
            raise ValueError("FLoRA needs the initial model in setup() to reset the adapters after each round")
        pairs = lora_pairs(names)
        self._rank = rank_of(initial)
        self._itemsize = initial[pairs[0][0]].element_size() if pairs else 4  # bytes per adapter element
        if self.ranks is not None:
            if not pairs:
                raise ValueError("--algorithm.ranks needs a model with LoRA adapters (--model.lora)")
            if max(self.ranks) > self._rank:
                raise ValueError(
                    f"--algorithm.ranks has rank {max(self.ranks)} but --model.lora.r is {self._rank}: the model "
                    f"holds every client's adapters at --model.lora.r, so set --model.lora.r {max(self.ranks)}")
        self._key = run_key(initial)
        self._initial = {k: (torch.zeros_like(v) if is_lora_b(k) else v.clone()) for k, v in initial.items()
                         if is_lora(k)}
        self._restart()

    layer_of = staticmethod(layer_of)

    def rank_of(self, client: int) -> int:
        """Client ``client``'s LoRA rank."""
        return self._rank if self.ranks is None else self.ranks[client % len(self.ranks)]

    def _rank_in(self, state: State) -> int:
        """The rank of the client whose ``state`` this is (the model's for the global model)."""
        return int(state[RANK]) if RANK in state else self._rank

    def _restart(self) -> None:
        """Set the adapters clients restart from: the initial ones before any aggregation, a fresh A after."""
        if self._version == 0:
            self._fresh = self._initial
        else:
            names = [a for a, _ in lora_pairs(list(self._initial))]
            self._fresh = {k: torch.zeros_like(v) for k, v in self._initial.items()}
            for layer, a in enumerate(names):
                self._fresh[a] = fresh_a(self._key, self._version, layer, tuple(self._initial[a].shape),
                                         self._initial[a].dtype)
        self._resets = {self._rank: self._fresh}

    def _reset(self, rank: int) -> State:
        """The adapters a rank-``rank`` client restarts from, at the model's shape (zero beyond ``rank``)."""
        if rank not in self._resets:
            reset = {k: v.clone() for k, v in self._fresh.items()}
            for k, v in reset.items():
                rank_part(k, v, rank, beyond=True).zero_()
            self._resets[rank] = reset
        return self._resets[rank]

    def init_client_state(self, state: State, client: int) -> State:
        if self.ranks is None:
            return state
        rank = self.rank_of(client)
        state.update({k: v.clone() for k, v in self._reset(rank).items()})
        state[RANK] = torch.tensor(rank)
        return state

    def upload(self, state: State) -> State:
        rank = self._rank_in(state)
        return {k: rank_part(k, v, rank) for k, v in self.model_part(state).items()}

    def aggregate(self, uploads: dict[int, State], num_samples: dict[int, int]) -> Aggregate:
        ids = sorted(uploads)
        n = sum(num_samples[i] for i in ids)
        p = [num_samples[i] / n for i in ids]
        self._stack_bytes = 0
        for a, b in lora_pairs(uploads[ids[0]]):
            factors_a, factors_b = [uploads[i][a] for i in ids], [uploads[i][b] for i in ids]
            # Client k's LoRA scaling alpha / r_k, relative to the model's alpha / r that the merge applies.
            relative = [self._rank / f.shape[0] for f in factors_a]
            stacked_a, stacked_b = stack_lora(factors_a, factors_b, p, relative)
            layer = layer_of(a)
            update = stacked_b @ stacked_a
            self._update[layer] = self._update[layer] + update if layer in self._update else update
            self._stack_bytes += sum(f.numel() * f.element_size() for f in factors_a + factors_b)
        heads = [k for k in uploads[ids[0]] if not is_lora(k)]
        if heads:
            self._head = weighted_average([{k: uploads[i][k] for k in heads} for i in ids],
                                          [num_samples[i] for i in ids])
        self._version += 1
        self._restart()
        received = {i: {**self._reset(self.rank_of(i)), **(self._head or {})} for i in ids}
        glob = self.global_state()
        return Aggregate(received, bytes_down={i: self.download_bytes(s) for i, s in received.items()},
                         catch_up_bytes=self.download_bytes(glob, catch_up=True) if glob is not None else None,
                         backbone=self.backbone_update())

    def global_state(self) -> State | None:
        if self._version == 0:
            return None
        return {**self._reset(self._rank), **(self._head or {})}

    def download_bytes(self, state: State, catch_up: bool = False) -> int:
        """Bytes a client downloads to receive ``state``: the round's stacked factors and the head or, catching up
        after missed rounds, the accumulated update of every adapted layer as a dense matrix and the head."""
        head = state_bytes({k: v for k, v in state.items() if not is_lora(k)})
        if not catch_up:
            return head + self._stack_bytes
        return head + sum(u.numel() for u in self._update.values()) * self._itemsize

    def backbone_update(self) -> dict[str, Tensor]:
        """``{layer path: accumulated update}``, what the frozen backbone holds on top of its original weights."""
        return dict(self._update)

    def merged_update(self, layer: str) -> Tensor:
        """The accumulated ``sum_t sum_k p_k (r / r_k) B_k A_k`` of ``layer`` (float64, before LoRA's scaling
        ``alpha / r``)."""
        return self._update[layer]

    def state_dict(self) -> dict[str, Any]:
        return {"update": self._update, "head": self._head, "version": self._version}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._update, self._head, self._version = dict(state["update"]), state["head"], int(state["version"])
        self._restart()  # the adapters of aggregation `version`, redrawn from the run key
