"""m-MOON: MOON's model-contrastive term on a multimodal model, as the Med-MMFL benchmark applies it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fedhb.algorithms._ops import State, model_contrastive_loss
from fedhb.algorithms.moon import MOON, PREVIOUS

if TYPE_CHECKING:
    from torch import nn

    from fedhb.algorithms.trainer import LocalTrainer

CONTRASTS = ("fused", "modalities", "both")


class Representations:
    """Each modality's representation from the model's own forward passes, kept by forward hooks while in a ``with``
    block: the fusion's projection of the modality where the fusion has a trained one (``fusion.proj[m]``: late and
    gated fusion, Med-MMFL's per-modality embeddings), else the modality's encoder output (one modality: what the head
    sees; a task that leaves the fusion out).

    Hooks rather than a second forward pass: the training step's own forward (with its dropout masks and its autograd
    graph) gives the representations, at no extra cost. A forward pass the block sees appends one output per modality;
    :meth:`take` returns everything seen since the last take as ``(rows, width)`` tensors, zeros where a sample lacks
    the modality.

    Args:
        module: The :class:`~fedhb.client.ClientModule` (unwrapped).
    """

    def __init__(self, module: Any) -> None:
        proj = getattr(module.fusion, "proj", None)
        if proj is not None and not any(p.requires_grad for p in proj.parameters()):
            proj = None  # a frozen fusion (a task that uses the modalities apart): the encoders' outputs
        self.layers: dict[str, nn.Module] = {m: proj[m] if proj is not None and m in proj else encoder
                                             for m, encoder in module.encoders.items()}
        self.multimodal = bool(getattr(module, "multimodal", False))
        self.device = next(module.parameters()).device
        self.outputs: dict[str, list[Tensor]] = {m: [] for m in self.layers}
        self._handles: list[Any] = []

    @property
    def modalities(self) -> list[str]:
        return list(self.layers)

    def __enter__(self) -> Representations:
        for m, layer in self.layers.items():
            self._handles.append(layer.register_forward_hook(self._keep(m)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def _keep(self, modality: str) -> Any:
        def hook(layer: nn.Module, inputs: Any, output: Tensor) -> None:
            self.outputs[modality].append(output)
        return hook

    def clear(self) -> None:
        for seen in self.outputs.values():
            seen.clear()

    def present(self, tensors: Mapping[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
        """``{modality: (len(rows),) bool}``: which of ``rows`` (sample indices into ``tensors``) hold each modality."""
        out = {}
        for m in self.layers:
            mask = tensors.get(f"{m}/present") if self.multimodal else None
            out[m] = (torch.ones(len(rows), dtype=torch.bool) if mask is None else mask[rows.cpu()].bool())
        return out

    def take(self, present: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Every modality's representations seen since the last take, one row per entry of ``present[m]`` (zeros where
        it is false), and forget them. An encoder run on the present rows only (:func:`fedhb.client._encode_present`)
        is scattered back to its rows."""
        out = {}
        for m, seen in self.outputs.items():
            mask = present[m]
            rows = torch.cat(seen) if seen else None
            if rows is not None and len(rows) == len(mask):
                out[m] = rows
            elif rows is not None and len(rows) == int(mask.sum()):
                full = torch.zeros(len(mask), rows.shape[1], dtype=rows.dtype, device=rows.device)
                out[m] = full.index_copy(0, mask.to(rows.device).nonzero().squeeze(1), rows)
            elif rows is None and not bool(mask.any()):
                out[m] = torch.zeros(len(mask), 0, device=self.device)
            else:
                raise RuntimeError(f"the {m} representation was seen for {0 if rows is None else len(rows)} rows, "
                                   f"expected {len(mask)}: the task's forward does not pass every batch through "
                                   f"the modality's encoder and fusion")
            seen.clear()
        return out


def training_representations(trainer: LocalTrainer, reps: Representations, tensors: State | None = None
                             ) -> tuple[Tensor, dict[str, Tensor]]:
    """The fused features (:meth:`LocalTrainer.features`) and each modality's representations of every training
    sample in split order, under ``tensors`` if given (they stay loaded); ``reps`` must be entered."""
    reps.clear()
    fused = trainer.features(tensors)
    present = reps.present(trainer.tensors, torch.from_numpy(trainer.index))
    return fused, {m: z.float() for m, z in reps.take(present).items()}


