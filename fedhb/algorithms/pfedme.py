"""pFedMe."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fedhb.algorithms._ops import State
from fedhb.algorithms.base import algo_key
from fedhb.algorithms.fedavg import FedAvg

if TYPE_CHECKING:
    from fedhb.algorithms.trainer import LocalTrainer

#: The client's personalized model ``theta``.
PERSONAL = algo_key("pfedme", "theta/")


class PFedMe(FedAvg):
    """pFedMe (Dinh et al., "Personalized Federated Learning with Moreau Envelopes", arXiv 2006.08848), as the
    authors' code and PFLlib's ``clientpFedMe.py`` / ``pFedMeOptimizer`` run it.

    A client keeps a local copy ``w`` of the global model and a personalized model ``theta``. For every batch,
    ``theta`` takes ``inner_steps`` steps on the Moreau-envelope problem
    ``theta <- theta - personal_lr (grad f(theta) + lam (theta - w) + mu theta)``, then
    ``w <- w - lr lam (w - theta)`` (``lr`` the round's learning rate). ``theta`` and ``w`` start each round at the
    received global model. The client uploads ``w``; the server sets
    ``x <- (1 - beta) x + beta sum_k p_k w_k`` (``p_k`` the sample shares). Clients are scored with ``theta``;
    the global model ``x`` is scored on the union of the test splits.

    Deliberate differences: the inner and outer steps are plain SGD whatever ``--optim.name`` says (as the code);
    each batch counts once in the reported loss (the loss of its first inner step); applied to the trainable tensors
    (LoRA factors and head).

    Client state: ``algo/pfedme/theta/*``.

    Under ``--federation.client_batch`` it trains one client at a time (it solves an inner problem per step).
    """

    client_batchable = False

    def __init__(self, lam: float = 15.0, inner_steps: int = 5, personal_lr: float = 0.01, mu: float = 0.001,
                 beta: float = 1.0) -> None:
        """
        Args:
            lam: Weight ``lambda`` of the Moreau envelope's pull between ``theta`` and ``w`` (the paper uses 15).
            inner_steps: Steps ``K`` on ``theta`` per batch (the paper uses 5).
            personal_lr: Step size of those steps (the paper uses 0.01 to 0.09).
            mu: L2 weight on ``theta`` in those steps (the code's 0.001).
            beta: Server mixing ``beta`` (1: plain averaging, the code's default).
        """
        if lam <= 0 or personal_lr <= 0 or mu < 0 or inner_steps < 1 or not 0 < beta <= 2:
            raise ValueError("--algorithm.lam and --algorithm.personal_lr must be > 0, --algorithm.mu >= 0, "
                             f"--algorithm.inner_steps >= 1 and --algorithm.beta in (0, 2]; got {lam!r}, "
                             f"{personal_lr!r}, {mu!r}, {inner_steps!r}, {beta!r}")
        super().__init__()
        self.lam, self.inner_steps, self.personal_lr, self.mu, self.beta = lam, inner_steps, personal_lr, mu, beta

    def setup(self, names: list[str], initial: State | None = None, num_clients: int | None = None) -> None:
        super().setup(names, initial, num_clients)
        if initial is None:
            raise ValueError("pFedMe needs the initial model in setup() to keep the server model")
        if self._global is None:
            self._global = {k: v.clone() for k, v in initial.items()}

    def init_client_state(self, state: State, client: int) -> State:
        state.update({PERSONAL + k: v.clone() for k, v in self.model_part(state).items()})
        return state

    def personalized_model(self, state: State) -> State:
        return {k: state[PERSONAL + k] for k in self.names}

    def local_update(self, trainer: LocalTrainer, state: State) -> None:
        w = trainer.read()
        theta = {k: v.clone() for k, v in w.items()}
        trainer.module.train()
        for _, batch in trainer.batches(trainer.epochs):
            for step in range(self.inner_steps):
                g = trainer.gradients(batch, record=step == 0)
                theta = {k: theta[k] - self.personal_lr * (g[k] + self.lam * (theta[k] - w[k]) + self.mu * theta[k])
                         for k in trainer.names}
                trainer.load(theta)
            w = {k: w[k] - trainer.lr * self.lam * (w[k] - theta[k]) for k in trainer.names}
        state.update({PERSONAL + k: v.cpu() for k, v in theta.items()})
        trainer.load(w)

    def aggregate(self, uploads: dict[int, State], num_samples: dict[int, int]) -> dict[int, State]:
        assert self._global is not None
        avg = self.combine(uploads, num_samples)
        new = {k: ((1 - self.beta) * self._global[k].to(torch.float64) + self.beta * avg[k].to(torch.float64))
               .to(self._global[k].dtype) for k in self.names}
        self._global = new
        return {i: new for i in sorted(uploads)}
