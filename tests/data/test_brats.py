"""BraTS: the released GLI layout read exactly, preprocessing checked against a by-hand reference, the on-disk cache,
sites, volume bins, missing sequences, and malformed files refused naming the file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from fedhb import seeds
from fedhb.data import BraTS
from fedhb.data.brats import SEQUENCES, Volumes
from fedhb.data.fixtures_brats import case_id, write_brats_fixture
from fedhb.data.partition import ClientSplit, drop_modality, partition_samples


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five patients (16^3), patient 2 scanned twice (``-000``, ``-001``), over two sites."""
    return write_brats_fixture(tmp_path_factory.mktemp("brats"), cases=5, size=16, seed=3, sites=2, timepoints=(2,))


def load(root: Path, tmp: Path, **kwargs) -> object:
    return BraTS(root=str(root), size=16, patch=16, cache=str(tmp / "cache"), **kwargs).load()


def zscore(x: np.ndarray) -> np.ndarray:
    """Each sequence z-scored over its non-zero voxels (population std), zero elsewhere."""
    out = np.zeros_like(x, dtype=np.float64)
    m = x != 0
    out[m] = (x[m] - x[m].mean()) / x[m].std()
    return out


def test_the_fixture_is_read_in_the_released_layout_and_preprocessed_as_by_hand(root, tmp_path):
    import nibabel as nib

    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert names == [case_id(0), case_id(1), case_id(2), case_id(2, 1), case_id(3), case_id(4)]
    assert sorted(p.name for p in (root / case_id(1)).iterdir()) == [
        f"{case_id(1)}-{s}.nii.gz" for s in ("seg", "t1c", "t1n", "t2f", "t2w")]

    samples = load(root, tmp_path, sites=str(root / "sites.csv"))

    assert samples.task == "segmentation" and samples.modality == "image" and len(samples) == 6
    assert samples.groups["case"].tolist() == names
    assert samples.groups["patient"].tolist() == ["00000", "00001", "00002", "00002", "00003", "00004"]
    assert samples.groups["site"].tolist() == ["site0", "site1", "site0", "site0", "site1", "site0"]
    tensors = samples.inputs.tensors()
    assert tensors["volume"].shape == (6, 4, 16, 16, 16) and tensors["volume"].dtype.is_floating_point
    assert tensors["seg"].shape == (6, 16, 16, 16) and bool(tensors["present"].all())
    for i, name in enumerate(names):  # the 16^3 brain fits the cube: the window is the identity
        seg = np.asarray(nib.load(str(root / name / f"{name}-seg.nii.gz")).dataobj)
        assert np.array_equal(tensors["seg"][i].numpy(), seg)
        for c, seq in enumerate(SEQUENCES):
            raw = np.asarray(nib.load(str(root / name / f"{name}-{seq}.nii.gz")).dataobj, dtype=np.float64)
            np.testing.assert_allclose(tensors["volume"][i, c].numpy(), zscore(raw), atol=4e-3)  # float16
    # Labels: whole-tumour volume (mL at 1 mm) in 4 quantile bins.
    wt = np.array([(tensors["seg"][i].numpy() > 0).sum() / 1000 for i in range(6)])
    expected = np.searchsorted(np.quantile(wt, [0.25, 0.5, 0.75]), wt, side="right")
    assert samples.labels.tolist() == expected.tolist() and samples.num_classes == 4


def test_the_cache_is_memory_mapped_reused_and_subsets_keep_their_rows(root, tmp_path, monkeypatch):
    import fedhb.data.brats as brats

    samples = load(root, tmp_path)
    entry = samples.inputs.cache
    assert isinstance(np.load(entry / "volume.npy", mmap_mode="r"), np.memmap)

    def fail(*args, **kwargs):
        raise AssertionError("preprocessed again")

    monkeypatch.setattr(brats, "preprocess_case", fail)
    again = load(root, tmp_path)  # a cache hit: nothing is read but the metadata
    full = again.inputs.tensors()
    part = again.subset(np.array([4, 1])).inputs.tensors()
    assert part["case"].tolist() == [4, 1]
    assert (part["volume"].numpy() == full["volume"][[4, 1]].numpy()).all()
    assert (part["seg"].numpy() == full["seg"][[4, 1]].numpy()).all()


def test_sites_come_from_the_csv_and_make_the_natural_partition(root, tmp_path):
    samples = load(root, tmp_path, sites=str(root / "sites.csv"))
    splits = partition_samples(samples, "natural", 2, 1.0, 1, (0.5, 0.0, 0.5), 0, samples.groups["patient"],
                               samples.groups["site"])
    held = [sorted(set(samples.groups["site"][np.concatenate([s.train, s.test])])) for s in splits]
    assert sorted(held) == [["site0"], ["site1"]]

    bad = tmp_path / "sites.csv"
    bad.write_text("Subject_ID,Partition_ID\n" + "".join(f"{k:05d},1\n" for k in (0, 1, 2, 3)))  # patients
    with pytest.raises(ValueError, match=r"sites.csv: 1 cases have no site \(e.g. BraTS-GLI-00004-000\)"):
        load(root, tmp_path, sites=str(bad))


