"""FLoRA."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fedhb.algorithms._ops import State, is_lora, lora_pairs, stack_lora, state_bytes, weighted_average
from fedhb.algorithms.base import Algorithm
from fedhb.client import ClientModule

#: A client's LoRA rank, kept in its state when ``--algorithm.ranks`` is given.
RANK = "algo/flora/rank"


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
    ``--model.lora.r``; it is checkpointed with the server state) and :meth:`on_load` writes
    ``W_0 + (alpha / r) * update`` into the process's frozen base weights, which every client of the process shares.
    ``bytes_down`` counts what the paper sends each client: the round's stacked factors and the head. Deliberate
    differences:

    - After each aggregation every client's adapter restarts from the run's initial A (a draw from LoRA's
      initialization, the same on every client, cut to the client's rank) and B = 0; the paper draws a fresh A. It is
      not counted as downloaded: a client rebuilds it from the run's seed.
    - A client that missed aggregations (``--federation.fraction`` < 1) catches up by downloading the accumulated
      update of every adapted layer as a dense matrix (``out x in``) and the head, which is what is counted; the
      paper has every client take part in every round.
    """

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
        self._layers: list[str] = []
        self._resets: dict[int, State] = {}  # rank -> the adapters a client of that rank restarts from
        self._head: State | None = None
        self._update: dict[str, Tensor] = {}  # layer path -> accumulated sum_k p_k (r / r_k) B_k A_k (float64)
        self._stack_bytes = 0  # size of the last aggregation's stacked factors
        self._version = 0
        self._merged = 0
        self._base: dict[str, Tensor] = {}  # layer path -> the process's original frozen weight
        self._scaling: dict[str, float] = {}  # layer path -> the module's own LoRA scaling, alpha / r

    def setup(self, names: list[str], initial: State | None = None, num_clients: int | None = None) -> None:
        super().setup(names, initial, num_clients)
        if initial is None:
            raise ValueError("FLoRA needs the initial model in setup() to reset the adapters after each round")
        pairs = lora_pairs(names)
        self._layers = [self.layer_of(a) for a, _ in pairs]
        self._rank = initial[pairs[0][0]].shape[0] if pairs else 0
        self._itemsize = initial[pairs[0][0]].element_size() if pairs else 4  # bytes per adapter element
        if self.ranks is not None:
            if not pairs:
                raise ValueError("--algorithm.ranks needs a model with LoRA adapters (--model.lora)")
            if max(self.ranks) > self._rank:
                raise ValueError(
                    f"--algorithm.ranks has rank {max(self.ranks)} but --model.lora.r is {self._rank}: the model "
                    f"holds every client's adapters at --model.lora.r, so set --model.lora.r {max(self.ranks)}")
        full = {k: (torch.zeros_like(v) if ".lora_B." in k else v.clone()) for k, v in initial.items() if is_lora(k)}
        self._resets = {self._rank: full}

    @staticmethod
    def layer_of(a_name: str) -> str:
        return a_name.split(".lora_A.")[0]

    def rank_of(self, client: int) -> int:
        """Client ``client``'s LoRA rank."""
        return self._rank if self.ranks is None else self.ranks[client % len(self.ranks)]

    @staticmethod
    def _at_rank(name: str, value: Tensor, rank: int, beyond: bool = False) -> Tensor:
        """A view of tensor ``name``'s first ``rank`` components (A's rows, B's columns) or, with ``beyond``, of the
        rest; tensors other than LoRA's are returned whole."""
        part = slice(rank, None) if beyond else slice(None, rank)
        if ".lora_A." in name:
            return value[part]
        if ".lora_B." in name:
            return value[:, part]
        return value

    def _rank_in(self, state: State) -> int:
        """The rank of the client whose ``state`` this is (the model's for the global model)."""
        return int(state[RANK]) if RANK in state else self._rank

    def _reset(self, rank: int) -> State:
        """The adapters a rank-``rank`` client restarts from, at the model's shape (zero beyond ``rank``)."""
        if rank not in self._resets:
            reset = {k: v.clone() for k, v in self._resets[self._rank].items()}
            for k, v in reset.items():
                self._at_rank(k, v, rank, beyond=True).zero_()
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
        return {k: self._at_rank(k, v, rank) for k, v in super().upload(state).items()}

    def aggregate(self, uploads: dict[int, State], num_samples: dict[int, int]) -> dict[int, State]:
        ids = sorted(uploads)
        n = sum(num_samples[i] for i in ids)
        p = [num_samples[i] / n for i in ids]
        self._stack_bytes = 0
        for a, b in lora_pairs(list(uploads[ids[0]])):
            factors_a, factors_b = [uploads[i][a] for i in ids], [uploads[i][b] for i in ids]
            # Client k's LoRA scaling alpha / r_k, relative to the model's alpha / r that on_load applies.
            relative = [self._rank / f.shape[0] for f in factors_a]
            stacked_a, stacked_b = stack_lora(factors_a, factors_b, p, relative)
            layer = self.layer_of(a)
            update = stacked_b @ stacked_a
            self._update[layer] = self._update[layer] + update if layer in self._update else update
            self._stack_bytes += sum(f.numel() * f.element_size() for f in factors_a + factors_b)
        heads = [k for k in uploads[ids[0]] if not is_lora(k)]
        if heads:
            self._head = weighted_average([{k: uploads[i][k] for k in heads} for i in ids],
                                          [num_samples[i] for i in ids])
        self._version += 1
        return {i: {**self._reset(self.rank_of(i)), **(self._head or {})} for i in ids}

    def global_state(self) -> State | None:
        if self._version == 0:
            return None
        return {**self._reset(self._rank), **(self._head or {})}

    def download_bytes(self, state: State, catch_up: bool = False) -> int:
        head = state_bytes({k: v for k, v in state.items() if not is_lora(k)})
        if not catch_up:
            return head + self._stack_bytes
        return head + sum(u.numel() for u in self._update.values()) * self._itemsize

    @torch.no_grad()
    def on_load(self, module: ClientModule, state: State) -> None:
        if self.ranks is not None:
            rank = self._rank_in(state)
            for layer in self._layers:
                lora: Any = module.get_submodule(layer)  # a peft LoRA Linear
                self._scaling.setdefault(layer, lora.scaling["default"])
                lora.scaling["default"] = self._scaling[layer] * self._rank / rank
            for name, param in module.trainable().items():
                if is_lora(name):
                    self._at_rank(name, param, rank, beyond=True).zero_()
        if self._merged == self._version:
            return
        for layer, update in self._update.items():
            lora = module.get_submodule(layer)
            weight = lora.base_layer.weight
            if layer not in self._base:
                self._base[layer] = weight.detach().clone()
            scaling = self._scaling.get(layer, lora.scaling["default"])
            weight.copy_((self._base[layer].to(torch.float64) + scaling * update.to(weight.device)).to(weight.dtype))
        self._merged = self._version

    def merged_update(self, layer: str) -> Tensor:
        """The accumulated ``sum_t sum_k p_k (r / r_k) B_k A_k`` of ``layer`` (float64, before LoRA's scaling
        ``alpha / r``)."""
        return self._update[layer]

    def hparams(self) -> dict[str, Any]:
        return {"ranks": "" if self.ranks is None else ",".join(map(str, self.ranks))}

    def state_dict(self) -> dict[str, Any]:
        return {"update": self._update, "head": self._head, "version": self._version}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._update, self._head, self._version = dict(state["update"]), state["head"], int(state["version"])
        self._merged = -1  # this process's frozen weights do not hold the loaded update yet
