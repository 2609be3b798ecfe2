"""A client: one LightningModule (frozen encoders with LoRA, a fusion step, a task head) whose trainable state is
swapped per client.

One ``ClientModule`` exists per process. A client *is* its state dict (LoRA matrices, head, and whatever per-client
tensors its algorithm keeps); loading another client's state is a copy into the same parameters, so an extra client
costs its adapter state, not a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import lightning as L
import torch
from torch import Tensor, nn

from fedhb.config import OptimArgs
from fedhb.data.base import Samples
from fedhb.models.base import Encoder
from fedhb.models.fusion import Fusion, Single
from fedhb.models.lora import RankedAdapters
from fedhb.tasks.base import Task

State = dict[str, Tensor]


class ClientModule(L.LightningModule):
    """Encoders by modality (a frozen backbone with LoRA each), a fusion step, and the task's head.

    Args:
        encoders: ``{modality: encoder}``, in the order their features are fused.
        task: What the head is trained for and scored on.
        optim: The local optimizer's options.
        head_dropout: Dropout before the head.
        fusion: How the encoders' features are combined; default: the one encoder's features (one modality).
    """

    def __init__(self, encoders: Mapping[str, Encoder], task: Task, optim: OptimArgs, head_dropout: float = 0.0,
                 fusion: Fusion | None = None) -> None:
        super().__init__()
        if not encoders:
            raise ValueError("a client model needs at least one encoder")
        self.encoders = nn.ModuleDict(dict(encoders))
        if fusion is None:
            if len(encoders) != 1:
                raise ValueError(f"{len(encoders)} modalities ({', '.join(encoders)}) need a fusion step")
            modality, encoder = next(iter(encoders.items()))
            fusion = Single(modality, encoder.hidden_size)
        self.fusion = fusion
        self.head = task.head(fusion.out_features, head_dropout)  # named "head": see fedhb.algorithms._ops.is_head
        if not task.uses_fusion:
            self.fusion.requires_grad_(False)
        self.task = task
        self.optim = optim
        self.adapters = RankedAdapters(self)
        self._owned: list[tuple[str, nn.Parameter]] | None = None  # what trainable() looks through, found once

    @property
    def feature_size(self) -> int:
        """Width of the fused features (the head's input)."""
        return self.fusion.out_features

    @property
    def multimodal(self) -> bool:
        """Whether batches are keyed by modality (``<modality>/<name>``) with a presence mask per modality."""
        return bool(self.fusion.masked)

    def prepare(self, samples: Samples) -> dict[str, Tensor]:
        """Every sample's inputs as tensors (each encoder's, once per run) and its ``labels``.

        Multimodal: each encoder prepares its modality's view of the samples, its tensors named
        ``<modality>/<name>``, and ``<modality>/present`` holds which samples have it.
        """
        tensors: dict[str, Tensor] = {}
        if not self.multimodal:
            for encoder in self.encoders.values():
                tensors.update(cast(Encoder, encoder).prepare(samples))
        else:
            missing = [m for m in self.encoders if m not in samples.modalities]
            if missing:
                raise ValueError(f"the model has encoders for {missing}, which the samples do not carry")
            for m, encoder in self.encoders.items():
                own = cast(Encoder, encoder).prepare(samples.view(m))
                tensors.update({f"{m}/{k}": v for k, v in own.items()})
                tensors[f"{m}/{PRESENT}"] = torch.from_numpy(samples.presence(m).copy())
        tensors["labels"] = torch.from_numpy(samples.labels)
        tensors.update(self.task.tensors(samples))
        return tensors

    # -- model ---------------------------------------------------------------------------------------------------
    def features(self, batch: dict[str, Tensor]) -> Tensor:
        features, present = self.encode(batch)
        return self.fusion(features, present) if self.multimodal else self.fusion(features)

    def encode(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Each encoder's features by modality and, for a multimodal batch, which rows hold each modality (``{}``
        otherwise): what the fusion step combines, or a task that uses the modalities apart (retrieval)."""
        if not self.multimodal:
            return {m: encoder(batch) for m, encoder in self.encoders.items()}, {}
        features, present = {}, {}
        for m, encoder in self.encoders.items():
            mask = batch[f"{m}/{PRESENT}"].bool()
            own = {k[len(m) + 1:]: v for k, v in batch.items() if k.startswith(m + "/") and k != f"{m}/{PRESENT}"}
            features[m] = _encode_present(cast(Encoder, encoder), own, mask)
            present[m] = mask
        return features, present

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.task.forward(self, batch)[0]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int = 0) -> dict[str, Tensor]:
        logits, features = self.task.forward(self, batch)
        return {"loss": self.task.loss(logits, self.task.targets(batch)), "logits": logits, "features": features}

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int = 0) -> Tensor:
        return self(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        o = self.optim
        if o.name == "sgd":
            return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        if o.name == "adam":
            return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
        if o.name == "adamw":
            return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
        raise ValueError(f"--optim.name must be one of sgd, adam, adamw, got {o.name!r}")

    # -- per-client state ----------------------------------------------------------------------------------------
    def trainable(self) -> dict[str, nn.Parameter]:
        """The parameters a client owns, by name, in a fixed order (those that require gradients).

        The candidates are found once, the first time (the frozen backbone has hundreds of tensors, and states are
        loaded several times per client and round); a tensor a training phase freezes drops out while it is frozen.
        """
        if self._owned is None:
            self._owned = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        return {n: p for n, p in self._owned if p.requires_grad}

    def get_state(self, device: torch.device | str = "cpu") -> State:
        """A detached copy of the trainable parameters (the client's state), on ``device``."""
        return {n: p.detach().to(device, copy=True) for n, p in self.trainable().items()}

    @torch.no_grad()
    def set_state(self, state: State, params: dict[str, nn.Parameter] | None = None) -> None:
        """Copy ``state`` into the trainable parameters (``params``, default :meth:`trainable`); names the module
        lacks are an error."""
        params = self.trainable() if params is None else params
        unknown = [k for k in state if k not in params]
        if unknown:
            raise KeyError(f"state has tensors the model does not: {unknown[:5]}")
        for name, value in state.items():
            # Non-blocking: from the page-locked client states of a CUDA run (fedhb.loop.host_copy) the copies queue
            # on the stream instead of each waiting for the device; on CPU a plain copy.
            params[name].copy_(value, non_blocking=True)
        # One wait for all of them: the host tensors are the clients' states, which the loop and the algorithms
        # write to in place afterwards; a copy still queued would read the new values.
        devices = {p.device for p in params.values() if p.device.type == "cuda"}
        for device in devices:
            torch.cuda.current_stream(device).synchronize()

    def load_state(self, state: State, names: list[str] | None = None) -> None:
        """Load a client's (or the global) state: its model tensors (``names``, default: every key the module has)
        and, when it holds a LoRA rank (:data:`fedhb.models.lora.RANK_KEY`), the adapters run at that rank."""
        params = self.trainable()
        keys = names if names is not None else [k for k in state if k in params]
        self.set_state({k: state[k] for k in keys}, params)
        self.adapters.load(state, params)


#: The name of a modality's presence mask among a multimodal batch's tensors (``text/present``).
PRESENT = "present"


def _encode_present(encoder: Encoder, batch: dict[str, Tensor], present: Tensor) -> Tensor:
    """``encoder``'s features of the rows of ``batch`` that hold its modality, zeros elsewhere (the fusion step
    replaces those): the encoder never runs on an absent sample's placeholder input."""
    if bool(present.all()):
        return encoder(batch)
    rows = present.nonzero().squeeze(1)
    size = (len(present), int(encoder.hidden_size))
    if len(rows) == 0:
        zeros = torch.zeros(size, device=present.device)
        trained = [p for p in encoder.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
        # A batch without the modality still hands back a loss with a path to the encoder's trained tensors (zero
        # gradients), so that an algorithm training only them (FedDPA's personal LoRA) can backpropagate it.
        return zeros + 0.0 * sum(p.sum() for p in trained) if trained else zeros
    out = encoder({k: v[rows] for k, v in batch.items()})
    return torch.zeros(size, dtype=out.dtype, device=out.device).index_copy(0, rows, out)


def lr_at(optim: OptimArgs, rnd: int, rounds: int) -> float:
    """Learning rate of round ``rnd`` (1-based): constant, or cosine from ``lr`` to ``min_lr`` over the run."""
    import math

    if optim.schedule == "constant" or rounds <= 1:
        return optim.lr
    progress = (rnd - 1) / (rounds - 1)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * progress))
