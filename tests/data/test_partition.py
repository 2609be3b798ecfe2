"""Partitions: sizes, skew, determinism, termination, stratified splits, groups kept whole."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest

from fedhb.data.partition import partition_units, split_client, subsample


def _labels(n=2000, classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n)


def test_iid_gives_every_sample_to_exactly_one_client_in_equal_shares():
    labels = _labels()

    parts = partition_units(labels, None, "iid", 8, 1.0, 1, seed=0)

    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(len(labels)))
    assert {len(p) for p in parts} == {250}


def test_dirichlet_is_seeded_and_skewed():
    labels = _labels()

    a = partition_units(labels, None, "dirichlet", 10, 0.1, 10, seed=1)
    b = partition_units(labels, None, "dirichlet", 10, 0.1, 10, seed=1)
    c = partition_units(labels, None, "dirichlet", 10, 0.1, 10, seed=2)

    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    # Strong label skew: on average a client's most common class holds most of its samples.
    dominance = [np.bincount(labels[p]).max() / len(p) for p in a]
    assert np.mean(dominance) > 0.5
    assert min(len(p) for p in a) >= 10
    assert sorted(np.concatenate(a).tolist()) == list(range(len(labels)))


def test_dirichlet_minimum_size_terminates_fast_with_extreme_skew():
    labels = _labels(20000, 11)

    start = time.perf_counter()
    parts = partition_units(labels, None, "dirichlet", 100, 0.05, 20, seed=0)

    assert time.perf_counter() - start < 5
    assert min(len(p) for p in parts) >= 20
    assert sum(len(p) for p in parts) == 20000


def test_impossible_minimum_names_the_flags():
    with pytest.raises(ValueError, match="--partition.min_samples=50 with 10 clients needs 500"):
        partition_units(_labels(100), None, "dirichlet", 10, 0.1, 50, seed=0)
    with pytest.raises(ValueError, match="--partition.num_clients=200 is more than the 100 samples"):
        partition_units(_labels(100), None, "iid", 200, 0.1, 1, seed=0)


def test_split_client_is_stratified_40_30_30():
    labels = np.repeat(np.arange(4), 100)
    index = np.arange(400)

    split = split_client(index, labels, None, (0.4, 0.3, 0.3), seed=0)

    for part, share in ((split.train, 0.4), (split.val, 0.3), (split.test, 0.3)):
        assert np.array_equal(np.bincount(labels[part], minlength=4), np.full(4, int(share * 100)))
    assert len(np.intersect1d(split.train, split.test)) == 0
    assert len(np.intersect1d(split.train, split.val)) == 0


def test_split_client_keeps_train_and_test_non_empty_for_tiny_clients():
    labels = np.array([0, 1, 2])

    split = split_client(np.arange(3), labels, None, (0.4, 0.3, 0.3), seed=0)

    assert len(split.train) >= 1 and len(split.test) >= 1


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "natural"])
def test_groups_never_straddle_clients_or_splits(scheme):
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 120, 1500)
    labels = rng.integers(0, 3, 1500)

    parts = partition_units(labels, groups, scheme, 6, 0.5, 5, seed=0)
    owner = {}
    for k, p in enumerate(parts):
        for g in np.unique(groups[p]):
            assert owner.setdefault(g, k) == k, f"group {g} on clients {owner[g]} and {k}"
        split = split_client(p, labels, groups, (0.4, 0.3, 0.3), seed=k)
        assert not set(groups[split.train]) & set(groups[split.test])
        assert not set(groups[split.train]) & set(groups[split.val])


def test_natural_without_groups_says_what_is_missing():
    with pytest.raises(ValueError, match="natural needs a group key"):
        partition_units(_labels(50), None, "natural", 5, 0.5, 1, seed=0)


def test_subsample_is_stratified_and_seeded():
    labels = np.repeat(np.arange(5), [100, 200, 300, 50, 2])

    keep = subsample(labels, 0.2, seed=0)

    assert np.array_equal(np.bincount(labels[keep]), [20, 40, 60, 10, 1])
    assert np.array_equal(keep, subsample(labels, 0.2, seed=0))
    assert not np.array_equal(keep, subsample(labels, 0.2, seed=1))


def _small(labels, names=()):
    from fedhb.data.base import Samples

    return Samples(inputs=np.zeros((len(labels), 1)), labels=np.asarray(labels), num_classes=int(max(labels)) + 1,
                   task="multi-class", modality="image", label_names=list(names))


# Labels and partitions computed before the warning existed: the warning must not move a single sample.
_LABELS = [2, 3, 0, 3, 1, 2, 2, 1, 3, 0, 1, 1, 2, 1, 0, 0, 0, 0, 0, 3, 0, 2, 3, 0, 1, 1, 1, 3, 0, 3, 3, 3, 0, 1, 2,
           1, 2, 2, 2, 0]
_DIRICHLET = [[[13, 24, 25], [7, 26], [10, 35, 37]], [[2, 27, 39], [14, 16], [11, 17]],
              [[3, 6, 9, 18, 19, 21, 30, 32, 33, 38], [1, 4, 5, 15, 28, 29, 34], [0, 8, 12, 20, 22, 23, 31, 36]]]
_NATURAL = [[[6, 7, 12, 13, 30, 31], [0, 1, 24, 25], [18, 19, 36, 37]],
            [[2, 3, 26, 27, 32, 33], [14, 15, 38, 39], [8, 9, 20, 21]],
            [[28, 29, 34, 35], [4, 5, 22, 23], [10, 11, 16, 17]]]


@pytest.mark.parametrize(("scheme", "groups", "expected"), [("dirichlet", None, _DIRICHLET),
                                                             ("natural", np.repeat(np.arange(20), 2), _NATURAL)])
def test_the_partition_is_the_same_as_before_the_warning(scheme, groups, expected):
    from fedhb.data.partition import partition_samples

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        splits = partition_samples(_small(_LABELS), scheme, 3, 0.5, 2, (0.4, 0.3, 0.3), 7, groups)

    assert [[s.train.tolist(), s.val.tolist(), s.test.tolist()] for s in splits] == expected


def test_clients_tested_on_classes_they_never_train_on_are_named_in_one_warning():
    from fedhb.data.partition import PartitionWarning, partition_samples

    with pytest.warns(PartitionWarning) as record:
        partition_samples(_small(_LABELS, ["NORM", "MI", "STTC", "CD"]), "dirichlet", 3, 0.5, 2, (0.4, 0.3, 0.3), 7)

    assert len(record) == 1  # once, for all clients
    message = str(record[0].message)
    # _DIRICHLET: client 0 trains on MI only and is tested on STTC; client 1 trains on NORM and CD, tested on MI.
    assert message.startswith("partition: clients 0, 1 of 3 are tested on classes absent from the training split "
                              "(client 0: STTC; client 1: MI)")
    assert "client 2" not in message and "--partition.alpha" in message


@pytest.mark.parametrize(("task", "meta", "warns"), [("segmentation", {}, False), ("retrieval", {}, False),
                                                     ("vqa", {"vqa_mode": "generate"}, False),
                                                     ("vqa", {"vqa_mode": "classify"}, True), ("binary", {}, True)])
def test_classes_absent_from_training_are_named_only_where_the_labels_are_predicted(task, meta, warns):
    # BraTS stratifies on tumour-volume bins, which no model predicts: a bin missing from a client's training split
    # is no reason to warn. Its split of _LABELS is the one above, where clients 0 and 1 miss a class.
    from fedhb.data.base import Samples
    from fedhb.data.partition import PartitionWarning, partition_samples

    samples = Samples(inputs=np.zeros((len(_LABELS), 1)), labels=np.asarray(_LABELS), num_classes=4, task=task,
                      modality="image", meta=meta)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", PartitionWarning)
        splits = partition_samples(samples, "dirichlet", 3, 0.5, 2, (0.4, 0.3, 0.3), 7)

    assert [[s.train.tolist(), s.val.tolist(), s.test.tolist()] for s in splits] == _DIRICHLET
    messages = [str(w.message) for w in record if issubclass(w.category, PartitionWarning)]
    assert any("absent from the training split" in m for m in messages) == warns


def test_an_empty_validation_split_is_named_unless_it_was_asked_for():
    from fedhb.data.partition import PartitionWarning, partition_samples

    labels = [0, 1, 2] * 2  # two clients of three samples, one per class: nothing left for validation
    with pytest.warns(PartitionWarning, match=r"; the val split of clients 0, 1 of 2 is empty\."):
        partition_samples(_small(labels), "iid", 2, 1.0, 1, (0.4, 0.3, 0.3), 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)
        splits = partition_samples(_small([0, 1] * 4), "iid", 2, 1.0, 1, (0.5, 0.0, 0.5), 0)  # val 0: none asked for
    assert [len(s.val) for s in splits] == [0, 0]


def test_a_learnable_partition_does_not_warn():
    from fedhb.data.partition import PartitionWarning, partition_samples

    with warnings.catch_warnings():
        warnings.simplefilter("error", PartitionWarning)
        splits = partition_samples(_small(_labels(600, 3)), "iid", 3, 1.0, 10, (0.4, 0.3, 0.3), 0)

    assert all(len(s.val) for s in splits)
