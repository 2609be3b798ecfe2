"""Shared fixtures: small official-format data files written per session."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from fedhb.config import FabricArgs, FederationArgs, ModelArgs, OptimArgs, PartitionArgs

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def organamnist_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A folder with a learnable ``organamnist.npz`` (28 px) of 1,800 samples."""
    from fedhb.data.fixtures import write_medmnist_fixture

    root = tmp_path_factory.mktemp("medmnist")
    write_medmnist_fixture(root, "organamnist", 28, (1000, 200, 600), seed=0)
    return str(root)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One torch thread per test process: the tiny models run faster without intra-op threading, and tests that
    compare 1 and 2 processes then use the same thread count on each rank (Lightning gives spawned ranks
    cores // processes threads)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _image_cache(tmp_path_factory: pytest.TempPathFactory):
    """The on-disk image cache (fedhb.data.image_cache) of the session's fixtures goes to a temporary folder, not to
    ~/.cache/fedhb/images."""
    before = os.environ.get("FEDHB_IMAGE_CACHE")
    os.environ["FEDHB_IMAGE_CACHE"] = str(tmp_path_factory.mktemp("image_cache"))
    yield
    if before is None:
        os.environ.pop("FEDHB_IMAGE_CACHE", None)
    else:
        os.environ["FEDHB_IMAGE_CACHE"] = before


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
    from fedhb.build import build_loop
    from fedhb.data.partition import partition_samples
    from fedhb.strategy import make_fabric

    def build(algorithm: Any, clients: int = 3, seed: int = 0, rounds: int = 100, lr: float = 0.05,
              optim: str = "sgd", local_epochs: int = 1, batch_size: int = 32, scheme: str = "dirichlet",
              model: ModelArgs | None = None, init: Callable[[Any], None] | None = None) -> Any:
        samples = tiny_data
        partition = PartitionArgs(num_clients=clients, alpha=0.5, scheme=scheme, min_samples=10)
        splits = partition_samples(samples, partition.scheme, clients, partition.alpha, partition.min_samples,
                                   partition.split, seed, None)
        optim_args = OptimArgs(name=optim, lr=lr, schedule="constant", min_lr=0.0)
        fabric = make_fabric(FabricArgs(accelerator="cpu"))
        federation = FederationArgs(rounds=rounds, eval_every=rounds, local_epochs=local_epochs,
                                    batch_size=batch_size)
        # init(module), e.g. copying another loop's initial weights, runs before Fabric sets the module up.
        return build_loop(fabric, samples, splits, algorithm, model=model or ModelArgs(), federation=federation,
                          optim=optim_args, seed=seed, init=init)

    return build


@pytest.fixture(scope="session")
def padchest_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A learnable PadChest label file in the published format (120 patients, 258 images), with images."""
    from fedhb.data.fixtures_padchest import write_padchest_fixture

    return str(write_padchest_fixture(tmp_path_factory.mktemp("padchest"), images=True))


@pytest.fixture(scope="session")
def multimodal_data(padchest_file: str) -> Any:
    """The PadChest fixture's report text and tabular features (its 13 reports marked nan are absent)."""
    from fedhb.data import PadChest

    return PadChest(path=padchest_file).load()
