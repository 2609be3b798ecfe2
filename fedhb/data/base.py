"""The contract between datasets, partitions and models."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Task = Literal["multi-class", "multi-label", "binary"]
Modality = Literal["image", "text", "signal", "audio"]


@dataclass
class Samples:
    """Every sample of a dataset, pooled over its official splits, in memory.

    Attributes:
        inputs: Raw inputs, indexable by sample: a ``uint8`` array ``(N, H, W[, C])`` of images, a list of strings, or
            a float array ``(N, channels, length)`` of signals. The model's encoder turns them into tensors once.
        labels: ``(N,)`` integer class ids, or ``(N, L)`` 0/1 for multi-label tasks.
        num_classes: Number of classes (or labels for multi-label tasks).
        task: ``multi-class``, ``multi-label`` or ``binary`` (two classes, one softmax head).
        modality: ``image``, ``text``, ``signal`` or ``audio``.
        groups: Keys that partitions can keep together, by name (``patient``, ``abstract``, ``site``), each ``(N,)``.
        source_split: ``(N,)`` name of the official split each sample came from.
        label_names: Class names, in id order.
        meta: Anything the encoder needs to know (sampling rate, channel count, ...).
    """

    inputs: Any
    labels: np.ndarray
    num_classes: int
    task: Task
    modality: Modality
    groups: dict[str, np.ndarray] = field(default_factory=dict)
    source_split: np.ndarray | None = None
    label_names: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def stratify_labels(self) -> np.ndarray:
        """One integer per sample to stratify on: the class, or the first positive label of a multi-label task."""
        if self.labels.ndim == 1:
            return self.labels.astype(np.int64)
        positive = self.labels.astype(bool)
        return np.where(positive.any(1), positive.argmax(1), self.labels.shape[1]).astype(np.int64)

    def subset(self, index: np.ndarray) -> Samples:
        """The samples at ``index`` (in that order)."""
        inputs = [self.inputs[i] for i in index] if isinstance(self.inputs, list) else self.inputs[index]
        return Samples(
            inputs=inputs,
            labels=self.labels[index],
            num_classes=self.num_classes,
            task=self.task,
            modality=self.modality,
            groups={k: v[index] for k, v in self.groups.items()},
            source_split=None if self.source_split is None else self.source_split[index],
            label_names=self.label_names,
            meta=self.meta,
        )


class FederatedDataset:
    """Base class of every dataset family: ``load()`` reads the files under ``root`` and returns :class:`Samples`.

    Subclasses live one family per file under ``fedhb/data/`` and are chosen in YAML with ``class_path``.
    """

    #: Key that ``partition.group_by: null`` resolves to (e.g. ``patient``); ``None`` means no grouping.
    default_group_by: str | None = None
    #: Short name used in run summaries and reports.
    name: str = "dataset"
    #: Fraction of the pooled samples kept (stratified, seeded); datasets expose it as ``--data.fraction``.
    fraction: float = 1.0

    def load(self) -> Samples:
        raise NotImplementedError
