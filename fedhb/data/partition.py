"""Splitting pooled samples over clients, then each client's share into train/val/test.

Every partition works on *units*: single samples, or whole groups (a patient, an abstract) when a group key is given,
so that a group never straddles two clients nor a client's train and test split. A unit's label is the most common
label of its samples.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from fedhb import seeds
from fedhb.data.base import Samples


@dataclass
class ClientSplit:
    """Sample indices (into the pooled :class:`Samples`) of one client."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    @property
    def num_train(self) -> int:
        return len(self.train)


def _units(labels: np.ndarray, groups: np.ndarray | None) -> tuple[list[np.ndarray], np.ndarray]:
    """Sample indices of each unit, and each unit's label."""
    if groups is None:
        return [np.array([i]) for i in range(len(labels))], labels.copy()
    keys, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=len(keys)))[:-1]
    members = np.split(order, bounds)
    unit_labels = np.array([np.bincount(labels[m]).argmax() for m in members])
    return members, unit_labels


def subsample(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a stratified, seeded ``fraction`` of the samples (at least one per class), sorted."""
    if fraction >= 1:
        return np.arange(len(labels))
    rng = seeds.rng(seed, seeds.Stream.SUBSAMPLE)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = max(1, int(round(fraction * len(idx))))
        keep.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(keep))


def _sizes(unit_index: list[list[int]], members: list[np.ndarray]) -> np.ndarray:
    return np.array([sum(len(members[u]) for u in units) for units in unit_index])


def _fill_small_clients(assign: list[list[int]], members: list[np.ndarray], min_samples: int,
                        rng: np.random.Generator) -> None:
    """Move units from the largest clients to those below ``min_samples``; always terminates.

    Each move takes one unit from the currently largest client and only if that client stays above the minimum, so the
    total number of moves is bounded by the number of units.
    """
    sizes = _sizes(assign, members)
    total = sizes.sum()
    if total < min_samples * len(assign):
        raise ValueError(
            f"--partition.min_samples={min_samples} with {len(assign)} clients needs {min_samples * len(assign)} "
            f"samples but the data has {total}; lower --partition.num_clients or --partition.min_samples, "
            f"or raise --data.fraction"
        )
    for _ in range(sum(len(a) for a in assign)):
        small = np.flatnonzero(sizes < min_samples)
        if len(small) == 0:
            return
        needy = small[np.argmin(sizes[small])]
        donor = int(np.argmax(sizes))
        k = int(rng.integers(len(assign[donor])))
        if sizes[donor] - len(members[assign[donor][k]]) < min_samples:
            # Only with groups of unequal size: look for a unit the donor can spare.
            candidates = [k for k, u in enumerate(assign[donor]) if sizes[donor] - len(members[u]) >= min_samples]
            if not candidates:
                break
            k = candidates[int(rng.integers(len(candidates)))]
        unit = assign[donor].pop(k)
        assign[needy].append(unit)
        sizes[donor] -= len(members[unit])
        sizes[needy] += len(members[unit])
    if (sizes < min_samples).any():
        raise ValueError(
            f"could not give every client --partition.min_samples={min_samples} samples (groups are too large or too "
            f"few: smallest client has {sizes.min()}); lower --partition.min_samples or --partition.num_clients"
        )


def partition_units(
    labels: np.ndarray,
    groups: np.ndarray | None,
    scheme: str,
    num_clients: int,
    alpha: float,
    min_samples: int,
    seed: int,
) -> list[np.ndarray]:
    """Sample indices of each client.

    Args:
        labels: ``(N,)`` integer labels used for label skew.
        groups: ``(N,)`` group key or ``None``; groups are never split.
        scheme: ``iid``, ``dirichlet`` or ``natural`` (one client per group, groups dealt out by size when there are
            more groups than clients).
        num_clients: Number of clients.
        alpha: Dirichlet concentration.
        min_samples: Smallest client size.
        seed: Seed; the same arguments give the same partition.
    """
    members, unit_labels = _units(labels, groups)
    num_units = len(members)
    if num_units < num_clients:
        what = "groups" if groups is not None else "samples"
        raise ValueError(f"--partition.num_clients={num_clients} is more than the {num_units} {what} in the data")
    rng = seeds.rng(seed, seeds.Stream.PARTITION)
    assign: list[list[int]] = [[] for _ in range(num_clients)]
    if scheme == "iid":
        for k, u in enumerate(rng.permutation(num_units)):
            assign[k % num_clients].append(int(u))
    elif scheme == "dirichlet":
        for c in np.unique(unit_labels):
            units = rng.permutation(np.flatnonzero(unit_labels == c))
            share = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(share)[:-1] * len(units)).astype(int)
            for k, part in enumerate(np.split(units, cuts)):
                assign[k].extend(int(u) for u in part)
    elif scheme == "natural":
        if groups is None:
            raise ValueError("--partition.scheme natural needs a group key (--partition.group_by, e.g. patient or "
                             "site); this dataset has none")
        # Largest groups first, each to the client with the fewest samples so far: balanced, deterministic.
        load = np.zeros(num_clients, dtype=np.int64)
        for u in sorted(range(num_units), key=lambda u: (-len(members[u]), u)):
            k = int(np.argmin(load))
            assign[k].append(u)
            load[k] += len(members[u])
    else:
        raise ValueError(f"--partition.scheme must be one of iid, dirichlet, natural; got {scheme!r}")
    _fill_small_clients(assign, members, min_samples, rng)
    return [np.sort(np.concatenate([members[u] for u in units])) if units else np.array([], dtype=np.int64)
            for units in assign]


def split_client(
    index: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray | None,
    fractions: tuple[float, float, float],
    seed: int,
) -> ClientSplit:
    """Split one client's samples into train/val/test, stratified by label, groups kept whole.

    Each class's units are shuffled and cut at the fractions (rounded so that train and test are non-empty whenever
    the client has at least two units).
    """
    sub_groups = None if groups is None else groups[index]
    members, unit_labels = _units(labels[index], sub_groups)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    carry = 0.0
    for c in np.unique(unit_labels):
        units = rng.permutation(np.flatnonzero(unit_labels == c))
        n = len(units)
        # Carry rounding between classes so that small classes do not all land in train.
        exact_train = fractions[0] * n + carry
        n_train = int(np.floor(exact_train + 0.5))
        carry = exact_train - n_train
        n_val = int(np.floor(fractions[1] * n + 0.5))
        n_val = min(n_val, n - n_train)
        parts[0].extend(units[:n_train])
        parts[1].extend(units[n_train:n_train + n_val])
        parts[2].extend(units[n_train + n_val:])
    total = len(members)
    if total >= 2:
        # Guarantee non-empty train and test.
        for dst, src_order in ((0, (2, 1)), (2, (1, 0))):
            if not parts[dst]:
                for src in src_order:
                    if len(parts[src]) > (1 if src in (0, 2) else 0):
                        parts[dst].append(parts[src].pop())
                        break
    out = []
    for p in parts:
        idx = np.concatenate([members[u] for u in p]) if p else np.array([], dtype=np.int64)
        out.append(np.sort(index[idx]))
    return ClientSplit(train=out[0], val=out[1], test=out[2])


def class_counts(labels: np.ndarray, index: np.ndarray, num_classes: int) -> list[int]:
    if labels.ndim == 2:
        return labels[index].sum(0).astype(int).tolist()
    return np.bincount(labels[index], minlength=num_classes).astype(int).tolist()


def partition_samples(
    samples: Samples,
    scheme: str,
    num_clients: int,
    alpha: float,
    min_samples: int,
    split: tuple[float, float, float],
    seed: int,
    group_key: np.ndarray | None = None,
    natural_key: np.ndarray | None = None,
) -> list[ClientSplit]:
    """Partition ``samples`` over clients and split each client's share; see :func:`partition_units`.

    ``natural_key`` (``natural`` scheme only) gives the clients when they are not the groups: each of its values (a
    site) is one client, while ``group_key`` (a patient) still keeps samples together in each client's split. Every
    group must then lie within one value of ``natural_key``, or a patient would be on two clients.

    Warns (one :class:`PartitionWarning` naming the clients) when the result cannot be learned or validated as asked:
    see :func:`unlearnable_clients`. The partition itself is the same with or without the warning.
    """
    strat = samples.stratify_labels
    if scheme == "natural" and natural_key is not None:
        if group_key is not None:
            _check_nested(group_key, natural_key)
        shares = partition_units(strat, natural_key, scheme, num_clients, alpha, min_samples, seed)
    else:
        shares = partition_units(strat, group_key, scheme, num_clients, alpha, min_samples, seed)
    splits = [split_client(idx, strat, group_key, split, seeds.derive(seed, seeds.Stream.SPLIT, k))
              for k, idx in enumerate(shares)]
    problem = unlearnable_clients(samples, splits, split)
    if problem is not None:
        warnings.warn(problem, PartitionWarning, stacklevel=2)
    return splits


def _check_nested(groups: np.ndarray, natural: np.ndarray) -> None:
    """Refuse a group (a patient) that spans two values of the natural key (two sites)."""
    _, g = np.unique(groups, return_inverse=True)
    _, n = np.unique(natural, return_inverse=True)
    pairs = np.unique(np.stack([g, n]), axis=1)
    spanning = int(len(pairs[0]) - len(np.unique(pairs[0])))
    if spanning:
        raise ValueError(f"--partition.natural_by: {spanning} groups of --partition.group_by lie in more than one of "
                         f"its values, so they would be on two clients; group by a coarser key or choose another "
                         f"natural key")


def drop_modality(samples: Samples, splits: list[ClientSplit], modality: str, fraction: float, level: str,
                  seed: int) -> tuple[Samples, dict[str, int]]:
    """``samples`` with ``modality`` removed from a seeded ``fraction`` of the clients or of each client's samples.

    ``level="client"``: ``round(fraction * clients)`` clients, drawn from the stream ``[seed, MISSING]``, lose the
    modality in every sample (a hospital without reports). ``level="sample"``: each client ``k`` loses it in
    ``round(fraction * n_k)`` of its ``n_k`` samples that hold it alongside another modality, drawn from
    ``[seed, MISSING, k]``. Both depend on the seed and the partition only, never on the process. A sample never
    loses its last modality: it keeps it (counted under ``kept_last``).

    Returns:
        The samples with their presence mask updated (inputs shared), and counts: ``clients`` (clients that lost it
        in every sample), ``removed`` (samples that lost it), ``kept_last``.
    """
    channels = getattr(samples.inputs, "drop_channels", None)
    if samples.modality != "multimodal" and channels is not None:  # channels of one modality (BraTS's sequences)
        return channels(samples, splits, modality, fraction, level, seed)
    if samples.modality != "multimodal" or modality not in samples.modalities:
        raise ValueError(f"--partition.missing_modality {modality!r}: the data carries {list(samples.modalities)}; "
                         f"a modality can only be removed from multimodal data that carries it")
    if level not in ("client", "sample"):
        raise ValueError(f"--partition.missing_level must be client or sample, got {level!r}")
    mask = samples.presence(modality).copy()
    others = np.zeros(len(samples), dtype=bool)
    for m in samples.modalities:
        if m != modality:
            others |= samples.presence(m)
    removed = kept = 0
    chosen: list[int] = []
    if level == "client":
        k = int(round(fraction * len(splits)))
        chosen = sorted(int(c) for c in seeds.rng(seed, seeds.Stream.MISSING).choice(len(splits), k, replace=False))
        for c in chosen:
            index = np.concatenate([splits[c].train, splits[c].val, splits[c].test])
            drop = index[mask[index] & others[index]]
            kept += int((mask[index] & ~others[index]).sum())
            mask[drop] = False
            removed += len(drop)
    else:
        for c, s in enumerate(splits):
            index = np.sort(np.concatenate([s.train, s.val, s.test]))
            eligible = index[mask[index] & others[index]]
            k = int(round(fraction * len(eligible)))
            drop = seeds.rng(seed, seeds.Stream.MISSING, c).choice(eligible, k, replace=False) if k else eligible[:0]
            mask[drop] = False
            removed += len(drop)
    return samples.with_presence({modality: mask}), {"clients": len(chosen), "removed": removed, "kept_last": kept}


def client_modalities(samples: Samples, split: ClientSplit) -> list[str]:
    """The modalities a client holds: those present in at least one of its samples, in fusion order."""
    index = np.concatenate([split.train, split.val, split.test])
    return [m for m in samples.modalities if samples.presence(m)[index].any()]


class PartitionWarning(UserWarning):
    """A partition that runs but measures little: clients tested on classes they never train on, or empty splits."""


def _clients(ids: list[int], total: int, limit: int = 8) -> str:
    """``client 3 of 20`` or ``clients 0, 1, 2 of 20`` (the first ``limit`` of them)."""
    shown = ", ".join(map(str, ids[:limit])) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")
    return f"client{'s' if len(ids) > 1 else ''} {shown} of {total}"


def labels_are_targets(samples: Samples) -> bool:
    """Whether the samples' labels are what the model predicts (classification, yes/no VQA) rather than only what
    partitions stratify on (segmentation, retrieval, open-answer VQA)."""
    if samples.task == "vqa":
        return samples.meta.get("vqa_mode") == "classify"
    return samples.task in ("multi-class", "multi-label", "binary")


def unlearnable_clients(samples: Samples, splits: list[ClientSplit],
                        fractions: tuple[float, float, float] = (0.4, 0.3, 0.3)) -> str | None:
    """What is wrong with a partition, in one line, or ``None``.

    Two things are reported: clients whose test split holds classes absent from their training split (their own
    model cannot have learned those samples), and splits left empty although their fraction (``--partition.split``)
    is above zero (a validation split of 0 is a choice; an empty one at 0.3 means too few samples or groups). The
    first only where the labels are what the model predicts: a segmentation set's tumour-volume bins, a retrieval
    set's strata or an open VQA set's answer types are only what the partition stratifies on.
    """
    names = samples.label_names or [f"class {c}" for c in range(samples.num_classes)]
    unseen: dict[int, list[str]] = {}
    empty: dict[str, list[int]] = {}
    for k, s in enumerate(splits):
        train = class_counts(samples.labels, s.train, samples.num_classes)
        test = class_counts(samples.labels, s.test, samples.num_classes)
        missing = [names[c] for c in range(samples.num_classes) if test[c] > 0 and train[c] == 0]
        if missing and labels_are_targets(samples):
            unseen[k] = missing
        for name, fraction in zip(("train", "val", "test"), fractions):
            if fraction > 0 and len(getattr(s, name)) == 0:
                empty.setdefault(name, []).append(k)
    parts = []
    if unseen:
        ids = sorted(unseen)
        detail = "; ".join(f"client {k}: {', '.join(unseen[k])}" for k in ids[:4]) + ("; ..." if len(ids) > 4 else "")
        verb = "are" if len(ids) > 1 else "is"
        parts.append(f"{_clients(ids, len(splits))} {verb} tested on classes absent from the training split ({detail})")
    for name, ids in empty.items():
        parts.append(f"the {name} split of {_clients(ids, len(splits))} is empty")
    if not parts:
        return None
    return ("partition: " + "; ".join(parts) + ". Their scores measure little: give each client more samples or "
            "groups (a larger --data.fraction, fewer --partition.num_clients) or a milder label skew (a larger "
            "--partition.alpha); partition.json lists every client's class counts")
