"""APFL."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fedhb.algorithms._ops import State, linear_combination
from fedhb.algorithms.base import algo_key
from fedhb.algorithms.fedavg import FedAvg

if TYPE_CHECKING:
    from fedhb.algorithms.trainer import LocalTrainer

V, ALPHA = algo_key("apfl", "v/"), algo_key("apfl", "alpha")


class APFL(FedAvg):
    """Adaptive Personalized Federated Learning (Deng et al., arXiv 2003.13461).

    Each client keeps a local model ``v`` and a mixing weight ``alpha`` next to its copy of the global model ``w``; its
    personalized model is ``v_bar = alpha v + (1 - alpha) w``. Every local step on a batch: ``w`` takes an optimizer
    step on its own loss; ``v <- v - lr * alpha * g`` and ``alpha <- clip(alpha - alpha_lr * <g, v - w>, 0, 1)``, where
    ``g`` is the gradient of the loss at ``v_bar`` (built from ``v`` and ``w`` before the step). The server averages
    ``w`` like FedAvg. Clients are evaluated with ``v_bar``; the global model is evaluated on the union of test splits.

    Deliberate differences: LoRA factors and head are mixed parameter-wise (a mixture of LoRA factors is not the
    mixture of the LoRA updates, which the paper's full-model mixing would be); ``v`` and ``alpha`` use plain SGD at
    the round's learning rate. With ``alpha = 0`` and ``adapt_alpha = False`` ``w`` follows FedAvg exactly.

    Client state: ``algo/apfl/v/*`` and ``algo/apfl/alpha``.

    Under ``--federation.client_batch`` it trains one client at a time (its local step also trains the personal model it
    mixes in).
    """

    client_batchable = False

    def __init__(self, alpha: float = 0.5, adapt_alpha: bool = True, alpha_lr: float | None = None) -> None:
        """
        Args:
            alpha: Initial mixing weight of the local model (the paper starts from 0.5 or tunes it).
            adapt_alpha: Learn ``alpha`` by gradient descent (the paper's adaptive variant).
            alpha_lr: Step size of ``alpha`` (default: the local learning rate of the round).
        """
        if not 0 <= alpha <= 1:
            raise ValueError(f"--algorithm.alpha must be in [0, 1], got {alpha!r}")
        if alpha_lr is not None and alpha_lr <= 0:
            raise ValueError(f"--algorithm.alpha_lr must be > 0, got {alpha_lr!r}")
        super().__init__()
        self.alpha, self.adapt_alpha, self.alpha_lr = alpha, adapt_alpha, alpha_lr

    def init_client_state(self, state: State, client: int) -> State:
        state.update({V + k: v.clone() for k, v in self.model_part(state).items()})
        state[ALPHA] = torch.tensor(float(self.alpha), dtype=torch.float64)
        return state

    def personalized_model(self, state: State) -> State:
        a = float(state[ALPHA])
        return linear_combination([{k: state[V + k] for k in self.names}, {k: state[k] for k in self.names}],
                                  [a, 1 - a])

    def local_update(self, trainer: LocalTrainer, state: State) -> None:
        w = trainer.read()
        v = trainer.to_device({k: state[V + k] for k in self.names})
        alpha = float(state[ALPHA])
        alpha_lr = trainer.lr if self.alpha_lr is None else self.alpha_lr
        trainer.reset_optimizer()
        for rows, batch in trainer.batches(trainer.epochs):
            trainer.step(batch, rows)  # w's step first: its dropout masks are FedAvg's
            w_new = trainer.read()
            trainer.load({k: alpha * v[k] + (1 - alpha) * w[k] for k in self.names})
            g = trainer.gradients(batch, record=False, keep_rng=True)
            grad_alpha = sum(float((g[k] * (v[k] - w[k])).sum()) for k in self.names) if self.adapt_alpha else 0.0
            v = {k: v[k] - trainer.lr * alpha * g[k] for k in self.names}
            alpha = min(1.0, max(0.0, alpha - alpha_lr * grad_alpha))
            w = w_new
            trainer.load(w)
        state.update({V + k: t.cpu() for k, t in v.items()})
        state[ALPHA] = torch.tensor(alpha, dtype=torch.float64)
