"""``make_loop`` builds a real :class:`~fedhb.loop.FederatedLoop` on the tiny ViT and the learnable fixture, the way
``fedhb fit`` does, for properties that compare whole federations tensor by tensor (``algo_testkit`` has the toy
trainer for updates computed by hand)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from fedhb.algorithms import Algorithm
from fedhb.config import FabricArgs, FederationArgs, ModelArgs, OptimArgs, PartitionArgs


@pytest.fixture(scope="session")
def tiny_data(organamnist_root: str) -> Any:
    """30% of the fixture's samples (stratified), loaded once."""
    from fedhb.data import MedMNIST
    from fedhb.data.partition import subsample

    samples = MedMNIST(root=organamnist_root).load()
    return samples.subset(subsample(samples.stratify_labels, 0.3, 0))


@pytest.fixture
def make_loop(tiny_data: Any) -> Any:
    """``make_loop(algorithm, clients=3, ...)``: a FederatedLoop on one process, built like ``fedhb fit`` builds it.

    ``model`` replaces the default ``ModelArgs()``; ``init(module)`` may change the module before the loop is built.
    Rounds are run with ``loop.run_round(r)``; evaluation only happens in round ``rounds`` (default 100), so runs of a
    few rounds compare training alone.
    """
    from fedhb.client import ClientModule
    from fedhb.data.partition import partition_samples
    from fedhb.loop import FederatedLoop
    from fedhb.models import build_encoder
    from fedhb.strategy import make_fabric

    def build(algorithm: Algorithm, clients: int = 3, seed: int = 0, rounds: int = 100, lr: float = 0.05,
              optim: str = "sgd", local_epochs: int = 1, batch_size: int = 32, scheme: str = "dirichlet",
              model: ModelArgs | None = None, init: Callable[[Any], None] | None = None) -> Any:
        samples = tiny_data
        partition = PartitionArgs(num_clients=clients, alpha=0.5, scheme=scheme, min_samples=10)
        splits = partition_samples(samples, partition.scheme, clients, partition.alpha, partition.min_samples,
                                   partition.split, seed, None)
        optim_args = OptimArgs(name=optim, lr=lr, schedule="constant", min_lr=0.0)
        torch.manual_seed(seed)
        encoder = build_encoder(model or ModelArgs(), samples)
        module = ClientModule(encoder, samples.num_classes, samples.task, optim_args)
        if init is not None:
            init(module)  # e.g. copy another loop's initial weights
        tensors = encoder.prepare(samples)
        tensors["labels"] = torch.from_numpy(samples.labels)
        fabric = make_fabric(FabricArgs(accelerator="cpu"))
        optimizer = module.configure_optimizers()
        module = fabric.setup_module(module)
        optimizer = fabric.setup_optimizers(optimizer)
        federation = FederationArgs(rounds=rounds, eval_every=rounds, local_epochs=local_epochs,
                                    batch_size=batch_size)
        return FederatedLoop(fabric, module, optimizer, algorithm, tensors, algorithm.client_splits(splits),
                             federation, optim_args, seed, samples.task, samples.num_classes)

    return build
