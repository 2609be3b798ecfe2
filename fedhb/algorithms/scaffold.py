"""SCAFFOLD."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from fedhb.algorithms._ops import State, scaffold_control_variate
from fedhb.algorithms.base import Algorithm, algo_key

if TYPE_CHECKING:
    from fedhb.algorithms.trainer import LocalTrainer

C_I, C, DC = algo_key("scaffold", "c_i/"), algo_key("scaffold", "c/"), algo_key("scaffold", "dc/")


class SCAFFOLD(Algorithm):
    """SCAFFOLD (Karimireddy et al., "Stochastic Controlled Averaging for Federated Learning", arXiv 1910.06378).

    Every local step uses the corrected gradient ``g - c_i + c``, where ``c`` is the server's control variate and
    ``c_i`` the client's. After ``K`` steps at learning rate ``lr`` the client sets
    ``c_i+ = c_i - c + (x - y) / (K lr)`` (the paper's option II) and uploads its model ``y`` and ``c_i+ - c_i``.
    The server sets ``x <- x + server_lr * mean_i(y_i - x)`` and ``c <- c + (1 / N) sum_i (c_i+ - c_i)``, ``N`` the
    number of clients in the federation; every uploading client receives ``x`` and ``c`` (both counted as bytes).

    Under plain SGD, option II's ``c_i - c + (x - y) / (K lr)`` is exactly ``(1 / K) sum_k g_k``, the mean of the
    client's uncorrected gradients along its ``K`` steps (the paper: option II "re-uses the previously computed
    gradients"). Under SGD momentum or Adam the displacement ``x - y`` is no longer ``K lr`` times that mean: 10
    steps at lr 0.01 from w = 0 on ``(w - t)^2 / 2`` give option II 4.36 times the mean gradient with momentum 0.9
    (t = 1) and 0.51 times with Adam (t = 2). fedhb then computes the mean of the true gradients directly, which is
    what option II estimates. Plain SGD
    (``--optim.name sgd --optim.momentum 0``) keeps option II's formula, weight decay included.

    Deliberate differences: control variates cover the trainable tensors (LoRA matrices and head) only; the correction
    is added to the true gradient (after the fp16 loss scale is divided out, under ``--fabric.precision 16-mixed``)
    before whatever optimizer ``--optim.name`` selects, while the paper analyses plain SGD; under momentum or Adam
    the control variate is the gradient mean above (without weight decay, which those optimizers apply after the
    correction). Averages are uniform over the participating clients, as in the paper.

    Client state: ``algo/scaffold/c_i/*`` (own control variate), ``algo/scaffold/c/*`` (the server's, as last received)
    and ``algo/scaffold/dc/*`` (the last change of ``c_i``, uploaded).

    Under ``--federation.client_batch`` it trains one client at a time (its control variate is updated from the trained
    model after local training).
    """

    client_batchable = False

    has_global_model = True

    def __init__(self, server_lr: float = 1.0) -> None:
        """
        Args:
            server_lr: Global step size ``eta_g`` (1: the new global model is the mean of the clients' models).
        """
        if server_lr <= 0:
            raise ValueError(f"--algorithm.server_lr must be > 0, got {server_lr!r}")
        self.server_lr = server_lr
        self._x: State | None = None
        self._c: State | None = None

    def setup(self, names: list[str], initial: State | None = None, num_clients: int | None = None) -> None:
        super().setup(names, initial, num_clients)
        if initial is None:
            raise ValueError("SCAFFOLD needs the initial model in setup() to keep the server model")
        if self._x is None:
            self._x = {k: v.clone() for k, v in initial.items()}
            self._c = {k: torch.zeros_like(v) for k, v in initial.items()}

    def init_client_state(self, state: State, client: int) -> State:
        model = list(self.model_part(state))
        for prefix in (C_I, C, DC):
            state.update({prefix + k: torch.zeros_like(state[k]) for k in model})
        return state

    def upload(self, state: State) -> State:
        return {**{k: state[k] for k in self.names}, **{DC + k: state[DC + k] for k in self.names}}

    def local_update(self, trainer: LocalTrainer, state: State) -> None:
        x = trainer.read()
        c_i = trainer.to_device({k: state[C_I + k] for k in self.names})
        c = trainer.to_device({k: state[C + k] for k in self.names})
        correction = {k: c[k] - c_i[k] for k in self.names}
        # Option II's formula holds for plain SGD only; otherwise sum the true gradients (see the class docstring).
        plain_sgd = trainer.optim.name == "sgd" and trainer.optim.momentum == 0
        grad_sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in x.items()} if not plain_sgd else {}

        def corrected(params: dict[str, nn.Parameter]) -> None:  # g - c_i + c
            for name, p in params.items():
                if p.grad is not None:
                    if not plain_sgd:
                        grad_sum[name].add_(p.grad)
                    p.grad.add_(correction[name])

        start = trainer.steps
        trainer.fit(before_step=corrected)
        y = trainer.read()
        steps = trainer.steps - start
        for k in self.names:
            if plain_sgd or steps == 0:
                new = scaffold_control_variate(c_i[k], c[k], x[k], y[k], steps, trainer.lr)
            else:
                new = (grad_sum[k] / steps).to(c_i[k].dtype)
            state[DC + k] = (new - c_i[k]).cpu()
            state[C_I + k] = new.cpu()

    def aggregate(self, uploads: dict[int, State], num_samples: dict[int, int]) -> dict[int, State]:
        assert self._x is not None and self._c is not None
        ids = sorted(uploads)
        n_total = self.num_clients or len(ids)
        x, c = {}, {}
        for k in self.names:
            old = self._x[k].to(torch.float64)
            mean_dy = torch.stack([uploads[i][k].to(torch.float64) - old for i in ids]).mean(0)
            x[k] = (old + self.server_lr * mean_dy).to(self._x[k].dtype)
            sum_dc = torch.stack([uploads[i][DC + k].to(torch.float64) for i in ids]).sum(0)
            c[k] = (self._c[k].to(torch.float64) + sum_dc / n_total).to(self._c[k].dtype)
        self._x, self._c = x, c
        received = {**x, **{C + k: v for k, v in c.items()}}
        return {i: received for i in ids}

    def global_state(self) -> State | None:
        if self._x is None or self._c is None:
            return None
        return {**self._x, **{C + k: v for k, v in self._c.items()}}

    def state_dict(self) -> dict:
        return {"x": self._x, "c": self._c}

    def load_state_dict(self, state: dict) -> None:
        self._x, self._c = state["x"], state["c"]
