"""APPLE."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from fedhb.algorithms._ops import State, linear_combination
from fedhb.algorithms.base import Algorithm, algo_key

if TYPE_CHECKING:
    from fedhb.algorithms.trainer import LocalTrainer

CORE, P = algo_key("apple", "core/"), algo_key("apple", "p")


def core_key(client: int, name: str) -> str:
    return f"{CORE}{client}/{name}"


class APPLE(Algorithm):
    """APPLE (Luo and Wu, "Adapt to Adaptation: Learning Personalization for Cross-Silo Federated Learning",
    IJCAI 2022, arXiv 2110.08394).

    Every client trains a *core* model and a directed-relationship vector ``p_i`` over the ``N`` clients; its
    personalized model is ``sum_j p_ij core_j``, mixing its own core with the latest cores downloaded from the others.
    A local step computes the gradient ``g`` of the loss at the personalized model and updates
    ``core_i <- core_i - lr * p_ii * g`` and ``p_ij <- p_ij - dr_lr * (<g, core_j> + lambda(r) * mu * (p_ij - 1/N))``,
    where ``lambda(r) = (1 + cos(pi r / L)) / 2`` for rounds ``r <= L = prox_rounds * rounds`` and 0 after (the paper's
    cosine loss scheduler). Clients upload their core; each receives the other participants' cores.

    Deliberate differences: every client downloads every other participant's core each round (the paper's ``M`` is
    ``N - 1``; cross-silo federations are small); ``p`` starts uniform at ``1/N`` and the proximal target is that
    uniform vector; cores and ``p`` take plain SGD steps; the cores are the LoRA factors and head, mixed
    parameter-wise. Communication and per-client memory grow with ``N``: each client stores ``N`` cores.

    Client state: ``algo/apple/core/{j}/*`` (the latest core of client ``j``; the client's own slot mirrors its model
    tensors) and ``algo/apple/p``.
    """

    def __init__(self, mu: float = 0.1, dr_lr: float = 0.001, prox_rounds: float = 0.1) -> None:
        """
        Args:
            mu: Weight of the proximal term that keeps ``p`` near uniform early on.
            dr_lr: Learning rate of the directed-relationship vector.
            prox_rounds: Fraction of the rounds over which the proximal term decays to 0 (``L / rounds``).
        """
        if mu < 0:
            raise ValueError(f"--algorithm.mu must be >= 0, got {mu!r}")
        if dr_lr < 0:
            raise ValueError(f"--algorithm.dr_lr must be >= 0, got {dr_lr!r}")
        if not 0 <= prox_rounds <= 1:
            raise ValueError(f"--algorithm.prox_rounds must be in [0, 1], got {prox_rounds!r}")
        self.mu, self.dr_lr, self.prox_rounds = mu, dr_lr, prox_rounds

    def setup(self, names: list[str], initial: State | None = None, num_clients: int | None = None) -> None:
        super().setup(names, initial, num_clients)
        if num_clients is None:
            raise ValueError("APPLE needs the number of clients in setup()")

    def init_client_state(self, state: State, client: int) -> State:
        n = self.num_clients or 1
        model = list(self.model_part(state))
        for j in range(n):
            state.update({core_key(j, k): state[k].clone() for k in model})
        state[P] = torch.full((n,), 1.0 / n, dtype=torch.float64)
        return state

    def personalized_model(self, state: State) -> State:
        p = state[P]
        return linear_combination([{k: state[core_key(j, k)] for k in self.names} for j in range(len(p))], p)

    def proximal_weight(self, rnd: int, rounds: int) -> float:
        """``lambda(r)``: the cosine loss scheduler."""
        horizon = self.prox_rounds * rounds
        return 0.5 * (math.cos(math.pi * rnd / horizon) + 1) if 0 < horizon and rnd <= horizon else 0.0

    def local_update(self, trainer: LocalTrainer, state: State) -> None:
        me = trainer.client
        n = len(state[P])
        own = trainer.read()
        # cores[k][j] is client j's tensor k; the own row is rewritten after every step.
        cores = {k: torch.stack([own[k] if j == me else state[core_key(j, k)].to(own[k].device) for j in range(n)])
                 for k in self.names}
        p = state[P].to(trainer.device)
        prox = self.proximal_weight(trainer.round, trainer.rounds) * self.mu
        for _, batch in trainer.batches(trainer.epochs):
            trainer.load({k: torch.tensordot(p.to(c.dtype), c, dims=1) for k, c in cores.items()})
            g = trainer.gradients(batch)
            grad_p = sum((c * g[k]).flatten(1).sum(1).to(torch.float64) for k, c in cores.items())
            grad_p = grad_p + prox * (p - 1.0 / n)
            for k, c in cores.items():
                c[me] -= trainer.lr * p[me].to(c.dtype) * g[k]
            p = p - self.dr_lr * grad_p
        trainer.load({k: c[me] for k, c in cores.items()})
        state[P] = p.cpu()
        state.update({core_key(me, k): c[me].cpu().clone() for k, c in cores.items()})

    def aggregate(self, uploads: dict[int, State], num_samples: dict[int, int]) -> dict[int, State]:
        ids = sorted(uploads)
        return {i: {core_key(j, k): v for j in ids if j != i for k, v in uploads[j].items()} for i in ids}
