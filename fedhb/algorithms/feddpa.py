"""FedDPA."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fedhb.algorithms._ops import State
from fedhb.algorithms.base import algo_key
from fedhb.algorithms.fedavg import FedAvg
from fedhb.models.lora import is_lora

if TYPE_CHECKING:
    from fedhb.algorithms.trainer import LocalTrainer

#: The client's personal (local) LoRA adapter, and the weight of the global adapter it is scored with.
LOCAL, WEIGHT = algo_key("feddpa", "local/"), algo_key("feddpa", "weight")


class FedDPA(FedAvg):
    """FedDPA (Yang et al., "Dual-Personalizing Adapter for Federated Foundation Models", NeurIPS 2024,
    arXiv 2403.19211), its iterative variant FedDPA-T as the released code runs it (Lydia-yang/FedDPA,
    ``code/main.py``, ``code/fed_utils/client.py``, ``code/fed_utils/model_aggregation.py``).

    Every client has a global LoRA adapter (the model's, averaged by the server) and a personal one (kept in its
    state, never sent). From round 2 on, a round first trains the personal adapter for ``--federation.local_epochs``
    with the global one frozen, through the mixture ``local_weight * personal + (1 - local_weight) * global``
    (the code's ``set_local(['default'], [a, 1 - a])``), then trains the received global adapter and the head alone,
    as FedAvg; the server averages the global adapters and heads uniformly (the code's ``FedAvg`` weighs every
    client 1). At test time the code mixes the two adapters per instance: the global adapter's weight is
    ``max_weight`` times the mean cosine similarity between the instance's features and those of ``instances``
    random training samples, computed with the personal adapter (``GlobalModel_generated.py::get_weight``).

    Deliberate differences: the process has one model with one adapter, so the two adapters are mixed
    parameter-wise (``w * global + (1 - w) * personal`` for each LoRA factor; the code adds the two adapters'
    outputs, which a rank-``r`` adapter cannot hold), and the personal adapter is trained through that mixture: the
    mixture takes the optimizer's steps at the learning rate ``a^2 lr`` (SGD; ``a lr`` under Adam, which is
    invariant to the gradient's scale), which is the SGD step of the personal adapter on its own gradient
    ``a g``. A client is scored with one model, so the instance-wise weight becomes one weight per client: the mean
    over the client's training samples of that similarity, which is what an instance from the client's own
    distribution gets on average (computed after each local update, with the personal adapter, on samples drawn
    from the client's seed). The personal adapter starts as the initial adapter (B = 0; the code draws a fresh
    one). The head is part of the global model.

    Client state: ``algo/feddpa/local/*`` (the personal adapter) and ``algo/feddpa/weight``.

    Under ``--federation.client_batch`` it trains one client at a time (it trains a personal adapter beside the global
    one).
    """

    client_batchable = False

    def __init__(self, local_weight: float = 0.5, max_weight: float = 0.5, instances: int = 5) -> None:
        """
        Args:
            local_weight: Weight ``a`` of the personal adapter while it trains (the code's ``local_weight``, 0.5).
            max_weight: Largest weight of the global adapter at test time (the code's ``max_weight``, 0.5).
            instances: Training samples each sample is compared with (the code's ``instance_num``, 5).
        """
        if not 0 < local_weight <= 1:
            raise ValueError(f"--algorithm.local_weight must be in (0, 1], got {local_weight!r}")
        if not 0 <= max_weight <= 1:
            raise ValueError(f"--algorithm.max_weight must be in [0, 1], got {max_weight!r}")
        if instances < 1:
            raise ValueError(f"--algorithm.instances must be >= 1, got {instances!r}")
        super().__init__()
        self.local_weight, self.max_weight, self.instances = local_weight, max_weight, instances

    def init_client_state(self, state: State, client: int) -> State:
        state.update({LOCAL + k: v.clone() for k, v in self.model_part(state, keep=is_lora).items()})
        state[WEIGHT] = torch.tensor(float(self.max_weight), dtype=torch.float64)
        return state

    def personalized_model(self, state: State) -> State:
        w = float(state[WEIGHT])
        return {k: (w * state[k] + (1 - w) * state[LOCAL + k]) if LOCAL + k in state else state[k]
                for k in self.names}

    def local_update(self, trainer: LocalTrainer, state: State) -> None:
        glob = trainer.read()
        lora = [n for n in trainer.names if is_lora(n)]
        a = self.local_weight
        local = trainer.to_device({k: state[LOCAL + k] for k in lora})
        if trainer.round > 1 and lora:
            trainer.load({k: a * local[k] + (1 - a) * glob[k] for k in lora})
            scale = a if trainer.optim.name in ("adam", "adamw") else a * a
            trainer.fit(trainable=lora, lr=scale * trainer.lr)
            mixed = trainer.read(lora)
            local = {k: (mixed[k] - (1 - a) * glob[k]) / a for k in lora}
            state.update({LOCAL + k: v.cpu() for k, v in local.items()})
            trainer.load(glob)
        trainer.fit()
        trained = trainer.read()
        state[WEIGHT] = torch.tensor(self.max_weight * self.similarity(trainer, local), dtype=torch.float64)
        trainer.load(trained)

    def similarity(self, trainer: LocalTrainer, local: State) -> float:
        """Mean over the client's training samples of their mean cosine similarity to ``instances`` random other
        training samples, the features taken under the personal adapter ``local``."""
        n = trainer.num_samples
        if n < 2:
            return 1.0
        z = trainer.features(local)
        picks = torch.randperm(n, generator=trainer.order)[:self.instances].to(z.device)
        sims = torch.nn.functional.cosine_similarity(z[:, None, :], z[picks][None, :, :], dim=-1)
        others = torch.arange(n, device=z.device)[:, None] != picks[None, :]
        return float((sims * others).sum() / others.sum())

    def aggregate(self, uploads: dict[int, State], num_samples: dict[int, int]) -> dict[int, State]:
        return super().aggregate(uploads, dict.fromkeys(uploads, 1))
