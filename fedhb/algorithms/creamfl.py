"""CreamFL: representation-level ensemble knowledge transfer over server-held public data."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from fedhb import seeds
from fedhb.algorithms._ops import State, is_head, model_contrastive_loss
from fedhb.algorithms.base import algo_key
from fedhb.algorithms.fedavg import FedAvg
from fedhb.algorithms.mmoon import Representations
from fedhb.mapped import gather

if TYPE_CHECKING:
    from fedhb.algorithms.trainer import LocalTrainer

#: A client's representations of the public data, per modality (``<prefix>encoders.<modality>``, so that
#: :func:`fedhb.models.bytes_by_modality` counts them with the modality).
LOCAL = algo_key("creamfl", "local/")
#: The server's ensemble of them, which every client receives.
GLOBAL = algo_key("creamfl", "global/")
#: ``(modalities,)``: 1 where the client's representations of a modality count (it holds the modality).
HELD = algo_key("creamfl", "held")
#: ``(modalities,)``: 1 where the server has an ensemble representation of the modality (after its first holder).
READY = algo_key("creamfl", "ready")
#: Tag of the stream that orders the public batches of a client's round (``[client seed, 910]``).
PUBLIC_ORDER = 910


def _unit(z: Tensor) -> Tensor:
    return torch.nn.functional.normalize(z.float(), dim=-1)


def intra_modal_loss(z: dict[str, Tensor], target: dict[str, Tensor], old: dict[str, Tensor],
                     present: dict[str, Tensor], temperature: float) -> Tensor | None:
    """CreamFL's intra-modal regulariser (arXiv 2302.08888, Sec. 3.3; ``MMClientTrainer.train_epoch``): for every
    public sample ``i`` and modality ``m`` it holds, ``-log(e^{s(z, g)/t} / (e^{s(z, g)/t} + e^{s(z, o)/t}))`` with
    ``g`` the global representation and ``o`` the client's before this round's training, ``s`` the cosine; the mean
    over all ``(i, m)`` pairs (the paper's code stacks both modalities' rows into one cross-entropy). ``None``
    without any pair."""
    total, count = None, 0
    for m, mask in present.items():
        mask = mask.to(z[m].device)
        n = int(mask.sum())
        if n == 0:
            continue
        term = n * model_contrastive_loss(z[m][mask].float(), target[m][mask], old[m][mask], temperature)
        total, count = (term if total is None else total + term), count + n
    return None if total is None else total / count


def inter_modal_loss(z: dict[str, Tensor], targets: dict[str, Tensor], rows: Tensor, present: dict[str, Tensor],
                     public_present: dict[str, Tensor], temperature: float) -> Tensor | None:
    """CreamFL's inter-modal regulariser: for each modality ``m`` of ``z`` and each other modality ``m'`` of
    ``targets``, a cross-entropy that picks sample ``i``'s global ``m'`` representation among those of every public
    sample holding ``m'`` (logits ``s(z_m,i, g_m',j) / t``, ``s`` the cosine), averaged over the batch's samples
    holding both; summed over the ordered pairs ``(m, m')`` (the paper's image-to-text plus text-to-image).

    Args:
        z: ``{m: (B, d)}`` the batch's representations.
        targets: ``{m': (P, d)}`` the global representations of every public sample.
        rows: ``(B,)`` the batch's positions in the public set.
        present: ``{m: (B,)}`` which batch samples hold ``m``.
        public_present: ``{m': (P,)}`` which public samples hold ``m'``.
    """
    total = None
    for m, zm in z.items():
        for other, target in targets.items():
            if other == m:
                continue
            columns = public_present[other].to(target.device)
            keep = (present[m].to(zm.device) & columns.to(zm.device)[rows.to(zm.device)])
            if not bool(keep.any()):
                continue
            # Label: sample i's column among the public samples holding m'.
            label = (torch.cumsum(columns.long(), 0) - 1).to(zm.device)[rows.to(zm.device)[keep]]
            logits = _unit(zm[keep]) @ _unit(target[columns]).T.to(zm.device) / temperature
            term = torch.nn.functional.cross_entropy(logits, label)
            total = term if total is None else total + term
    return total


def contribution_weights(reps: list[Tensor], references: list[Tensor]) -> Tensor:
    """CreamFL's representation ensemble weights (arXiv 2302.08888, eq. 4; ``MMFL.distill``'s ``con_w``): client ``k``'s
    score for public sample ``i`` is ``log softmax_j(<z^k_i, r_j>)[i]``, how well its representation of ``i`` picks
    ``i``'s reference representation (of the other modality) among all public samples; the weights are the softmax of
    the scores over clients, sample by sample. With several references (other modalities) the score is their mean.
    Rows that are zero (samples lacking the modality) are left out on either side; a sample with no score weighs
    every client equally.

    Args:
        reps: ``K`` tensors ``(P, d)``: each client's unit representations of the public samples.
        references: ``(P, d)`` reference representations.

    Returns:
        ``(K, P)`` weights, each column summing to 1.
    """
    reps = [z.to(torch.float64) for z in reps]
    present = reps[0].abs().sum(1) > 0  # every client represents the same public samples
    scores = torch.zeros(len(reps), len(present), dtype=torch.float64)
    counts = torch.zeros(len(present), dtype=torch.float64)
    for ref in references:
        ref = ref.to(torch.float64)
        columns = ref.abs().sum(1) > 0
        rows = present & columns
        if not bool(rows.any()):
            continue
        position = (torch.cumsum(columns.long(), 0) - 1)[rows]  # sample i's column among the references
        for c, z in enumerate(reps):
            log_prob = torch.log_softmax(z[rows] @ ref[columns].T, dim=1)
            scores[c, rows] += log_prob.gather(1, position[:, None]).squeeze(1)
        counts += rows.to(torch.float64)
    scores = scores / counts.clamp_min(1)
    return torch.softmax(scores, dim=0)


class CreamFL(FedAvg):
    """CreamFL, "Multimodal Federated Learning via Contrastive Representation Ensemble" (Yu et al., ICLR 2023, arXiv
    2302.08888; code FLAIR-THU/CreamFL, as Med-MMFL runs it, bhattarailab/Med-MMFL-Benchmark ``*/creamfl.py``).

    The server holds public data: ``public_fraction`` of every client's training split, drawn from the run seed and
    taken out of that split before anything trains (the loop does it, :func:`fedhb.loop.hold_out_public`), so no
    sample is both public and private, and validation and test splits are untouched. Each round:

    1. every client trains on its own data with the local objective ``task loss + interintra_weight * (L_intra +
       L_inter)``, the regularisers on a batch of public data per step (:func:`intra_modal_loss`: toward the global
       representation, away from the client's own before this round; :func:`inter_modal_loss`: each modality's
       representation picks the sample's global representation of every other modality among all public samples);
    2. it uploads its model tensors and its representations of every public sample, per modality it holds (the
       fusion's projection of the modality, L2-normalised: Med-MMFL's per-modality embeddings; with one modality, the
       features the head reads);
    3. the server averages the model tensors like FedAvg and ensembles the representations, per modality, weighting
       each client's by how well it retrieves the sample's reference representation of the other modalities
       (:func:`contribution_weights`); every client receives the model and the ensemble.

    Deliberate differences, for LoRA on frozen backbones: the server model is the global (FedAvg) LoRA model, not a
    separate larger one trained on the public data, so the server neither trains on the public data nor distils the
    ensemble into a model; the ensemble representations take the place of the server model's as the clients' targets
    (step 1 of the next round) and as the contribution weighting's reference (until the first ensemble exists the
    reference is the uploads' sample-weighted mean). The regularisers run on one public batch per local step rather
    than as a pass over the public data after each local epoch. Until a modality has an ensemble the regularisers
    leave it out, so round 1 is FedAvg's. The representations are unit vectors (Med-MMFL's and the paper's models
    normalise their embeddings), the temperature of every term is ``temperature`` (both codes use 0.5).

    Costs: each upload and download carries ``P x d`` floats per modality (``P`` public samples, ``d`` the fusion
    width), as in the paper, and each client's state holds its own and the global representations.

    Client state: ``algo/creamfl/local/*`` and ``algo/creamfl/global/*`` (``(P, d)`` per modality), ``algo/creamfl/
    held`` and ``algo/creamfl/ready`` (per modality).
    """

    client_batchable = False  # --federation.client_batch: one client at a time (its regulariser runs public batches)

    def __init__(self, public_fraction: float = 0.1, interintra_weight: float = 0.5, temperature: float = 0.5) -> None:
        """
        Args:
            public_fraction: Fraction of every client's training split the server holds as public data (Med-MMFL uses
                10% of one client's data).
            interintra_weight: Weight of the inter- and intra-modal regularisers (the paper's ``interintra_weight``,
                0.5 in its command).
            temperature: Temperature of the contrastive terms (0.5 in both codes).
        """
        if not 0 < public_fraction < 1:
            raise ValueError(f"--algorithm.public_fraction must be in (0, 1), got {public_fraction!r}")
        if interintra_weight < 0:
            raise ValueError(f"--algorithm.interintra_weight must be >= 0, got {interintra_weight!r}")
        if temperature <= 0:
            raise ValueError(f"--algorithm.temperature must be > 0, got {temperature!r}")
        super().__init__()
        self.public_fraction, self.interintra_weight, self.temperature = public_fraction, interintra_weight, temperature
        #: The public samples' indices, which the loop sets before :meth:`setup`.
        self.public_index: np.ndarray | None = None

    # -- set-up ----------------------------------------------------------------------------------------------------
    def setup(self, names: list[str], initial: State | None = None, num_clients: int | None = None) -> None:
        super().setup(names, initial, num_clients)
        if self.public_index is None:
            raise ValueError("CreamFL needs server-held public data, which fedhb.loop.FederatedLoop holds out of the "
                             "clients' training splits (--algorithm.public_fraction); it cannot run inside a privacy "
                             "wrapper (--privacy.*, --secure_aggregation.*)")
        if initial is None:
            raise ValueError("CreamFL.setup needs the initial model (its widths size the representations)")
        self.widths = representation_widths(initial)

    @property
    def modalities(self) -> list[str]:
        return list(self.widths)

    def init_client_state(self, state: State, client: int) -> State:
        p, m = len(self._public()), len(self.widths)
        for prefix in (LOCAL, GLOBAL):
            state.update({prefix + f"encoders.{mod}": torch.zeros(p, d) for mod, d in self.widths.items()})
        state[HELD], state[READY] = torch.zeros(m), torch.zeros(m)
        return state

    def _public(self) -> np.ndarray:
        if self.public_index is None:
            raise ValueError("CreamFL has no public data: the loop sets public_index before setup")
        return self.public_index

    # -- the client --------------------------------------------------------------------------------------------------
    def local_update(self, trainer: LocalTrainer, state: State) -> None:
        public = torch.from_numpy(self._public())
        reps = Representations(trainer.client_module)
        if reps.modalities != self.modalities:
            raise ValueError(f"CreamFL was set up for the modalities {self.modalities}, the model has "
                             f"{reps.modalities}")
        train_present = reps.present(trainer.tensors, torch.from_numpy(trainer.index))
        held = {m: bool(mask.any()) for m, mask in train_present.items()}
        public_present = reps.present(trainer.tensors, public)
        ready = {m: bool(state[READY][j] > 0) for j, m in enumerate(self.modalities)}
        targets = {m: state[GLOBAL + f"encoders.{m}"].to(trainer.device) for m in self.modalities if ready[m]}
        own = [m for m in self.modalities if held[m] and ready[m]]
        with reps:
            old = represent(trainer, reps, public, self.widths)
        if own and self.interintra_weight > 0 and len(public) > 0:
            order = torch.randperm(len(public), generator=torch.Generator().manual_seed(
                seeds.derive(torch.initial_seed(), PUBLIC_ORDER)))
            cursor = [0]

            def regulariser(batch: dict, out: dict, rows: Tensor) -> Tensor | None:
                size = min(trainer.batch_size, len(order))
                take = order[(torch.arange(size) + cursor[0]) % len(order)]
                cursor[0] = (cursor[0] + size) % len(order)
                samples = public[take]
                pub = gather(trainer.fabric, trainer.tensors, samples)
                reps.clear()
                trainer.client_module.features(pub)
                present = {m: mask[take] for m, mask in public_present.items()}
                z = {m: v for m, v in reps.take(present).items() if m in own}
                mine = {m: present[m] for m in own}
                intra = intra_modal_loss(z, {m: targets[m][take.to(trainer.device)] for m in own},
                                         {m: old[m][take.to(trainer.device)] for m in own}, mine, self.temperature)
                inter = inter_modal_loss(z, targets, take, mine, public_present, self.temperature)
                terms = [x for x in (intra, inter) if x is not None]
                return self.interintra_weight * sum(terms) if terms else None  # type: ignore[return-value]

            with reps:
                trainer.fit(loss=regulariser)
        else:
            trainer.fit()
        with reps:
            new = represent(trainer, reps, public, self.widths)
        for m in self.modalities:
            state[LOCAL + f"encoders.{m}"] = (new[m] if held[m] else torch.zeros_like(new[m])).cpu()
        state[HELD] = torch.tensor([float(held[m]) for m in self.modalities])

    def upload(self, state: State) -> State:
        sent = self.model_part(state)
        sent.update({LOCAL + f"encoders.{m}": state[LOCAL + f"encoders.{m}"] for m in self.modalities})
        sent[HELD] = state[HELD]
        return sent

    # -- the server ----------------------------------------------------------------------------------------------------
    def aggregate(self, uploads: dict[int, State], num_samples: dict[int, int]) -> dict[int, State]:
        ids = sorted(uploads)
        model = self.combine({i: self.model_part(uploads[i]) for i in ids}, num_samples)
        previous = self._global or {}
        ready = previous.get(READY, torch.zeros(len(self.modalities))).clone()
        ensemble = {m: previous.get(GLOBAL + f"encoders.{m}", torch.zeros(len(self._public()), d))
                    for m, d in self.widths.items()}
        holders = {m: [i for i in ids if float(uploads[i][HELD][j]) > 0] for j, m in enumerate(self.modalities)}

        def reference(m: str) -> Tensor | None:
            j = self.modalities.index(m)
            if float(ready[j]) > 0:
                return ensemble[m]
            if not holders[m]:
                return None
            return _weighted_mean([uploads[i][LOCAL + f"encoders.{m}"] for i in holders[m]],
                                  [num_samples[i] for i in holders[m]])

        refs = {m: reference(m) for m in self.modalities}
        new = dict(ensemble)
        for j, m in enumerate(self.modalities):
            if not holders[m]:
                continue
            others = [r for o, r in refs.items() if o != m and r is not None] or [r for r in [refs[m]] if r is not None]
            reps = [uploads[i][LOCAL + f"encoders.{m}"].to(torch.float64) for i in holders[m]]
            weights = contribution_weights(reps, others)
            new[m] = (weights[:, :, None] * torch.stack(reps)).sum(0).to(torch.float32)
            ready[j] = 1.0
        glob = {**model, **{GLOBAL + f"encoders.{m}": v for m, v in new.items()}, READY: ready}
        self._global = glob
        return {i: glob for i in ids}


def _weighted_mean(reps: list[Tensor], weights: list[int]) -> Tensor:
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    return (w[:, None, None] * torch.stack([r.to(torch.float64) for r in reps])).sum(0)


def representation_widths(initial: State) -> dict[str, int]:
    """``{modality: width}`` of the representations :class:`~fedhb.algorithms.mmoon.Representations` keeps, from the
    model's tensors: the fusion's projection of each modality (``fusion.proj.<m>.weight``), or, with one modality and
    no projection, the width the head reads (its first matrix's input)."""
    widths = {}
    for name, value in initial.items():
        parts = name.split(".")
        if len(parts) == 4 and parts[:2] == ["fusion", "proj"] and parts[3] == "weight" and value.ndim == 2:
            widths[parts[2]] = int(value.shape[0])
    if widths:
        return widths
    encoders = list(dict.fromkeys(n.split(".")[1] for n in initial if n.startswith("encoders.")))
    head = [v for n, v in initial.items() if is_head(n) and v.ndim == 2]
    if len(encoders) != 1 or not head:
        raise ValueError(f"CreamFL needs a fusion with a projection per modality (--model.fusion concat or gated) or "
                         f"one modality and a linear head; this model has encoders {encoders or 'none trained'}")
    return {encoders[0]: int(head[0].shape[1])}


def represent(trainer: LocalTrainer, reps: Representations, index: Tensor, widths: dict[str, int]
              ) -> dict[str, Tensor]:
    """Every modality's unit representation (``(len(index), widths[m])``) of the samples ``index`` under the model
    loaded now (eval mode, no gradients), zero rows where a sample lacks the modality; ``reps`` must be entered."""
    module = trainer.client_module
    was_training = module.training
    module.eval()
    reps.clear()
    with torch.no_grad():
        for start in range(0, len(index), trainer.eval_batch_size):
            samples = index[start:start + trainer.eval_batch_size]
            batch = gather(trainer.fabric, trainer.tensors, samples)
            with trainer.fabric.autocast():
                module.features(batch)
    module.train(was_training)
    present = reps.present(trainer.tensors, index)
    out = {}
    for m, z in reps.take(present).items():
        mask = present[m].to(z.device)
        out[m] = (torch.where(mask[:, None], _unit(z), torch.zeros((), device=z.device)) if z.shape[1] else
                  torch.zeros(len(index), widths[m], device=trainer.device))
    return out
