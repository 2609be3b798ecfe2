"""Contrastive alignment of two or more modalities, scored by zero-shot cross-modal retrieval.

Each modality's encoder features are projected into one shared embedding space by the task's head (one projection
per modality and a learned temperature; the module stays named ``head``, so personalised methods keep or share it as
they do a classification head). Two objectives:

- ``clip`` (Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", arXiv
  2103.00020): L2-normalised embeddings, the symmetric InfoNCE loss over a batch's pairs with a learnable logit scale
  ``exp(t)`` (initialised at ``log(1 / 0.07)``, clipped at 100 as CLIP does); with three modalities, the sum of the
  three pairwise losses (Symile's CLIP baseline, as Med-MMFL's ``clip`` criterion).
- ``symile`` (Saporta et al., "Contrasting with Symile: Simple Model-Agnostic Representation Learning for Unlimited
  Modalities", NeurIPS 2024, arXiv 2411.01053), for exactly three modalities: the multilinear inner product
  ``MIP(a, b, c) = sum_d a_d b_d c_d`` as the score, and for each modality in turn as the anchor the cross-entropy of
  the positive triple against negatives; the loss is the mean over the three anchors. Negative sampling is Symile's
  ``n_squared`` variant: every one of the ``n^2 - 1`` other combinations of the two non-anchor modalities in the batch
  is a negative (the variant that needs no random shuffles, so local training stays a function of the seed and the
  batch order alone; Symile's ``n`` variant shuffles rows each step). Embeddings end with a LayerNorm, as Symile's
  encoders do, and are not L2-normalised (the MIP of unit vectors is tiny); the logit scale starts at
  ``-0.5 log D`` so that the MIPs of a random initialisation give logits of unit scale (Symile's -7 at ``D = 8192``
  is about ``-0.78 log D``).

A sample without one of the modalities a term needs is left out of that term (a batch with fewer than two usable
samples contributes zero, with a path to every trained tensor).

Retrieval metrics, per direction (queries -> candidates), on one evaluation set (a client's test split, or the union
of the clients' test splits under the global model): recall@1/5/10 over every candidate of the set that holds the
candidate modality, and zero-shot retrieval accuracy in Symile's protocol: the positive among ``candidates``
(default 10) candidates, itself and ``candidates - 1`` negatives drawn from the set's other candidates by a generator
seeded with the query's row (so a query's draw depends only on the set, never on ranks or batches). Ties count
against the query. Directions: with two modalities both ways (``a->b``, ``b->a``; the headline metrics average the
two); with three, the target modality (Symile: the chest X-ray) given the other two (``signal+tabular->image``,
scored by the MIP under ``symile`` and by the sum of the pairwise similarities under ``clip``; the headline metrics),
and every pairwise direction (plain inner products; Symile does not train them, they are reported for comparison).
A query needs every query modality and the candidate modality; a candidate needs the candidate modality.

Every algorithm that only trains through the task's loss works, and no fedhb algorithm uses the class labels beyond
it (FedBABU keeps these projections at their initialisation, FedPer/FedRep keep them on the client); the samples'
``labels`` are only what partitions stratify on. CreamFL, which reads the fusion step's per-modality projections,
refuses these models at set-up with its own message.

Global retrieval over the union of the test splits is not a sum of per-client statistics; instead the statistic is
the union's embedding matrix: every sample carries its row (``index``), and a client scatters its test embeddings and
presence flags into a zero ``(N, M * D + M)`` float32 buffer at their rows; the sum over clients and ranks is exact
(each row is written by one client, every other term is zero), so 1 and 2 processes give the same numbers. The buffer
costs ``4 N (M D + M)`` bytes (36 MB for Symile-MIMIC's 11,622 admissions at ``D = 256``).
"""

from __future__ import annotations

import math
from itertools import permutations
from typing import TYPE_CHECKING, Any

import numpy as np

from fedhb.record import Field
from fedhb.tasks.base import Task

if TYPE_CHECKING:
    from torch import Tensor, nn

    from fedhb.data.base import Samples

