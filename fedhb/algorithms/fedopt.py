"""The shared server-side machinery of FedAdam, FedYogi and FedAdagrad (one file each)."""

from __future__ import annotations

import math

import torch

from fedhb.algorithms._ops import State, fedopt_step, weighted_average
from fedhb.algorithms.fedavg import FedAvg


class FedOpt(FedAvg):
    """Adaptive Federated Optimization (Reddi et al., arXiv 2003.00295, Algorithm 2); subclasses pick the second-moment
    rule.

    The server treats ``delta = sum_i p_i y_i - x`` (the sample-weighted average client update) as a pseudo-gradient
    and takes one adaptive step: ``m <- beta1 m + (1 - beta1) delta``, ``v`` by the subclass's rule, then
    ``x <- x + server_lr * m / (sqrt(v) + tau)``, with ``m`` starting at 0 and ``v`` at ``tau^2``; every uploading
    client receives ``x``. Deliberate differences: clients are weighted by their sample counts (the paper averages
    uniformly) and only the trainable tensors (LoRA matrices and head) are optimized.

    ``variant="flower"`` reproduces Flower's strategies (adap/flower, ``framework/py/flwr/server/strategy/
    fedadam.py``, ``fedyogi.py``, ``fedadagrad.py``) instead: ``v`` starts at 0 (as in FedLab), FedAdam's step is
    ``server_lr * sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1))`` in aggregation ``t`` = 1, 2, ... (Flower's bias
    correction, with its ``server_round + 1``), and FedAdagrad forces ``beta1 = 0``. Flower's
    ``fedadagrad_test.py`` case (x = 0.1, clients at 0.2 and 1.0, ``server_lr`` 0.1, ``tau`` 0.5) gives 0.15 there
    and here with ``variant="flower"``; the paper's variant gives 0.1414 at ``beta1 = 0`` and 0.1041 at 0.9.
    """

    rule = "adam"

    def __init__(self, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                 variant: str = "paper") -> None:
        """
        Args:
            server_lr: Server learning rate ``eta`` (the paper tunes it per task, from 1e-3 to 1).
            beta1: First-moment decay (FedAdagrad's Flower variant uses 0 whatever is given).
            beta2: Second-moment decay (unused by FedAdagrad).
            tau: Adaptivity ``tau``: the floor of the denominator (and, in the paper's variant, ``sqrt`` of the
                initial ``v``).
            variant: ``paper`` (Reddi et al.'s Algorithm 2) or ``flower`` (Flower's strategies, see above).
        """
        if variant not in ("paper", "flower"):
            raise ValueError(f"--algorithm.variant must be paper or flower, got {variant!r}")
        if server_lr <= 0:
            raise ValueError(f"--algorithm.server_lr must be > 0, got {server_lr!r}")
        if not 0 <= beta1 < 1:
            raise ValueError(f"--algorithm.beta1 must be in [0, 1), got {beta1!r}")
        if not 0 <= beta2 < 1:
            raise ValueError(f"--algorithm.beta2 must be in [0, 1), got {beta2!r}")
        if tau <= 0:
            raise ValueError(f"--algorithm.tau must be > 0, got {tau!r}")
        super().__init__()
        self.server_lr, self.beta1, self.beta2, self.tau, self.variant = server_lr, beta1, beta2, tau, variant
        self._m: State | None = None
        self._v: State | None = None
        self._t = 0  # aggregations so far (Flower's server_round of the next one, minus 1)

    def setup(self, names: list[str], initial: State | None = None, num_clients: int | None = None) -> None:
        super().setup(names, initial, num_clients)
        if initial is None:
            raise ValueError(f"{type(self).__name__} needs the initial model in setup() to keep the server model")
        if self._global is None:
            self._global = {k: v.clone() for k, v in initial.items()}
            self._m = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in initial.items()}
            v0 = self.tau ** 2 if self.variant == "paper" else 0.0
            self._v = {k: torch.full_like(v, v0, dtype=torch.float64) for k, v in initial.items()}

    def _step_size(self) -> tuple[float, float]:
        """``(learning rate, beta1)`` of aggregation ``self._t``."""
        if self.variant == "flower" and self.rule == "adam":  # Flower's bias-corrected step, server_round = t
            t = self._t
            return self.server_lr * math.sqrt(1 - self.beta2 ** (t + 1)) / (1 - self.beta1 ** (t + 1)), self.beta1
        if self.variant == "flower" and self.rule == "adagrad":
            return self.server_lr, 0.0
        return self.server_lr, self.beta1

    def aggregate(self, uploads: dict[int, State], num_samples: dict[int, int]) -> dict[int, State]:
        assert self._global is not None and self._m is not None and self._v is not None
        ids = sorted(uploads)
        avg = weighted_average([{k: uploads[i][k].to(torch.float64) for k in self.names} for i in ids],
                               [num_samples[i] for i in ids])
        self._t += 1
        lr, beta1 = self._step_size()
        new, m, v = {}, {}, {}
        for k in self.names:
            x = self._global[k].to(torch.float64)
            x_new, m[k], v[k] = fedopt_step(x, avg[k] - x, self._m[k], self._v[k], self.rule, lr, beta1,
                                            self.beta2, self.tau)
            new[k] = x_new.to(self._global[k].dtype)
        self._global, self._m, self._v = new, m, v
        return {i: new for i in ids}

    def state_dict(self) -> dict:
        return {"global": self._global, "m": self._m, "v": self._v, "t": self._t}

    def load_state_dict(self, state: dict) -> None:
        self._global, self._m, self._v = state["global"], state["m"], state["v"]
        self._t = int(state.get("t", 0))  # checkpoints before the Flower variant kept no step count
