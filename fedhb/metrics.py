"""Classification metrics (torchmetrics) and their compact per-client form for collectives; used by
:class:`fedhb.tasks.classification.Classification`."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ClientScores:
    """One client's test scores; ``n`` is its number of test samples."""

    acc: float
    f1: float
    auroc: float
    n: int

    width = 4

    def as_tensor(self) -> Tensor:
        return torch.tensor([self.acc, self.f1, self.auroc, float(self.n)], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, row: Tensor) -> ClientScores:
        acc, f1, auroc, n = (float(x) for x in row)
        return cls(acc, f1, auroc, int(n))

    @classmethod
    def empty(cls) -> Tensor:
        return cls(math.nan, math.nan, math.nan, 0).as_tensor()


def score_logits(logits: Tensor, labels: Tensor, task: str, num_classes: int) -> ClientScores:
    """Accuracy (micro), macro F1 and macro AUROC of ``logits`` against ``labels``.

    AUROC is NaN when the test split lacks a class it would need (torchmetrics would warn and score it 0).
    """
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_auroc,
        multiclass_f1_score,
        multilabel_accuracy,
        multilabel_auroc,
        multilabel_f1_score,
    )

    n = len(labels)
    if n == 0:
        return ClientScores(math.nan, math.nan, math.nan, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if task == "multi-label":
            labels = labels.long()
            acc = multilabel_accuracy(logits, labels, num_labels=num_classes, average="micro")
            f1 = multilabel_f1_score(logits, labels, num_labels=num_classes, average="macro")
            has_both = ((labels.sum(0) > 0) & (labels.sum(0) < n)).all()
            auroc = multilabel_auroc(logits, labels, num_labels=num_classes) if has_both else torch.tensor(math.nan)
        else:
            acc = multiclass_accuracy(logits, labels, num_classes=num_classes, average="micro")
            f1 = multiclass_f1_score(logits, labels, num_classes=num_classes, average="macro")
            present = torch.bincount(labels, minlength=num_classes) > 0
            if present.sum() >= 2:
                # Macro AUROC over the classes present in this split (one-vs-rest needs positives and negatives).
                per_class = multiclass_auroc(logits.softmax(1), labels, num_classes=num_classes, average="none")
                auroc = per_class[present].mean()
            else:
                auroc = torch.tensor(math.nan)
    return ClientScores(float(acc), float(f1), float(auroc), n)


def confusion_scores(confusion: Tensor) -> tuple[float, float]:
    """Accuracy and macro F1 (over classes that occur or are predicted) from a confusion matrix."""
    total = confusion.sum()
    if total == 0:
        return math.nan, math.nan
    tp = confusion.diag()
    acc = float(tp.sum() / total)
    support, predicted = confusion.sum(1), confusion.sum(0)
    denom = support + predicted
    seen = denom > 0
    f1 = float((2 * tp[seen] / denom[seen]).mean())
    return acc, f1


def confusion_matrix(logits: Tensor, labels: Tensor, task: str, num_classes: int) -> Tensor:
    """``(C, C)`` counts, true class by row (multi-label: per-label TP on the diagonal is not defined; use argmax of the
    first positive label as the class, which keeps global accuracy comparable)."""
    if task == "multi-label":
        pred = (logits > 0).long()
        labels = labels.long()
        cm = torch.zeros(num_classes, num_classes, dtype=torch.float64)
        for j in range(num_classes):
            cm[j, j] += float(((pred[:, j] == 1) & (labels[:, j] == 1)).sum())
            cm[j, (j + 1) % num_classes] += float(((pred[:, j] == 0) & (labels[:, j] == 1)).sum())
        return cm
    pred = logits.argmax(1)
    idx = labels.long() * num_classes + pred
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes).double()
