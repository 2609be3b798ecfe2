"""The contract between datasets, partitions and models."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

#: What the samples are for: classification kinds, or another task of :data:`fedhb.tasks.TASKS`.
Task = Literal["multi-class", "multi-label", "binary", "retrieval", "segmentation", "vqa"]
Modality = Literal["image", "text", "signal", "audio", "tabular", "multimodal"]
#: The modalities an encoder exists for (``multimodal`` is a combination of them).
MODALITIES = ("image", "text", "signal", "audio", "tabular")


@dataclass
class Samples:
    """Every sample of a dataset, pooled over its official splits, in memory.

    A multimodal dataset (``modality="multimodal"``) gives ``inputs`` as ``{modality: raw inputs}`` (each indexable
    by sample as below) and says in ``present`` which samples hold each modality: an absent entry keeps a placeholder
    of the right type (an empty string, zeros) so that arrays stay rectangular, and the model never reads it (its
    encoder skips the sample and the fusion step masks it). :meth:`view` gives one modality as unimodal samples, the
    form every encoder prepares.

    Attributes:
        inputs: Raw inputs, indexable by sample: a ``uint8`` array ``(N, H, W[, C])`` of images, a list of strings, a
            float array ``(N, channels, length)`` of signals or ``(N, features)`` of tabular features; or, for
            ``multimodal``, ``{modality: such inputs}``. The model's encoders turn them into tensors once.
        labels: ``(N,)`` integer class ids, or ``(N, L)`` 0/1 for multi-label tasks.
        num_classes: Number of classes (or labels for multi-label tasks).
        task: ``multi-class``, ``multi-label`` or ``binary`` (two classes, one softmax head).
        modality: ``image``, ``text``, ``signal``, ``audio``, ``tabular`` or ``multimodal``.
        groups: Keys that partitions can keep together, by name (``patient``, ``abstract``, ``site``), each ``(N,)``.
        source_split: ``(N,)`` name of the official split each sample came from.
        label_names: Class names, in id order.
        meta: Anything the encoder needs to know (sampling rate, channel count, ...); for ``multimodal``, a modality's
            own entries may sit under its name (``meta["tabular"] = {"feature_names": ...}``), and :meth:`view` merges
            them in.
        present: ``{modality: (N,) bool}``, which samples hold each modality; a modality without an entry is present
            in every sample (unimodal datasets leave it empty).
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
    present: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        multimodal = isinstance(self.inputs, Mapping)
        if multimodal != (self.modality == "multimodal"):
            raise ValueError("Samples: inputs must be a {modality: inputs} mapping exactly when modality is "
                             f"'multimodal' (got modality {self.modality!r} and {type(self.inputs).__name__} inputs)")
        if multimodal:
            unknown = [m for m in self.inputs if m not in MODALITIES]
            if unknown or not self.inputs:
                raise ValueError(f"Samples: multimodal inputs must be keyed by modalities of {list(MODALITIES)}, "
                                 f"got {list(self.inputs)}")
        extra = [m for m in self.present if m not in self.modalities]
        if extra:
            raise ValueError(f"Samples: presence masks for {extra}, which the samples do not carry")
        for m, mask in self.present.items():
            if mask.dtype != bool or mask.shape != (len(self.labels),):
                raise ValueError(f"Samples: present[{m!r}] must be a ({len(self.labels)},) bool array, got "
                                 f"{mask.dtype} {mask.shape}")
        if multimodal and self.present and len(self.present) == len(self.modalities):
            none = int((~np.any(np.stack(list(self.present.values())), axis=0)).sum())
            if none:
                raise ValueError(f"Samples: {none} samples hold none of the modalities {list(self.modalities)}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities the samples carry, in the order their features are fused."""
        return tuple(self.inputs) if isinstance(self.inputs, Mapping) else (self.modality,)

    def presence(self, modality: str) -> np.ndarray:
        """``(N,)`` bool: which samples hold ``modality``."""
        if modality not in self.modalities:
            raise KeyError(f"the samples carry {list(self.modalities)}, not {modality!r}")
        mask = self.present.get(modality)
        return np.ones(len(self), dtype=bool) if mask is None else mask

    def view(self, modality: str) -> Samples:
        """One modality of the samples as unimodal :class:`Samples` (every sample, present or not), with that
        modality's own ``meta`` entries merged in."""
        if not isinstance(self.inputs, Mapping):
            if modality != self.modality:
                raise KeyError(f"the samples carry {self.modality!r}, not {modality!r}")
            return self
        if modality not in self.inputs:
            raise KeyError(f"the samples carry {list(self.inputs)}, not {modality!r}")
        own = self.meta.get(modality)
        meta = {k: v for k, v in self.meta.items() if k not in self.inputs}
        meta.update(own if isinstance(own, Mapping) else {})
        return Samples(inputs=self.inputs[modality], labels=self.labels, num_classes=self.num_classes,
                       task=self.task, modality=modality, groups=self.groups,  # type: ignore[arg-type]
                       source_split=self.source_split, label_names=self.label_names, meta=meta)

    @property
    def stratify_labels(self) -> np.ndarray:
        """One integer per sample to stratify on: the class, or the first positive label of a multi-label task."""
        if self.labels.ndim == 1:
            return self.labels.astype(np.int64)
        positive = self.labels.astype(bool)
        return np.where(positive.any(1), positive.argmax(1), self.labels.shape[1]).astype(np.int64)

    def subset(self, index: np.ndarray) -> Samples:
        """The samples at ``index`` (in that order)."""
        def take(inputs: Any) -> Any:
            return [inputs[i] for i in index] if isinstance(inputs, list) else inputs[index]

        inputs = ({m: take(v) for m, v in self.inputs.items()} if isinstance(self.inputs, Mapping)
                  else take(self.inputs))
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
            present={m: v[index] for m, v in self.present.items()},
        )

    def with_presence(self, present: Mapping[str, np.ndarray]) -> Samples:
        """The same samples with the presence masks of ``present`` replacing their own (inputs are shared)."""
        import dataclasses

        return dataclasses.replace(self, present={**self.present, **present})


class FederatedDataset:
    """Base class of every dataset family: ``load()`` reads the files under ``root`` and returns :class:`Samples`.

    Subclasses live one family per file under ``fedhb/data/`` and are chosen in YAML with ``class_path``.
    """

    #: Key that ``partition.group_by: null`` resolves to (e.g. ``patient``); ``None`` means no grouping.
    default_group_by: str | None = None
    #: Key whose values become the clients under ``partition.scheme: natural`` when it is not the group key (PadChest's
    #: ``site``: one client per scanner manufacturer, each patient whole on one of them); ``None``: the group key.
    default_natural_by: str | None = None
    #: Short name used in run summaries and reports.
    name: str = "dataset"
    #: Fraction of the pooled samples kept (stratified, seeded); datasets expose it as ``--data.fraction``.
    fraction: float = 1.0

    def load(self) -> Samples:
        raise NotImplementedError
