"""Classification: multi-class, binary (two classes, one softmax head) and multi-label."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from fedhb.record import Field, classification_fields
from fedhb.tasks.base import Task

if TYPE_CHECKING:
    from torch import Tensor, nn

    from fedhb.data.base import Samples

KINDS = ("multi-class", "binary", "multi-label")


class Classification(Task):
    """A linear head on the fused features; cross-entropy (multi-class, binary) or per-label BCE (multi-label).

    Per-client scores are accuracy (micro), macro F1 and macro AUROC (torchmetrics); a round reports their means over
    the clients that have test samples, the worst client's accuracy and every client's accuracy. The global model is
    scored from the confusion matrix summed over the clients' test splits.

    Args:
        kind: ``multi-class``, ``binary`` or ``multi-label``.
        num_classes: Classes (labels, for multi-label).
    """

    score_names = ("acc", "f1", "auroc")
    selection_score = "acc"

    def __init__(self, kind: str, num_classes: int) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown classification task {kind!r}; expected one of {KINDS}")
        self.kind, self.num_classes = kind, num_classes

    @classmethod
    def from_samples(cls, samples: Samples) -> Classification:
        return cls(samples.task, samples.num_classes)

    @property
    def fields(self) -> tuple[Field, ...]:  # type: ignore[override]
        return classification_fields()

    def head(self, in_features: int, dropout: float) -> nn.Module:
        from torch import nn

        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, self.num_classes))

    def loss(self, output: Tensor, targets: Tensor) -> Tensor:
        import torch.nn.functional as F

        if self.kind == "multi-label":
            return F.binary_cross_entropy_with_logits(output, targets.float())
        return F.cross_entropy(output, targets)

    def member_scores(self, output: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-entropy and LiRA's logit-scaled confidence of the true class (:func:`~fedhb.privacy.audit.confidence`;
        multi-label: the loss and its negative)."""
        from fedhb.privacy.audit import confidence

        return confidence(output, targets, self.kind)

    def score(self, output: Tensor, targets: Tensor) -> Tensor:
        from fedhb.metrics import score_logits

        return score_logits(output, targets, self.kind, self.num_classes).as_tensor()

    def reduce(self, scores: dict[int, Tensor]) -> dict[str, Any]:
        import numpy as np

        from fedhb.metrics import ClientScores

        clients = {c: ClientScores.from_tensor(r) for c, r in scores.items()}
        valid = {c: s for c, s in clients.items() if s.n > 0}
        acc = [s.acc for s in valid.values()]
        return {
            "personalized_acc": float(np.mean(acc)) if acc else math.nan,
            "worst_client_acc": float(np.min(acc)) if acc else math.nan,
            "personalized_f1": float(np.nanmean([s.f1 for s in valid.values()])) if acc else math.nan,
            "personalized_auroc": _nanmean([s.auroc for s in valid.values()]),
            "client_acc": {str(c): round(s.acc, 6) for c, s in sorted(clients.items())},
        }

    def global_stats(self, output: Tensor, targets: Tensor) -> Tensor:
        from fedhb.metrics import confusion_matrix

        return confusion_matrix(output, targets, self.kind, self.num_classes)

    def global_metrics(self, stats: Tensor | None) -> dict[str, Any]:
        from fedhb.metrics import confusion_scores

        if stats is None:
            return {"global_acc": None, "global_f1": None}
        acc, f1 = confusion_scores(stats)
        return {"global_acc": acc, "global_f1": f1}


def _nanmean(values: list[float]) -> float:
    import numpy as np

    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan
