"""A real :class:`~fedhb.algorithms.trainer.LocalTrainer` around a model whose local updates can be computed by hand.

The toy model's loss is ``mean_b sum_name 0.5 * ||p_name - x_b||^2``: the gradient of every tensor is ``p - mean(x)``.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins import Precision
from torch import Tensor, nn

from fedhb.algorithms.trainer import LocalTrainer
from fedhb.config import OptimArgs


class ToyModule(nn.Module):
    """Trainable tensors by name; loss ``mean_b sum_name 0.5 ||p_name - x_b||^2``; features ``x * p_first``."""

    def __init__(self, params: dict[str, list[float]]) -> None:
        super().__init__()
        self.names = list(params)
        self.values = nn.ParameterList([nn.Parameter(torch.tensor(v, dtype=torch.float32)) for v in params.values()])

    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in zip(self.names, self.values) if p.requires_grad}

    def features(self, batch: dict[str, Tensor]) -> Tensor:
        return batch["x"][:, None] * self.values[0][None, :]

    def training_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        x = batch["x"][:, None]
        loss = sum(0.5 * (p[None, :] - x).pow(2).sum(1).mean() for p in self.values)
        return {"loss": loss, "features": self.features(batch)}


class ToyFabric:
    strategy = SimpleNamespace(precision=Precision())  # full precision: unscale_gradients does nothing

    def to_device(self, t: Tensor) -> Tensor:
        return t

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def autocast(self) -> Any:
        return contextlib.nullcontext()


def make_optimizer(params: Any, optim: OptimArgs) -> torch.optim.Optimizer:
    """The optimizer ``fedhb.client.ClientModule.configure_optimizers`` builds for ``optim``."""
    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    if optim.name == "adam":
        return torch.optim.Adam(params, lr=optim.lr, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)


def toy_trainer(params: dict[str, list[float]], data: list[float], *, lr: float = 0.5,
                epochs: int = 1, batch_size: int = 64, client: int = 0, rnd: int = 1, rounds: int = 10,
                optim: OptimArgs | None = None, fabric: Any = None,
                module: nn.Module | None = None) -> tuple[LocalTrainer, Any]:
    """A trainer over ``params`` and samples ``data`` with the optimizer ``optim`` names (default plain SGD at
    ``lr``); with ``fabric`` (a real one), module and optimizer are set up through it, so its precision plugin
    applies. ``module`` replaces the toy module (it needs ``trainable``, ``features`` and ``training_step``)."""
    optim = optim or OptimArgs(name="sgd", lr=lr, schedule="constant", min_lr=0.0)
    module = ToyModule(params) if module is None else module
    optimizer: Any = make_optimizer(list(module.parameters()), optim)
    wrapped: Any = module
    if fabric is not None:
        wrapped, optimizer = fabric.setup(module, optimizer)
    tensors = {"x": torch.tensor(data, dtype=torch.float32), "labels": torch.zeros(len(data), dtype=torch.long)}
    trainer = LocalTrainer(fabric or ToyFabric(), wrapped, module, optimizer, tensors, np.arange(len(data)),
                           epochs=epochs, batch_size=batch_size, eval_batch_size=batch_size, lr=lr,
                           optim=optim, seed=0,
                           round=rnd, rounds=rounds, client=client)
    return trainer, module


def t(*values: float) -> Tensor:
    return torch.tensor(values, dtype=torch.float32)


class _ToyEncoder(nn.Module):
    """Features ``x * p`` of a modality's scalar input ``x``."""

    def __init__(self, p: list[float]) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(p, dtype=torch.float32))
        self.hidden_size = len(p)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return batch["x"][:, None] * self.p[None, :]


class _ToyFusion(nn.Module):
    """Concatenation; each modality's projection is the identity (what ``Representations`` hooks); absent -> 0."""

    masked = True

    def __init__(self, modalities: list[str]) -> None:
        super().__init__()
        self.proj = nn.ModuleDict({m: nn.Identity() for m in modalities})

    def forward(self, features: dict[str, Tensor], present: dict[str, Tensor]) -> Tensor:
        return torch.cat([torch.where(present[m][:, None], self.proj[m](z), torch.zeros_like(z))
                          for m, z in features.items()], dim=1)


class ToyMultimodal(nn.Module):
    """A multimodal client model computable by hand: modality ``m``'s features ``x_m * p_m`` (batch keys ``m/x``,
    ``m/present``), fused by concatenation (zeros where absent); loss ``sum_m mean_{b holding m} 0.5 ||p_m - x_m||^2``
    (``x_m`` broadcast over the vector)."""

    multimodal = True

    def __init__(self, params: dict[str, list[float]]) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({m: _ToyEncoder(p) for m, p in params.items()})
        self.fusion = _ToyFusion(list(params))
        self.feature_size = sum(len(p) for p in params.values())

    def trainable(self) -> dict[str, nn.Parameter]:
        return {f"encoders.{m}.p": e.p for m, e in self.encoders.items() if e.p.requires_grad}

    def features(self, batch: dict[str, Tensor]) -> Tensor:
        features = {m: e({"x": batch[f"{m}/x"]}) for m, e in self.encoders.items()}
        return self.fusion(features, {m: batch[f"{m}/present"].bool() for m in self.encoders})

    def training_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        loss = torch.zeros(())
        for m, e in self.encoders.items():
            mask = batch[f"{m}/present"].bool()
            if bool(mask.any()):
                x = batch[f"{m}/x"][mask][:, None]
                loss = loss + (0.5 * (e.p[None, :] - x).pow(2).sum(1)).mean()
        return {"loss": loss, "features": self.features(batch)}


def multimodal_trainer(params: dict[str, list[float]], inputs: dict[str, list[float]],
                       present: dict[str, list[bool]], index: list[int], *, lr: float = 0.5,
                       batch_size: int = 64, client: int = 0) -> tuple[LocalTrainer, ToyMultimodal]:
    """A trainer over :class:`ToyMultimodal` (plain SGD at ``lr``) whose training split is the samples ``index`` of
    ``inputs`` (``{modality: one x per sample}``) and ``present``."""
    optim = OptimArgs(name="sgd", lr=lr, schedule="constant", min_lr=0.0)
    module = ToyMultimodal(params)
    optimizer = make_optimizer(list(module.parameters()), optim)
    n = len(next(iter(inputs.values())))
    tensors = {"labels": torch.zeros(n, dtype=torch.long)}
    for m, xs in inputs.items():
        tensors[f"{m}/x"] = torch.tensor(xs, dtype=torch.float32)
        tensors[f"{m}/present"] = torch.tensor(present[m])
    trainer = LocalTrainer(ToyFabric(), module, module, optimizer, tensors, np.array(index), epochs=1,  # type: ignore
                           batch_size=batch_size, eval_batch_size=batch_size, lr=lr, optim=optim, seed=0, round=1,
                           rounds=10, client=client)
    return trainer, module