def modality_contrastive_loss(z: Mapping[str, Tensor], z_glob: Mapping[str, Tensor], z_prev: Mapping[str, Tensor],
                              present: Mapping[str, Tensor], temperature: float) -> Tensor | None:
    """``sum_m l_con(z_m, z_glob_m, z_prev_m)``, MOON's term of each modality averaged over the samples that hold it
    (Med-MMFL's m-MOON on Symile-MIMIC sums the three modalities' terms); ``None`` when no sample holds any."""
    total = None
    for m, mask in present.items():
        mask = mask.to(z[m].device)
        if not bool(mask.any()):
            continue
        term = model_contrastive_loss(z[m][mask].float(), z_glob[m][mask], z_prev[m][mask], temperature)
        total = term if total is None else total + term
    return total


class MMOON(MOON):
    """m-MOON, MOON (Li, He and Song, arXiv 2103.16257) on multimodal models as Med-MMFL applies it (Chhetri et al.,
    arXiv 2602.04416; code bhattarailab/Med-MMFL-Benchmark, ``clients/*/moon.py``).

    Local training adds ``mu * l_con`` to the loss, each term ``-log(e^{cos(z, z_glob)/t} / (e^{cos(z, z_glob)/t} +
    e^{cos(z, z_prev)/t}))`` with ``z_glob`` the representation under the received global model and ``z_prev`` under
    the client's model after its previous round. ``contrast`` picks the representations, as Med-MMFL does per task:

    - ``fused`` (MIMIC-CXR classification in Med-MMFL): the fused features the head reads, Med-MMFL's concatenated
      per-modality embeddings (fedhb's late fusion, ``--model.fusion concat``); this is :class:`MOON`'s term;
    - ``modalities`` (Symile-MIMIC retrieval, BraTS in Med-MMFL): one term per modality on that modality's
      representation (the fusion's projection of it, or its encoder output; :class:`Representations`), averaged over
      the samples that hold the modality and summed over modalities;
    - ``both``: the sum of the two.

    A sample that lacks a modality adds nothing to that modality's term (its fused features hold the fusion's learned
    placeholder, which the ``fused`` term contrasts like any feature). The server averages like FedAvg.

    Deliberate differences from Med-MMFL's code, as for :class:`MOON`: ``z_glob`` and ``z_prev`` are computed once per
    round for the client's training samples (eval mode) instead of by two extra forward passes per step; Med-MMFL's
    MIMIC-CXR model L2-normalises each modality's embedding before concatenating, fedhb's fusion does not (the cosine
    of the concatenation then weighs modalities by their norms).

    Client state: ``algo/moon/prev/*`` (the model after the client's last local training), as MOON's.
    """

    client_batchable = False  # as MOON's: the contrastive term needs passes of the global and previous models

    def __init__(self, mu: float = 1.0, temperature: float = 0.5, contrast: str = "fused") -> None:
        """
        Args:
            mu: Weight of the model-contrastive term (Med-MMFL's ``moon_mu``).
            temperature: Temperature ``t`` of the cosine similarities (Med-MMFL's ``moon_tempr``).
            contrast: ``fused``, ``modalities`` or ``both`` (see the class docstring).
        """
        if contrast not in CONTRASTS:
            raise ValueError(f"--algorithm.contrast must be one of {', '.join(CONTRASTS)}, got {contrast!r}")
        super().__init__(mu, temperature)
        self.contrast = contrast

    def local_update(self, trainer: LocalTrainer, state: State) -> None:
        if self.contrast == "fused":
            super().local_update(trainer, state)
            return
        received = trainer.read()
        with Representations(trainer.client_module) as reps:
            z_glob, glob = training_representations(trainer, reps)
            z_prev, prev = training_representations(trainer, reps, {k: state[PREVIOUS + k] for k in self.names})
            trainer.load(received)
            reps.clear()

            def contrastive(batch: dict, out: dict, rows: Tensor) -> Tensor | None:
                present = reps.present(trainer.tensors, torch.from_numpy(trainer.index[rows.cpu().numpy()]))
                seen = reps.take(present)
                at = rows.to(z_glob.device)
                total = modality_contrastive_loss(seen, {m: z[at] for m, z in glob.items()},
                                                  {m: z[at] for m, z in prev.items()}, present, self.temperature)
                if self.contrast == "both":
                    fused = model_contrastive_loss(out["features"].float(), z_glob[at], z_prev[at], self.temperature)
                    total = fused if total is None else total + fused
                return None if total is None else self.mu * total

            trainer.fit(loss=contrastive)
        state.update({PREVIOUS + k: v.cpu() for k, v in trainer.read().items()})
