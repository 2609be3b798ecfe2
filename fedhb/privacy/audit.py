"""A measured privacy audit: membership inference against each client's final model.

For every client, **members** are samples of its training split and **non-members** samples of its test split (held
out, from the same distribution, never trained on by that client). The client's final model (the one it is scored
with, :meth:`~fedhb.algorithms.Algorithm.personalized_model`) is attacked in two ways:

- **loss threshold** (Yeom et al., "Privacy Risk in Machine Learning", arXiv 1709.01604): a sample is called a member
  when its loss is low; the score is ``-loss``.
- **LiRA, offline and cheap** (Carlini et al., "Membership Inference Attacks From First Principles", arXiv
  2112.03570): the score is the target's logit-scaled confidence ``phi = log(p_y / (1 - p_y))`` on the sample,
  minus its mean over ``--audit.shadows`` reference models that never saw it, over their pooled standard deviation
  (the paper's offline attack with a global variance). The reference models are cheap: each starts from the run's
  initial model and trains on a random half of the client's validation split (disjoint from both members and
  non-members) with the run's local optimizer, so they calibrate each sample's difficulty without retraining the
  federation. The paper's shadows retrain the whole pipeline; these are weaker, so the attack is a lower bound.

Each attack reports its AUC (0.5: no better than chance) and its true-positive rate at a 1% false-positive rate (with
fewer than 100 non-members, at no false positive), per client and averaged over clients. AUC near 0.5 and a TPR near
0.01 are what a private model shows; a model that memorised its training data shows an AUC well above 0.5.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fedhb import seeds

if TYPE_CHECKING:
    from fedhb.algorithms._ops import State
    from fedhb.config import AuditArgs
    from fedhb.loop import FederatedLoop

#: What each client's row holds (the order of the values gathered from every rank).
COLUMNS = ("loss_auc", "loss_tpr_at_1pct_fpr", "lira_auc", "lira_tpr_at_1pct_fpr", "members", "non_members")


def auc(members: np.ndarray, non_members: np.ndarray) -> float:
    """The probability that a member scores above a non-member, ties counting half (the Mann-Whitney U statistic
    over the pair count)."""
    if len(members) == 0 or len(non_members) == 0:
        return math.nan
    scores = np.concatenate([members, non_members])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[:len(members)].sum() - len(members) * (len(members) + 1) / 2
    return float(u / (len(members) * len(non_members)))


def tpr_at_fpr(members: np.ndarray, non_members: np.ndarray, fpr: float = 0.01) -> float:
    """The fraction of members scoring above the threshold that lets at most ``fpr`` of the non-members through
    (``floor(fpr * non-members)`` of them)."""
    if len(members) == 0 or len(non_members) == 0:
        return math.nan
    allowed = int(math.floor(fpr * len(non_members)))
    threshold = np.sort(non_members)[::-1][allowed]
    return float((members > threshold).mean())


def confidence(outputs: Tensor, targets: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """A classifier's per-example loss and LiRA's logit-scaled confidence ``phi = log(p_y / (1 - p_y))`` of the true
    class (multi-label: ``-loss``), in float64."""
    z = outputs.to(torch.float64)
    if kind in ("multi-class", "binary"):
        y = targets.long()
        loss = F.cross_entropy(z, y, reduction="none")
        true = z.gather(1, y[:, None])[:, 0]
        others = z.scatter(1, y[:, None], -math.inf)
        return loss, true - torch.logsumexp(others, 1)
    loss = F.binary_cross_entropy_with_logits(z, targets.to(z.dtype), reduction="none").mean(1)
    return loss, -loss


def per_example(outputs: Tensor, targets: Tensor, task: Any) -> tuple[Tensor, Tensor]:
    """Each example's loss and confidence ``phi``, as the task's :meth:`~fedhb.tasks.base.Task.member_scores` gives
    them (a classifier's by :func:`confidence`; segmentation: the case's Dice; retrieval: the similarity of the
    sample's own modalities; open VQA: the answer's token F1), or by :func:`confidence` for anything else with a
    classification ``kind``."""
    scores = getattr(task, "member_scores", None)
    loss, phi = scores(outputs, targets) if scores is not None else confidence(outputs, targets, task.kind)
    return loss.to(torch.float64), phi.to(torch.float64)


def _pick(index: np.ndarray, n: int, seed: int, *key: int) -> np.ndarray:
    if len(index) <= n:
        return index
    return np.sort(seeds.rng(seed, *key, seeds.Stream.AUDIT).choice(index, size=n, replace=False))


def audit_client(loop: FederatedLoop, client: int, initial: State, args: AuditArgs, seed: int) -> list[float]:
    """The attacks on one of this rank's clients; a row in :data:`COLUMNS` order."""
    from fedhb.algorithms.trainer import LocalTrainer
    from fedhb.client import lr_at

    split = loop.splits[client]
    n = min(len(split.train), len(split.test), args.max_samples)
    members = _pick(split.train, n, seed, client, 0)
    non_members = _pick(split.test, n, seed, client, 1)
    targets = np.concatenate([members, non_members])
    is_member = np.arange(len(targets)) < len(members)
    if n == 0:
        return [math.nan] * 4 + [0.0, 0.0]
    loop.load(loop.algorithm.personalized_model(loop.states[client]))
    out, y = loop.predict(targets)
    loss, phi = per_example(out, y, loop.task)
    # Examples the task cannot score (a retrieval sample missing a modality) are left out on both sides.
    scored = torch.isfinite(loss) & torch.isfinite(phi)
    is_member, loss, phi = is_member[scored.numpy()], loss[scored], phi[scored]
    loss_score = (-loss).numpy()
    row = [auc(loss_score[is_member], loss_score[~is_member]), tpr_at_fpr(loss_score[is_member],
                                                                         loss_score[~is_member])]
    reference = []
    epochs = args.shadow_epochs or loop.args.rounds * loop.args.local_epochs
    for s in range(args.shadows):
        half = _pick(split.val, max(1, len(split.val) // 2), seed, client, 2 + s)
        loop.load(initial)
        torch.manual_seed(seeds.derive(seed, client, s, seeds.Stream.AUDIT))
        trainer = LocalTrainer(loop.fabric, loop.module, loop.client_module, loop.optimizer, loop.tensors, half,
                               epochs=epochs, batch_size=loop.args.batch_size,
                               eval_batch_size=loop.args.eval_batch_size, lr=lr_at(loop.optim, 1, loop.args.rounds),
                               optim=loop.optim, seed=seeds.derive(seed, client, s, 1, seeds.Stream.AUDIT), round=0,
                               rounds=loop.args.rounds, client=client)
        if len(half):
            trainer.fit()
        ref_out, ref_y = loop.predict(targets)
        reference.append(per_example(ref_out, ref_y, loop.task)[1][scored])
    ref = torch.stack(reference)
    spread = float((ref - ref.mean(0)).std()) if len(reference) > 1 else float(ref.std())
    lira = ((phi - ref.mean(0)) / max(spread, 1e-12)).numpy()
    row += [auc(lira[is_member], lira[~is_member]), tpr_at_fpr(lira[is_member], lira[~is_member])]
    return row + [float(is_member.sum()), float((~is_member).sum())]


def audit_federation(loop: FederatedLoop, initial: State, args: AuditArgs, seed: int) -> dict[str, Any]:
    """Every client's attacks (each rank audits its own clients; the rows are gathered), and their means over the
    clients with members: ``summary.json``'s ``audit`` block."""
    rows = {c: torch.tensor(audit_client(loop, c, initial, args, seed), dtype=torch.float64) for c in loop.mine}
    every = loop.comm.rows(list(range(loop.num_clients)), rows, len(COLUMNS))
    by_client = {str(c): {k: float(v) for k, v in zip(COLUMNS, row.tolist())} for c, row in sorted(every.items())}
    out: dict[str, Any] = {}
    for key in COLUMNS[:4]:
        values = [r[key] for r in by_client.values() if not math.isnan(r[key])]
        out[key] = float(np.mean(values)) if values else None
    out.update(shadows=args.shadows, clients=by_client)
    return out
