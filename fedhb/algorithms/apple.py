"""APPLE."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from fedhb.algorithms._ops import State, linear_combination
from fedhb.algorithms.base import Algorithm, algo_key

if TYPE_CHECKING:
    from fedhb.algorithms.trainer import LocalTrainer

CORE, P = algo_key("apple", "core/"), algo_key("apple", "p")
#: The proximal target of ``p`` (the sample shares once known) and the shares as the server last sent them.
TARGET, SHARES = algo_key("apple", "p0"), algo_key("apple", "shares")


def core_key(client: int, name: str) -> str:
    return f"{CORE}{client}/{name}"


class APPLE(Algorithm):
    """APPLE (Luo and Wu, "Adapt to Adaptation: Learning Personalization for Cross-Silo Federated Learning",
    IJCAI 2022, arXiv 2110.08394), as its released code (ljaiverson/pFL-APPLE, ``train_APPLE.py``,
    ``utils/losses.py``, ``utils/apple.py``) runs it.

    Every client trains a *core* model and a directed-relationship vector ``p_i`` over the ``N`` clients; its
    personalized model is ``sum_j p_ij core_j``, mixing its own core with the latest cores downloaded from the others.
    A local step computes the gradient ``g`` of the loss at the personalized model; the own core's gradient is
    ``p_ii g`` and ``p``'s is ``<g, core_j> + 2 lambda(r) (p_ij - p0_j)``, the gradient of the code's regulariser
    ``lambda(r) ||p - p0||^2``; both take SGD steps with momentum ``momentum`` (0.9 in the code; the buffers start
    fresh each round), the core at the round's learning rate, ``p`` at ``dr_lr``. ``p`` and its target ``p0`` start
    at the clients' sample shares ``n_j / n``. The loss scheduler, with ``r`` the 0-based round and
    ``L = int(prox_rounds * rounds)``: ``lambda(r) = mu * 0.001^(r / L)`` (``exponential``, the code's default) or
    ``mu * (1 + cos(pi r / L)) / 2`` (``cosine``) for ``r < L``, 0 after. Clients upload their core; each receives
    the other participants' cores.

    Deliberate differences: every client downloads every other participant's core each round (the code's default
    ``limit_downloaded_models``; cross-silo federations are small); the cores are the LoRA factors and head, mixed
    parameter-wise (the code's layer-wise ``sum_j p_j layer_j(x)`` is the same for its linear and conv layers). The
    contract gives :meth:`setup` the client count but not the sample counts, so the server learns the shares from
    the sample counts that come with the uploads: until it has seen every client's (after round 1 when every
    client takes part), ``p`` and ``p0`` are uniform ``1 / N``; once a client receives the shares it sets
    ``p0 = n_j / n`` and shifts ``p`` by ``n_j / n - 1 / N`` (what round 1 taught it stays). Round 1 is where this
    departs from the code: all cores are still the initial model, so the personalized model is the same for any
    ``p`` that sums to 1, but the own core's steps are ``1 / N`` instead of ``n_i / n`` times the gradient (e.g. 0.25
    instead of 0.4 for a client holding 40 % of 4 clients' samples). ``init="uniform"`` keeps ``1 / N`` for the
    whole run. Communication and per-client memory grow with ``N``: each client stores ``N`` cores.

    Client state: ``algo/apple/core/{j}/*`` (the latest core of client ``j``; the client's own slot mirrors its model
    tensors), ``algo/apple/p``, ``algo/apple/p0`` (the proximal target) and ``algo/apple/shares`` (the shares as
    received).

    Under ``--federation.client_batch`` it trains one client at a time (its local step trains a mixture of every
    client's core).
    """

    client_batchable = False

    def __init__(self, mu: float = 0.1, dr_lr: float = 0.001, prox_rounds: float = 0.1,
                 schedule: str = "exponential", momentum: float = 0.9, init: str = "samples") -> None:
        """
        Args:
            mu: Weight of the regulariser that keeps ``p`` near ``p0`` early on.
            dr_lr: Learning rate of the directed-relationship vector.
            prox_rounds: Fraction of the rounds over which the regulariser decays to 0 (``L / rounds``).
            schedule: ``exponential`` (the code's default) or ``cosine``: the shape of that decay.
            momentum: SGD momentum of the core and ``p`` steps (the code: 0.9).
            init: ``samples`` (``p`` and ``p0`` at the clients' sample shares, as the code) or ``uniform``
                (``1 / N``).
        """
        if mu < 0:
            raise ValueError(f"--algorithm.mu must be >= 0, got {mu!r}")
        if dr_lr < 0:
            raise ValueError(f"--algorithm.dr_lr must be >= 0, got {dr_lr!r}")
        if not 0 <= prox_rounds <= 1:
            raise ValueError(f"--algorithm.prox_rounds must be in [0, 1], got {prox_rounds!r}")
        if schedule not in ("exponential", "cosine"):
            raise ValueError(f"--algorithm.schedule must be exponential or cosine, got {schedule!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"--algorithm.momentum must be in [0, 1), got {momentum!r}")
        if init not in ("samples", "uniform"):
            raise ValueError(f"--algorithm.init must be samples or uniform, got {init!r}")
        self.mu, self.dr_lr, self.prox_rounds = mu, dr_lr, prox_rounds
        self.schedule, self.momentum, self.init = schedule, momentum, init
        self._counts: dict[int, int] = {}  # training samples of every client the server has seen upload

    def setup(self, names: list[str], initial: State | None = None, num_clients: int | None = None) -> None:
        super().setup(names, initial, num_clients)
        if num_clients is None:
            raise ValueError("APPLE needs the number of clients in setup()")

    def init_client_state(self, state: State, client: int) -> State:
        n = self.num_clients or 1
        model = list(self.model_part(state))
        for j in range(n):
            state.update({core_key(j, k): state[k].clone() for k in model})
        for key in (P, TARGET, SHARES):
            state[key] = torch.full((n,), 1.0 / n, dtype=torch.float64)
        return state

    def personalized_model(self, state: State) -> State:
        p = state[P]
        return linear_combination([{k: state[core_key(j, k)] for k in self.names} for j in range(len(p))], p)

    def proximal_weight(self, rnd: int, rounds: int) -> float:
        """``lambda(r)`` of round ``rnd`` (1-based; the code counts from 0), the code's ``get_reg_coef``."""
        horizon = int(rounds * self.prox_rounds)
        r = rnd - 1
        if self.mu == 0 or r >= horizon:
            return 0.0
        if self.schedule == "cosine":
            return (math.cos(math.pi / horizon * r) + 1) / 2 * self.mu
        return 0.001 ** (r / horizon) * self.mu

    def local_update(self, trainer: LocalTrainer, state: State) -> None:
        me = trainer.client
        if not torch.equal(state[SHARES], state[TARGET]):  # the sample shares arrived: target them from now on
            state[P] = state[P] + (state[SHARES] - state[TARGET])
            state[TARGET] = state[SHARES].clone()
        n = len(state[P])
        own = trainer.read()
        # cores[k][j] is client j's tensor k; the own row is rewritten after every step.
        cores = {k: torch.stack([own[k] if j == me else state[core_key(j, k)].to(own[k].device) for j in range(n)])
                 for k in self.names}
        p = state[P].to(trainer.device)
        target = state[TARGET].to(trainer.device)
        coef = self.proximal_weight(trainer.round, trainer.rounds)
        core_buf: State = {}
        p_buf = None
        for _, batch in trainer.batches(trainer.epochs):
            trainer.load({k: torch.tensordot(p.to(c.dtype), c, dims=1) for k, c in cores.items()})
            g = trainer.gradients(batch)
            grad_p = sum((c * g[k]).flatten(1).sum(1).to(torch.float64) for k, c in cores.items())
            grad_p = grad_p + 2 * coef * (p - target)
            # SGD with momentum, as torch.optim.SGD: buf = momentum * buf + grad (buf = grad at the first step).
            for k, c in cores.items():
                grad = p[me].to(c.dtype) * g[k]
                core_buf[k] = grad if k not in core_buf else self.momentum * core_buf[k] + grad
                c[me] -= trainer.lr * core_buf[k]
            p_buf = grad_p if p_buf is None else self.momentum * p_buf + grad_p
            p = p - self.dr_lr * p_buf
        trainer.load({k: c[me] for k, c in cores.items()})
        state[P] = p.cpu()
        state.update({core_key(me, k): c[me].cpu().clone() for k, c in cores.items()})

    def aggregate(self, uploads: dict[int, State], num_samples: dict[int, int]) -> dict[int, State]:
        ids = sorted(uploads)
        self._counts.update({i: int(num_samples[i]) for i in ids})
        n = self.num_clients or len(ids)
        shares: State = {}
        if self.init == "samples" and len(self._counts) == n and sum(self._counts.values()) > 0:
            total = sum(self._counts.values())
            shares = {SHARES: torch.tensor([self._counts[j] / total for j in range(n)], dtype=torch.float64)}
        return {i: {**{core_key(j, k): v for j in ids if j != i for k, v in uploads[j].items()}, **shares}
                for i in ids}

    def state_dict(self) -> dict[str, Any]:
        return {"counts": torch.tensor([self._counts.get(j, -1) for j in range(self.num_clients or 0)])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        counts = state.get("counts")  # checkpoints from before the shares kept no server state
        self._counts = {} if counts is None else {j: int(c) for j, c in enumerate(counts.tolist()) if c >= 0}