OBJECTIVES = ("clip", "symile")
#: The recall cut-offs reported.
KS = (1, 5, 10)
METRICS = ("acc", "r1", "r5", "r10")
#: Seed of the negative candidates of the zero-shot accuracy (with the query's row).
CANDIDATE_SEED = 2411_01053
#: CLIP's initial logit scale, log(1 / 0.07), and its cap on exp(scale).
CLIP_INIT = math.log(1 / 0.07)
MAX_SCALE = 100.0


# -- losses -----------------------------------------------------------------------------------------------------------
def clip_loss(a: Tensor, b: Tensor, scale: Tensor) -> Tensor:
    """CLIP's symmetric InfoNCE of paired rows of ``a`` and ``b`` (``(n, D)``, normalised), logits ``scale * a b^T``."""
    import torch
    import torch.nn.functional as F

    logits = scale * a @ b.T
    labels = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def symile_logits(anchor: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """``(n, n^2)`` MIPs of each anchor row with every combination of a row of ``y`` and a row of ``z``: block ``s``
    of the columns pairs ``y_j`` with ``z_{j-s mod n}``, so column ``i`` of block 0 is the positive triple ``i``
    (Symile's ``n_squared`` negative sampling)."""
    import torch

    products = [y * torch.roll(z, shifts=s, dims=0) for s in range(len(y))]
    return anchor @ torch.cat(products).T


def symile_loss(a: Tensor, b: Tensor, c: Tensor, scale: Tensor) -> Tensor:
    """Symile's loss of triples ``(a_i, b_i, c_i)``: the mean over the three anchors of the cross-entropy of the
    positive MIP against the ``n^2 - 1`` negatives of the other two modalities."""
    import torch
    import torch.nn.functional as F

    labels = torch.arange(len(a), device=a.device)
    terms = [F.cross_entropy(scale * symile_logits(x, y, z), labels) for x, y, z in ((a, b, c), (b, a, c), (c, a, b))]
    return sum(terms) / 3  # type: ignore[return-value]


# -- retrieval metrics ------------------------------------------------------------------------------------------------
def directions(modalities: tuple[str, ...], target: str) -> list[tuple[tuple[str, ...], str]]:
    """The scored directions ``(query modalities, candidate modality)``, headline first."""
    pairwise: list[tuple[tuple[str, ...], str]] = [((q,), c) for q, c in permutations(modalities, 2)]
    if len(modalities) == 2:
        return pairwise
    others = tuple(m for m in modalities if m != target)
    return [(others, target), *pairwise]


def direction_name(direction: tuple[tuple[str, ...], str]) -> str:
    return "+".join(direction[0]) + "->" + direction[1]


def similarity(queries: list[Tensor], candidates: Tensor, objective: str) -> Tensor:
    """``(nq, nc)`` scores: the inner product for one query modality; for several, their MIP with the candidate
    (``symile``) or the sum of their inner products with it (``clip``)."""
    if len(queries) == 1 or objective == "clip":
        return sum(q @ candidates.T for q in queries)  # type: ignore[return-value]
    product = queries[0]
    for q in queries[1:]:
        product = product * q
    return product @ candidates.T


def retrieval_metrics(emb: dict[str, Tensor], present: dict[str, Tensor], rows: np.ndarray,
                      direction: tuple[tuple[str, ...], str], objective: str, candidates: int) -> list[float]:
    """``[acc, r1, r5, r10]`` of one direction on one evaluation set: embeddings and presence by modality (``(n, D)``
    and ``(n,)``) and each sample's row (seeds its negative draw); NaN without a query or with a single candidate."""
    import torch

    query_mods, target = direction
    cand = present[target]
    query = cand.clone()
    for m in query_mods:
        query &= present[m]
    cand_rows, query_rows = torch.nonzero(cand).squeeze(1), torch.nonzero(query).squeeze(1)
    if len(query_rows) == 0 or len(cand_rows) < 2:
        return [math.nan] * len(METRICS)
    scores = similarity([emb[m][query_rows].double() for m in query_mods], emb[target][cand_rows].double(), objective)
    # The positive's column: a query holds the candidate modality, so it is among the candidates.
    position = torch.cumsum(cand.long(), 0) - 1
    pos = position[query_rows]
    positive = scores.gather(1, pos[:, None])
    rank = (scores >= positive).sum(1)  # ties count against the query; the positive itself counts once
    out = []
    hits = np.zeros(len(query_rows), dtype=bool)
    others = len(cand_rows) - 1
    take = min(candidates - 1, others)
    for i, p in enumerate(pos.tolist()):
        rng = np.random.default_rng((CANDIDATE_SEED, int(rows[int(query_rows[i])])))
        picks = rng.choice(others, size=take, replace=False)
        picks = picks + (picks >= p)  # skip the positive's own column
        hits[i] = bool((scores[i, torch.from_numpy(picks)] < positive[i, 0]).all())
    out.append(float(hits.mean()))
    out.extend(float((rank <= k).double().mean()) for k in KS)
    return out


# -- the head ---------------------------------------------------------------------------------------------------------
def _head_module(widths: dict[str, int], dim: int, dropout: float, objective: str, scale_init: float) -> nn.Module:
    import torch
    from torch import nn

    class RetrievalHead(nn.Module):
        """One projection per modality into the shared ``dim``-wide space and the learned logit scale; the output
        packs ``[embedding of each modality (zeros where absent), presence flags, logit scale]`` per row."""

        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.ModuleDict({
                m: nn.Sequential(nn.Dropout(dropout), nn.Linear(w, dim),
                                 *([nn.LayerNorm(dim)] if objective == "symile" else []))
                for m, w in widths.items()
            })
            # Shape (1,), not a scalar: algorithms stack and flatten per-tensor state along dimension 1 (APPLE).
            self.logit_scale = nn.Parameter(torch.full((1,), float(scale_init)))

        def forward(self, features: dict[str, Tensor], present: dict[str, Tensor]) -> Tensor:
            parts, flags = [], []
            for m, proj in self.proj.items():
                z = proj(features[m])
                if objective == "clip":
                    z = nn.functional.normalize(z, dim=-1)
                mask = present[m].to(z.dtype)[:, None] if m in present else torch.ones_like(z[:, :1])
                parts.append(z * mask)
                flags.append(mask)
            scale = self.logit_scale.reshape(1, 1).expand(len(parts[0]), 1).to(parts[0].dtype)
            return torch.cat([*parts, *flags, scale], dim=1)

    return RetrievalHead()


class Retrieval(Task):
    """Contrastive alignment (``clip`` or ``symile``) of every modality of multimodal samples; zero-shot retrieval
    accuracy and recall@1/5/10 by direction, per client and on the union of the test splits.

    Args:
        modalities: The modalities aligned, in the samples' order (at least two).
        num_samples: Samples in the dataset (the rows of the global statistic).
        objective: ``clip`` or ``symile`` (three modalities only); default ``symile`` for three, ``clip`` otherwise.
        target: The candidate modality of the headline direction for three or more modalities (default: the first).
        candidates: Candidates per query of the zero-shot accuracy (Symile-MIMIC: 10).
        logit_scale_init: Initial log logit scale (default: ``log(1/0.07)`` for clip, ``-0.5 log D`` for symile).
    """

    selection_score = "acc"
    #: The fusion step is not trained (each modality is projected on its own); the client model freezes it.
    uses_fusion = False

    def __init__(self, modalities: tuple[str, ...], num_samples: int, objective: str | None = None,
                 target: str | None = None, candidates: int = 10, logit_scale_init: float | None = None) -> None:
        if len(modalities) < 2:
            raise ValueError(f"retrieval aligns two or more modalities; the samples carry {list(modalities)}")
        objective = objective or ("symile" if len(modalities) == 3 else "clip")
        if objective not in OBJECTIVES:
            raise ValueError(f"retrieval objective must be one of {OBJECTIVES}, got {objective!r}")
        if objective == "symile" and len(modalities) != 3:
            raise ValueError(f"the symile objective aligns exactly three modalities; the samples carry "
                             f"{list(modalities)} (use objective clip)")
        target = target or modalities[0]
        if target not in modalities:
            raise ValueError(f"retrieval target {target!r} is not one of the samples' modalities {list(modalities)}")
        if candidates < 2:
            raise ValueError(f"retrieval candidates must be >= 2, got {candidates}")
        self.modalities, self.num_samples, self.objective = tuple(modalities), int(num_samples), objective
        self.target, self.candidates, self.logit_scale_init = target, int(candidates), logit_scale_init
        self.directions = directions(self.modalities, target)
        self.widths: dict[str, int] | None = None
        self.dim = 0

    @classmethod
    def from_samples(cls, samples: Samples) -> Retrieval:
        """From the samples' modalities and their ``meta["retrieval"]`` options (``objective``, ``target``,
        ``candidates``, ``logit_scale_init``)."""
        if samples.modality != "multimodal":
            raise ValueError(f"retrieval needs multimodal samples (two or more modalities); these hold "
                             f"{samples.modality} only")
        options = dict(samples.meta.get("retrieval") or {})
        return cls(samples.modalities, len(samples), **options)

    # -- names ----------------------------------------------------------------------------------------------------
    @property
    def score_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return (*METRICS, *(f"{direction_name(d)}/{k}" for d in self.directions for k in METRICS))

    @property
    def fields(self) -> tuple[Field, ...]:  # type: ignore[override]
        return (
            Field("personalized_acc", "personalized/retrieval_acc", "retrieval acc (%)", "fraction", final=True),
            Field("worst_client_acc", "personalized/worst_client_retrieval_acc", "worst-client retrieval acc (%)",
                  "fraction", final=True),
            *(Field(f"personalized_{k}", f"personalized/recall@{k[1:]}", kind="fraction", final=True)
              for k in METRICS[1:]),
            Field("global_acc", "global/retrieval_acc", "global retrieval acc (%)", "fraction", final=True),
            *(Field(f"global_{k}", f"global/recall@{k[1:]}", kind="fraction", final=True) for k in METRICS[1:]),
            Field("personalized_by_direction"),  # {direction: {acc, r1, r5, r10}}, means over clients
            Field("global_by_direction"),
        )

    # -- model ----------------------------------------------------------------------------------------------------
    def build_encoders(self, model: Any, samples: Samples) -> dict[str, Any]:
        """The default encoders (one per modality); their widths size the projections, ``--model.fusion_dim`` is
        the shared embedding width."""
        from fedhb.models import build_encoders

        encoders = build_encoders(model, samples)
        self.widths = {m: int(e.hidden_size) for m, e in encoders.items()}
        self.dim = int(model.fusion_dim)
        return encoders

    def head(self, in_features: int, dropout: float) -> nn.Module:
        if self.widths is None:
            raise RuntimeError("Retrieval.head: build the client model with fedhb.build.build_module (the task sizes "
                               "its projections from the encoders it builds)")
        init = self.logit_scale_init
        if init is None:
            init = CLIP_INIT if self.objective == "clip" else -0.5 * math.log(self.dim)
        return _head_module(self.widths, self.dim, dropout, self.objective, init)

    def tensors(self, samples: Samples) -> dict[str, Tensor]:
        import torch

        return {"index": torch.arange(len(samples), dtype=torch.int64)}

    def forward(self, module: Any, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        features, present = module.encode(batch)
        # What MOON-style methods contrast: the (frozen) fusion of the encoders' features, as the trainer computes
        # it for the global and previous models.
        return module.head(features, present), module.fusion(features, present)

    def targets(self, batch: dict[str, Tensor]) -> Tensor:
        return batch["index"]

    def unpack(self, output: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """Embeddings and presence flags by modality, and the logit scale, of a packed head output."""
        m, d = len(self.modalities), self.dim
        emb = {name: output[:, i * d:(i + 1) * d] for i, name in enumerate(self.modalities)}
        present = {name: output[:, m * d + i] > 0.5 for i, name in enumerate(self.modalities)}
        return emb, present, output[:, m * d + m]

    # -- training -------------------------------------------------------------------------------------------------
    def loss(self, output: Tensor, targets: Tensor) -> Tensor:
        output = output.float()  # MIPs and logits in float32 under mixed precision
        emb, present, log_scale = self.unpack(output)
        scale = log_scale[:1].exp().clamp(max=MAX_SCALE).squeeze(0) if len(output) else output.sum()
        zero = output.sum() * 0.0  # keeps a path to every trained tensor when no term applies
        if self.objective == "symile":
            a, b, c = self.modalities
            rows = present[a] & present[b] & present[c]
            if int(rows.sum()) < 2:
                return zero
            return symile_loss(emb[a][rows], emb[b][rows], emb[c][rows], scale) + zero
        total = zero
        pairs = [(x, y) for i, x in enumerate(self.modalities) for y in self.modalities[i + 1:]]
        for x, y in pairs:
            rows = present[x] & present[y]
            if int(rows.sum()) >= 2:
                total = total + clip_loss(emb[x][rows], emb[y][rows], scale)
        return total

    def member_scores(self, output: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Each sample's own score in the headline direction as the confidence (with two modalities the inner
        product of its two embeddings; with three the score of its target against the other two, MIP under
        ``symile``), its negative as the loss: a contrastive model aligns the pairs it trained on more closely, the
        signal of Ko et al.'s similarity attack on CLIP (arXiv 2310.00108). A loss of one sample alone has no
        negatives, so it cannot serve. NaN for a sample missing one of the direction's modalities."""
        import torch

        emb, present, _ = self.unpack(output.to(torch.float64))
        queries, candidate = self.directions[0]
        if len(queries) == 1 or self.objective == "clip":
            own = sum((emb[q] * emb[candidate]).sum(1) for q in queries)
        else:
            product = emb[candidate]
            for q in queries:
                product = product * emb[q]
            own = product.sum(1)
        usable = present[candidate].clone()
        for q in queries:
            usable &= present[q]
        own = torch.where(usable, torch.as_tensor(own), torch.full_like(usable, math.nan, dtype=torch.float64))
        return -own, own

    # -- scoring --------------------------------------------------------------------------------------------------
    def _metrics(self, output: Tensor, rows: np.ndarray) -> list[float]:
        emb, present, _ = self.unpack(output.float())
        per = [retrieval_metrics(emb, present, rows, d, self.objective, self.candidates) for d in self.directions]
        head = per[0] if len(self.modalities) > 2 else [_nanmean([a, b]) for a, b in zip(per[0], per[1])]
        return [*head, *(v for p in per for v in p)]

    def score(self, output: Tensor, targets: Tensor) -> Tensor:
        import torch

        if len(output) == 0:
            return self.empty_score()
        values = self._metrics(output, targets.cpu().numpy())
        return torch.tensor([*values, float(len(output))], dtype=torch.float64)

    def _by_direction(self, values: list[float], prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {f"{prefix}_{k}": values[i] for i, k in enumerate(METRICS[1:], start=1)}
        out[f"{prefix}_by_direction"] = {
            direction_name(d): {k: values[len(METRICS) * (j + 1) + i] for i, k in enumerate(METRICS)}
            for j, d in enumerate(self.directions)
        }
        return out

    def reduce(self, scores: dict[int, Tensor]) -> dict[str, Any]:
        rows = {c: r.tolist() for c, r in scores.items()}
        valid = [r for r in rows.values() if r[-1] > 0]
        means = [_nanmean([r[i] for r in valid]) for i in range(self.width - 1)]
        acc = [r[0] for r in valid if not math.isnan(r[0])]
        return {
            "personalized_acc": means[0],
            "worst_client_acc": float(min(acc)) if acc else math.nan,
            **self._by_direction(means, "personalized"),
            "client_acc": {str(c): round(r[0], 6) for c, r in sorted(rows.items())},
        }

    def global_stats(self, output: Tensor, targets: Tensor) -> Tensor:
        """The union's embedding matrix, this split's rows filled: ``(N, M * D + M)``, zeros elsewhere."""
        import torch

        width = len(self.modalities) * (self.dim + 1)
        buffer = torch.zeros(self.num_samples, width, dtype=torch.float32)
        if len(output):
            buffer[targets.long().cpu()] = output[:, :width].float().cpu()
        return buffer

    def global_metrics(self, stats: Tensor | None) -> dict[str, Any]:
        if stats is None:
            return {"global_acc": None, **{f"global_{k}": None for k in METRICS[1:]}, "global_by_direction": None}
        m = len(self.modalities)
        rows = np.flatnonzero((stats[:, m * self.dim:] > 0.5).any(1).numpy())
        if len(rows) == 0:
            values = [math.nan] * (self.width - 1)
        else:
            import torch

            picked = stats[torch.from_numpy(rows)]  # the logit scale column (unused by ranking) as zeros:
            values = self._metrics(torch.cat([picked, torch.zeros(len(picked), 1)], dim=1), rows)
        return {"global_acc": values[0], **self._by_direction(values, "global")}


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan
