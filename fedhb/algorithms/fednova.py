"""FedNova."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fedhb.algorithms._ops import State, fednova_norm
from fedhb.algorithms.base import algo_key
from fedhb.algorithms.fedavg import FedAvg

if TYPE_CHECKING:
    from fedhb.algorithms.trainer import LocalTrainer

TAU = algo_key("fednova", "tau")


class FedNova(FedAvg):
    """FedNova (Wang et al., "Tackling the Objective Inconsistency Problem in Heterogeneous Federated Optimization",
    arXiv 2007.07481): normalized averaging.

    Clients with more local steps move further; plain averaging then favours them. Each client reports
    ``a_i = ||a_i||_1``, its number of local steps (with SGD momentum ``rho``:
    ``sum_{k=1..tau_i} (1 - rho^k) / (1 - rho)``), and the server sets
    ``x <- x - tau_eff * sum_i p_i (x - y_i) / a_i`` with ``p_i = n_i / n`` and ``tau_eff = sum_i p_i a_i``. With equal
    ``a_i`` this is FedAvg. The learning rate cancels because every client of a round uses the same one.

    Deliberate differences: applied to the trainable tensors (LoRA and head); ``a_i`` is the plain-SGD (or SGD with
    momentum) count also when ``--optim.name`` is Adam, whose effective step lengths FedNova does not model; no server
    momentum. The uploaded ``a_i`` (8 bytes) is counted.

    Under ``--federation.client_batch`` it trains one client at a time (it reads the client's step count after local
    training).
    """

    client_batchable = False

    def setup(self, names: list[str], initial: State | None = None, num_clients: int | None = None) -> None:
        super().setup(names, initial, num_clients)
        if initial is None:
            raise ValueError("FedNova needs the initial model in setup() to keep the server model")
        if self._global is None:
            self._global = {k: v.clone() for k, v in initial.items()}

    def init_client_state(self, state: State, client: int) -> State:
        state[TAU] = torch.zeros((), dtype=torch.float64)
        return state

    def upload(self, state: State) -> State:
        return {**{k: state[k] for k in self.names}, TAU: state[TAU]}

    def local_update(self, trainer: LocalTrainer, state: State) -> None:
        start = trainer.steps
        trainer.fit()
        rho = trainer.optim.momentum if trainer.optim.name == "sgd" else 0.0
        state[TAU] = torch.tensor(fednova_norm(trainer.steps - start, rho), dtype=torch.float64)

    def aggregate(self, uploads: dict[int, State], num_samples: dict[int, int]) -> dict[int, State]:
        assert self._global is not None
        ids = [i for i in sorted(uploads) if float(uploads[i][TAU]) > 0]  # a client without steps has no direction
        if ids:
            n = sum(num_samples[i] for i in ids)
            p = {i: num_samples[i] / n for i in ids}
            tau_eff = sum(p[i] * float(uploads[i][TAU]) for i in ids)
            new = {}
            for k in self.names:
                x = self._global[k].to(torch.float64)
                d = sum(p[i] * (x - uploads[i][k].to(torch.float64)) / float(uploads[i][TAU]) for i in ids)
                new[k] = (x - tau_eff * d).to(self._global[k].dtype)
            self._global = new
        return {i: self._global for i in sorted(uploads)}
