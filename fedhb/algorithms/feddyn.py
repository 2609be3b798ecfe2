"""FedDyn."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fedhb.algorithms._ops import State
from fedhb.algorithms.base import algo_key
from fedhb.algorithms.fedavg import FedAvg

if TYPE_CHECKING:
    from fedhb.algorithms.trainer import LocalTrainer

#: A client's accumulated ``theta_k - theta`` over its rounds: ``-grad L_k(theta_k) / alpha`` (the code's
#: ``local_param_list``).
LAMBDA = algo_key("feddyn", "lambda/")


class FedDyn(FedAvg):
    """FedDyn (Acar et al., "Federated Learning Based on Dynamic Regularization", ICLR 2021, arXiv 2111.04263).

    Client ``k`` starts from the server model ``theta`` and minimises
    ``L_k(w) - <grad L_k(theta_k^{t-1}), w> + alpha / 2 ||w - theta||^2``, the linear term being the gradient its
    last local optimum had, kept as ``lambda_k = -grad L_k / alpha`` (the authors' code, alpemreacar/FedDyn
    ``utils_methods.py::train_FedDyn``, keeps the same vector): the extra loss is
    ``alpha (<w, lambda_k> + ||w - theta||^2 / 2)``, and after training ``lambda_k <- lambda_k + (theta_k - theta)``.
    The server keeps ``h <- h - alpha (1 / N) sum_{k uploading} (theta_k - theta)`` (``N`` the clients of the
    federation) and sets ``theta <- mean_k theta_k - h / alpha`` (uniform over the uploading clients, as the paper
    and the code); every uploading client receives ``theta``.

    Deliberate differences from the authors' code: ``alpha`` is the same for every client (the code divides it by
    the client's share of the samples times ``N``, which the contract does not give a client before it trains; with
    equal shares the two agree) and gradients are not clipped (the code clips their norm at 10); the regulariser
    covers the trainable tensors (LoRA factors and head). PFLlib's ``clientdyn.py`` uses the norm
    ``alpha / 2 ||w - theta||`` rather than its square; fedhb follows the paper and the authors' code.

    Client state: ``algo/feddyn/lambda/*``.

    Under ``--federation.client_batch`` it trains one client at a time (its state is updated from the trained model
    after local training).
    """

    client_batchable = False

    def __init__(self, alpha: float = 0.01) -> None:
        """
        Args:
            alpha: Weight of the dynamic regulariser (the paper tries 0.001 to 0.1; its code uses 0.01).
        """
        if alpha <= 0:
            raise ValueError(f"--algorithm.alpha must be > 0, got {alpha!r}")
        super().__init__()
        self.alpha = alpha
        self._h: State | None = None

    def setup(self, names: list[str], initial: State | None = None, num_clients: int | None = None) -> None:
        super().setup(names, initial, num_clients)
        if initial is None:
            raise ValueError("FedDyn needs the initial model in setup() to keep the server model")
        if self._global is None:
            self._global = {k: v.clone() for k, v in initial.items()}
            self._h = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in initial.items()}

    def init_client_state(self, state: State, client: int) -> State:
        state.update({LAMBDA + k: torch.zeros_like(v) for k, v in self.model_part(state).items()})
        return state

    def local_update(self, trainer: LocalTrainer, state: State) -> None:
        theta = trainer.read()
        lam = trainer.to_device({k: state[LAMBDA + k] for k in self.names})

        def dynamic(batch: dict[str, Tensor], out: dict[str, Tensor], rows: Tensor) -> Tensor:
            terms = [(p * lam[n]).sum() + 0.5 * (p - theta[n]).pow(2).sum() for n, p in trainer.trainable().items()]
            return self.alpha * torch.stack(terms).sum()

        trainer.fit(loss=dynamic)
        new = trainer.read()
        state.update({LAMBDA + k: (lam[k] + new[k] - theta[k]).cpu() for k in self.names})

    def aggregate(self, uploads: dict[int, State], num_samples: dict[int, int]) -> dict[int, State]:
        assert self._global is not None and self._h is not None
        ids = sorted(uploads)
        n_total = self.num_clients or len(ids)
        new, h = {}, {}
        for k in self.names:
            old = self._global[k].to(torch.float64)
            stacked = torch.stack([uploads[i][k].to(torch.float64) for i in ids])
            h[k] = self._h[k] - self.alpha * (stacked - old).sum(0) / n_total
            new[k] = (stacked.mean(0) - h[k] / self.alpha).to(self._global[k].dtype)
        self._global, self._h = new, h
        return {i: new for i in ids}

    def state_dict(self) -> dict:
        return {"global": self._global, "h": self._h}

    def load_state_dict(self, state: dict) -> None:
        self._global, self._h = state["global"], state["h"]