def test_sequences_removed_from_a_seeded_share_of_the_clients_never_the_last(root, tmp_path):
    samples = load(root, tmp_path)
    splits = [ClientSplit(np.array([0, 1]), np.array([], dtype=np.int64), np.array([2])),
              ClientSplit(np.array([3, 4]), np.array([], dtype=np.int64), np.array([5]))]

    out, counts = drop_modality(samples, splits, "t2f,t1c", 0.5, "client", seed=11)

    [chosen] = seeds.rng(11, seeds.Stream.MISSING).choice(2, 1, replace=False).tolist()
    present = out.inputs.present
    lost = np.concatenate([splits[chosen].train, splits[chosen].test])
    assert not present[lost][:, [0, 2]].any() and present[lost][:, [1, 3]].all()
    assert np.delete(present, lost, axis=0).all() and counts == {"clients": 1, "removed": 6, "kept_last": 0}
    assert out.inputs.tensors()["present"].tolist() == present.tolist()
    last, _ = drop_modality(out.subset(lost).with_presence({}), [ClientSplit(np.arange(3), np.arange(0),
                                                                             np.arange(0))],
                            "t1n,t2w", 1.0, "client", seed=0)
    assert last.inputs.present.sum(1).tolist() == [1, 1, 1]  # t2w kept: a case never loses its last sequence
    with pytest.raises(ValueError, match="BraTS's sequences are t1c, t1n, t2f, t2w"):
        drop_modality(samples, splits, "flair", 0.5, "client", seed=0)


def test_missing_and_malformed_files_are_refused_naming_the_file(tmp_path):
    import nibabel as nib

    root = write_brats_fixture(tmp_path / "data", cases=2, size=16, seed=0, missing={1: ("t2f",)})
    missing = root / case_id(1) / f"{case_id(1)}-t2f.nii.gz"
    with pytest.raises(FileNotFoundError, match=f"{missing}: missing sequence file.*--data.allow_missing true"):
        load(root, tmp_path)
    samples = load(root, tmp_path, allow_missing=True)
    assert samples.inputs.present.tolist() == [[True] * 4, [True, True, False, True]]
    assert not samples.inputs.tensors()["volume"][1, 2].any()

    def write(path: Path, array: np.ndarray) -> None:
        nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))

    t1c = root / case_id(0) / f"{case_id(0)}-t1c.nii.gz"
    write(t1c, np.zeros((16, 16, 15), dtype=np.int16))
    with pytest.raises(ValueError, match=rf"{t1c}: shape \(16, 16, 15\), but the case's seg"):
        load(root, tmp_path / "a", allow_missing=True)
    write(t1c, np.zeros((16, 16, 16, 2), dtype=np.int16))
    with pytest.raises(ValueError, match=rf"{t1c}: shape \(16, 16, 16, 2\); a BraTS volume is 3-D"):
        load(root, tmp_path / "b", allow_missing=True)
    shutil.copy(root / case_id(1) / f"{case_id(1)}-t1c.nii.gz", t1c)
    seg = root / case_id(0) / f"{case_id(0)}-seg.nii.gz"
    labels = np.asarray(nib.load(str(seg)).dataobj).copy()
    labels[0, 0, 0] = 7
    write(seg, labels)
    with pytest.raises(ValueError, match=rf"{seg}: unknown labels \[7\]"):
        load(root, tmp_path / "c", allow_missing=True)
    labels[labels == 3] = 4  # BraTS 2021's enhancing tumour
    labels[0, 0, 0] = 0
    write(seg, labels)
    write(root / case_id(1) / f"{case_id(1)}-seg.nii.gz", np.where(labels == 4, 1, labels).astype(np.uint8))
    with pytest.raises(ValueError, match=rf"{seg}: label 4 and no case with label 3: these are BraTS 2021 labels"):
        load(root, tmp_path / "d", allow_missing=True)


def test_a_coarser_grid_is_resampled_to_the_spacing(tmp_path):
    import nibabel as nib

    root = write_brats_fixture(tmp_path / "data", cases=1, size=8, seed=1)
    folder = root / case_id(0)
    for path in folder.iterdir():  # the same voxels at 2 mm
        img = nib.load(str(path))
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    labels = np.asarray(nib.load(str(folder / f"{case_id(0)}-seg.nii.gz")).dataobj)

    samples = load(root, tmp_path)  # 1 mm, a 16^3 cube

    seg = samples.inputs.tensors()["seg"][0].numpy()
    assert np.array_equal(seg, labels.repeat(2, 0).repeat(2, 1).repeat(2, 2))  # nearest: each voxel twice a side


def test_volumes_index_like_the_samples_they_belong_to(tmp_path):
    present = np.array([[True] * 4, [True, False, True, True], [False, True, True, True]])
    v = Volumes(tmp_path, np.array([5, 6, 7]), present)
    part = v[np.array([2, 0])]
    assert part.rows.tolist() == [7, 5] and part.present.tolist() == [present[2].tolist(), present[0].tolist()]
    assert len(part) == 2 and part.channels == SEQUENCES
