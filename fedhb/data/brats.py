"""BraTS glioma segmentation (Baid et al., "The RSNA-ASNR-MICCAI BraTS 2021 benchmark", arXiv 2107.02314; the 2023
and 2024 adult-glioma releases, BraTS-GLI): four MRI sequences to the three tumour regions, one case per sample.

**Layout** (BraTS 2023/2024 GLI training data, read as released)::

    ROOT/BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1c.nii.gz   T1 post-contrast
                             BraTS-GLI-00000-000-t1n.nii.gz   T1 native
                             BraTS-GLI-00000-000-t2f.nii.gz   T2-FLAIR
                             BraTS-GLI-00000-000-t2w.nii.gz   T2-weighted
                             BraTS-GLI-00000-000-seg.nii.gz   labels

The id ``BraTS-GLI-NNNNN-TTT`` is a patient (``NNNNN``) and a time point (``TTT``: ``000`` for every BraTS 2023 case;
BraTS 2024's post-treatment cases add follow-up scans of one patient as ``-100``, ``-101``, ...). It says nothing of
the institution, so the group key is the patient (the default: a patient's scans never straddle two clients or a
client's train and test split) and the **natural partition** (``--partition.scheme natural``, one client per site)
needs ``--data.sites``: a CSV mapping cases to institutions, with a case column (``case``, ``case_id``, ``ID`` or FeTS'
``Subject_ID``; a full case id or its patient ``NNNNN``) and a site column (``site``, ``institution`` or FeTS'
``Partition_ID``), such as the FeTS challenge's institution partition (Pati et al., arXiv 2105.05874). IID and
Dirichlet partitions stratify on the whole-tumour volume, in ``--data.volume_bins`` quantile bins (the samples'
``labels``).

**Labels** (BraTS 2023/2024): 1 necrotic tumour core (NETC), 2 peritumoral edema (SNFH), 3 enhancing tumour (ET), and
in BraTS 2024 4 resection cavity (RC, in no region); the regions are whole tumour WT = {1, 2, 3}, tumour core
TC = {1, 3} and enhancing tumour ET = {3}. A seg with another label is refused naming the file; BraTS 2021 and older
(4 = enhancing tumour, no 3) is recognised and refused with how to relabel it.

**Preprocessing**, once per case, into an on-disk cache (``--data.cache``, default ``$FEDHB_CACHE/brats`` or
``~/.cache/fedhb/brats``, keyed by every file's name, size and modification time and the options below; deleting it
is always safe): resampled to ``--data.spacing`` mm where the header's voxel size differs (MONAI ``Resize``, trilinear
for images and nearest for labels), cut to a ``--data.size`` cube centred on the brain (the non-zero voxels of the
sequences) and shifted to hold the whole tumour where it fits, zero-padded where the brain is smaller, each sequence
z-scored over its brain voxels (MONAI ``NormalizeIntensity(nonzero=True, channel_wise=True)``), stored as float16.
The cache is two memory-mapped arrays, ``volume.npy`` ``(N, 4, S, S, S)`` and ``seg.npy`` ``(N, S, S, S)`` uint8, so
training reads the cases a batch needs from disk and the whole set is never in memory (at 128^3 a case is 16 MB).
Metrics (Dice, HD95) are computed on this preprocessed grid, in mm at ``--data.spacing``.

**Absent sequences**: a case whose sequence file is missing is an error naming the file, unless
``--data.allow_missing true`` declares such gaps (a hospital without a sequence): the sequence is then absent for that
case, its channel zero-filled and marked absent (``present``), and the model fills it with its learned placeholder.
``--partition.missing_modality t2f`` (several: ``t2f,t1c``) removes sequences from a seeded fraction of the clients or
samples, as for the modalities of multimodal data (:meth:`Volumes.drop_channels`).

nibabel and MONAI are imported inside the functions that read files.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedhb import seeds
from fedhb.data.base import FederatedDataset, Samples
from fedhb.mapped import track

#: The four sequences, in channel order, as BraTS 2023/2024 name their files.
SEQUENCES = ("t1c", "t1n", "t2f", "t2w")
#: What BraTS 2021 and older called them (for messages).
OLD_NAMES = {"t1c": "t1ce", "t1n": "t1", "t2f": "flair", "t2w": "t2"}
#: Labels a seg may hold: background, NETC, SNFH, ET and BraTS 2024's resection cavity.
KNOWN_LABELS = (0, 1, 2, 3, 4)
#: Each region's labels (WT, TC, ET), in the order the model predicts them.
REGIONS = {"wt": (1, 2, 3), "tc": (1, 3), "et": (3,)}
CASE = re.compile(r"^BraTS-([A-Z]+)-(\d{5})-(\d{3})$")
#: Bump when the cache's layout or preprocessing changes, so old entries are ignored instead of misread.
CACHE_VERSION = 1
_CASE_COLUMNS = ("case", "case_id", "id", "subject_id", "brats2023", "brats_id")
_SITE_COLUMNS = ("site", "institution", "partition_id", "center")


def cache_root(cache: str | None) -> Path:
    """``--data.cache``, else ``$FEDHB_CACHE/brats``, else ``~/.cache/fedhb/brats``."""
    if cache:
        return Path(cache).expanduser()
    return Path(os.environ.get("FEDHB_CACHE") or Path.home() / ".cache" / "fedhb") / "brats"


class Volumes:
    """The ``inputs`` of BraTS :class:`~fedhb.data.base.Samples`: cases of a preprocessed cache, by row, with which
    sequences each holds. Indexing gives another ``Volumes`` (what ``Samples.subset`` does); nothing is read until
    :meth:`tensors`.

    Attributes:
        cache: The cache entry folder (``volume.npy``, ``seg.npy``, ``meta.json``).
        rows: ``(N,)`` each sample's row in the cache.
        present: ``(N, C)`` bool, which sequences each sample holds.
        channels: The sequence names, in channel order.
    """

    def __init__(self, cache: Path, rows: np.ndarray, present: np.ndarray,
                 channels: Sequence[str] = SEQUENCES) -> None:
        self.cache, self.rows, self.present = Path(cache), rows.astype(np.int64), present
        self.channels = tuple(channels)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: Any) -> Volumes:
        return Volumes(self.cache, self.rows[index], self.present[index], self.channels)

    def with_present(self, present: np.ndarray) -> Volumes:
        return Volumes(self.cache, self.rows, present, self.channels)

    def tensors(self) -> dict[str, Any]:
        """``volume`` ``(N, C, S, S, S)`` float16 and ``seg`` ``(N, S, S, S)`` uint8, memory-mapped from disk (a
        subset of the cache's rows is written once into a folder of its own), ``present`` ``(N, C)`` bool and
        ``case`` ``(N,)``, each sample's cache row."""
        import torch

        total = int(json.loads((self.cache / "meta.json").read_text())["count"])
        folder = self.cache
        if not np.array_equal(self.rows, np.arange(total)):
            key = hashlib.sha256(self.rows.tobytes()).hexdigest()[:16]
            folder = self.cache / f"rows-{key}"
            if not (folder / "done").is_file():
                folder.mkdir(exist_ok=True)
                for name in ("volume", "seg"):
                    source = np.load(self.cache / f"{name}.npy", mmap_mode="r")
                    _write_rows(folder / f"{name}.npy", source.shape[1:], source.dtype,
                                (source[r] for r in self.rows), len(self.rows))
                (folder / "done").write_text("")
        # Copy-on-write maps: torch wants writable arrays, and nothing writes to them.
        # (tracked: their pages leave the process's RSS after each batch, fedhb.mapped)
        volume = torch.from_numpy(track(np.load(folder / "volume.npy", mmap_mode="c")))
        seg = torch.from_numpy(track(np.load(folder / "seg.npy", mmap_mode="c")))
        return {"volume": volume, "seg": seg, "present": torch.from_numpy(self.present.copy()),
                "case": torch.from_numpy(self.rows.copy())}

    def drop_channels(self, samples: Samples, splits: Sequence[Any], names: str, fraction: float, level: str,
                      seed: int) -> tuple[Samples, dict[str, int]]:
        """``samples`` with the sequences ``names`` (comma-separated) removed from a seeded ``fraction`` of the
        clients (``level="client"``: ``round(fraction * clients)`` clients drawn from the stream ``[seed, MISSING]``,
        as :func:`fedhb.data.partition.drop_modality` draws them) or of each client's samples (``"sample"``:
        client ``k``'s from ``[seed, MISSING, k]``). A case never loses its last sequence (counted as
        ``kept_last``)."""
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in self.channels]
        if unknown or not wanted:
            raise ValueError(f"--partition.missing_modality {names!r}: BraTS's sequences are "
                             f"{', '.join(self.channels)} (several: comma-separated, e.g. t2f,t1c)")
        if level not in ("client", "sample"):
            raise ValueError(f"--partition.missing_level must be client or sample, got {level!r}")
        columns = [self.channels.index(n) for n in wanted]
        present = self.present.copy()
        removed = kept = 0
        chosen: list[int] = []

        def drop(index: np.ndarray) -> None:
            nonlocal removed, kept
            for i in index:
                for j in columns:
                    if present[i, j] and present[i].sum() > 1:
                        present[i, j] = False
                        removed += 1
                    elif present[i, j]:
                        kept += 1

        if level == "client":
            k = int(round(fraction * len(splits)))
            chosen = sorted(int(c) for c in seeds.rng(seed, seeds.Stream.MISSING).choice(len(splits), k,
                                                                                          replace=False))
            for c in chosen:
                drop(np.sort(np.concatenate([splits[c].train, splits[c].val, splits[c].test])))
        else:
            for c, s in enumerate(splits):
                index = np.sort(np.concatenate([s.train, s.val, s.test]))
                eligible = index[present[index][:, columns].any(1)]
                k = int(round(fraction * len(eligible)))
                drop(np.sort(seeds.rng(seed, seeds.Stream.MISSING, c).choice(eligible, k, replace=False))
                     if k else eligible[:0])
        import dataclasses

        out = dataclasses.replace(samples, inputs=self.with_present(present))
        return out, {"clients": len(chosen), "removed": removed, "kept_last": kept}


def _write_rows(path: Path, shape: tuple[int, ...], dtype: Any, rows: Any, count: int) -> None:
    """Write ``count`` arrays of ``shape`` into a new ``.npy`` at ``path``, one at a time, under a temporary name
    renamed into place (another process writing the same file at once never leaves a half-written one)."""
    tmp = path.with_name(f"{path.stem}.{uuid.uuid4().hex}.tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(count, *shape))
    try:
        for i, row in enumerate(rows):
            out[i] = row
        out.flush()
        del out
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class BraTS(FederatedDataset):
    """BraTS 2023/2024 GLI training cases (see the module doc).

    Args:
        root: The folder holding the ``BraTS-GLI-NNNNN-TTT`` case folders.
        sites: A CSV mapping cases to institutions (the ``site`` key of ``--partition.scheme natural``).
        size: Side of the preprocessed cube, in voxels.
        patch: Side of the random training patches and of the sliding-window inference's windows (a multiple of 32
            for SwinUNETR, of 8 for SegResNet).
        spacing: Voxel size to resample to, in mm (BraTS is released at 1 mm).
        overlap: Sliding-window inference's overlap between windows.
        volume_bins: Whole-tumour volume quantile bins the synthetic partitions stratify on.
        allow_missing: Treat a missing sequence file as an absent sequence instead of an error.
        cache: The preprocessing cache folder (default ``$FEDHB_CACHE/brats``).
        fraction: Fraction of the cases kept (stratified by volume bin, seeded).
    """

    default_group_by = "patient"
    default_natural_by = "site"
    name = "brats"

    def __init__(self, root: str, sites: str | None = None, size: int = 128, patch: int = 96, spacing: float = 1.0,
                 overlap: float = 0.5, volume_bins: int = 4, allow_missing: bool = False, cache: str | None = None,
                 fraction: float = 1.0) -> None:
        for flag, ok, allowed in (("size", size >= 8, ">= 8"), ("patch", 8 <= patch <= size, f"in [8, size={size}]"),
                                  ("spacing", spacing > 0, "> 0"), ("overlap", 0 <= overlap < 1, "in [0, 1)"),
                                  ("volume_bins", volume_bins >= 1, ">= 1"), ("fraction", 0 < fraction <= 1,
                                                                              "in (0, 1]")):
            if not ok:
                value = locals()[flag]
                raise ValueError(f"--data.{flag} must be {allowed}, got {value!r}")
        self.root, self.sites, self.size, self.patch, self.spacing = root, sites, size, patch, spacing
        self.overlap, self.volume_bins, self.allow_missing, self.cache = overlap, volume_bins, allow_missing, cache
        self.fraction = fraction

    # -- files ----------------------------------------------------------------------------------------------------
    def cases(self) -> list[tuple[str, dict[str, Path | None], Path]]:
        """``(case id, {sequence: file or None when absent}, seg file)`` of every case folder, sorted by id."""
        root = Path(self.root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"--data.root {root}: no such folder (give the folder holding the "
                                    f"BraTS-GLI-NNNNN-NNN case folders)")
        folders = sorted(p for p in root.iterdir() if p.is_dir() and CASE.match(p.name))
        if not folders:
            raise FileNotFoundError(f"--data.root {root}: no BraTS case folders (BraTS-GLI-NNNNN-NNN/) in it")
        out = []
        for folder in folders:
            files: dict[str, Path | None] = {}
            for seq in SEQUENCES:
                path: Path | None = folder / f"{folder.name}-{seq}.nii.gz"
                if path is None or not path.is_file():
                    if not self.allow_missing:
                        old = folder / f"{folder.name}_{OLD_NAMES[seq]}.nii.gz"
                        hint = (f" (that is BraTS 2021's naming: {old.name}; rename to the 2023 names)"
                                if old.is_file() else "")
                        raise FileNotFoundError(f"{path}: missing sequence file{hint}; pass --data.allow_missing "
                                                f"true if this case lacks the sequence")
                    path = None
                files[seq] = path
            if all(p is None for p in files.values()):
                raise FileNotFoundError(f"{folder}: none of the sequence files {', '.join(SEQUENCES)} is there")
            seg = folder / f"{folder.name}-seg.nii.gz"
            if not seg.is_file():
                raise FileNotFoundError(f"{seg}: missing label file (fedhb trains on the labelled training cases)")
            out.append((folder.name, files, seg))
        return out

    def _key(self, cases: list[tuple[str, dict[str, Path | None], Path]]) -> str:
        digest = hashlib.sha256(json.dumps([CACHE_VERSION, self.size, self.spacing]).encode())
        for case, files, seg in cases:
            for path in [*files.values(), seg]:
                stat = path.stat() if path is not None else None
                digest.update(f"{case}|{path.name if path else '-'}|{stat.st_size if stat else 0}|"
                              f"{stat.st_mtime_ns if stat else 0}\n".encode())
        return digest.hexdigest()[:24]

    def build_cache(self) -> Path:
        """The cache entry of these files and options, preprocessed now if it is not there yet."""
        cases = self.cases()
        entry = cache_root(self.cache) / self._key(cases)
        if (entry / "meta.json").is_file():
            return entry
        entry.mkdir(parents=True, exist_ok=True)
        shape = (self.size,) * 3
        present = np.zeros((len(cases), len(SEQUENCES)), dtype=bool)
        volumes_ml = np.zeros((len(cases), len(REGIONS)), dtype=np.float64)
        labels_seen: set[int] = set()
        label4: Path | None = None
        tag = uuid.uuid4().hex
        tmp = {name: entry / f"{name}.{tag}.tmp.npy" for name in ("volume", "seg")}
        try:
            # One case at a time straight into the two maps: the set is never in memory.
            volume = np.lib.format.open_memmap(tmp["volume"], mode="w+", dtype=np.float16,
                                               shape=(len(cases), len(SEQUENCES), *shape))
            seg = np.lib.format.open_memmap(tmp["seg"], mode="w+", dtype=np.uint8, shape=(len(cases), *shape))
            voxel_ml = self.spacing ** 3 / 1000.0
            for i, (_, files, seg_path) in enumerate(cases):
                volume[i], seg[i], present[i], seen = preprocess_case(files, seg_path, self.size, self.spacing)
                volumes_ml[i] = [float(np.isin(seg[i], r).sum()) * voxel_ml for r in REGIONS.values()]
                labels_seen.update(seen)
                if 4 in seen and label4 is None:
                    label4 = seg_path
            if label4 is not None and 3 not in labels_seen:
                raise ValueError(f"{label4}: label 4 and no case with label 3: these are BraTS 2021 labels (4 = "
                                 f"enhancing tumour); relabel 4 to 3 for the BraTS 2023 convention (label 4 is "
                                 f"BraTS 2024's resection cavity)")
            volume.flush()
            seg.flush()
            del volume, seg
            for name, path in tmp.items():
                os.replace(path, entry / f"{name}.npy")
        finally:
            for path in tmp.values():
                path.unlink(missing_ok=True)
        meta = {"version": CACHE_VERSION, "count": len(cases), "cases": [c for c, _, _ in cases],
                "present": present.tolist(), "volumes_ml": volumes_ml.tolist(), "size": self.size,
                "spacing": self.spacing}
        staged = entry / f"meta.{tag}.tmp"
        staged.write_text(json.dumps(meta))
        os.replace(staged, entry / "meta.json")
        return entry

    def read_sites(self, cases: list[str]) -> np.ndarray:
        """Each case's site from ``--data.sites``."""
        path = Path(str(self.sites)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--data.sites {path}: no such file (a CSV with a case and a site column)")
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = {h.strip().lower(): h for h in reader.fieldnames or []}
            case_col = next((header[c] for c in _CASE_COLUMNS if c in header), None)
            site_col = next((header[c] for c in _SITE_COLUMNS if c in header), None)
            if case_col is None or site_col is None:
                raise ValueError(f"--data.sites {path}: line 1 must name a case column ({', '.join(_CASE_COLUMNS)}) "
                                 f"and a site column ({', '.join(_SITE_COLUMNS)}); found {reader.fieldnames}")
            mapping = {row[case_col].strip(): row[site_col].strip() for row in reader}
        sites, unmapped = [], []
        for case in cases:
            patient = CASE.match(case).group(2)  # type: ignore[union-attr]
            site = mapping.get(case, mapping.get(patient))
            if site is None:
                unmapped.append(case)
            sites.append(site or "")
        if unmapped:
            raise ValueError(f"--data.sites {path}: {len(unmapped)} cases have no site (e.g. {unmapped[0]}); add a "
                             f"row for each case id or patient number")
        return np.array(sites)

    def load(self) -> Samples:
        entry = self.build_cache()
        meta = json.loads((entry / "meta.json").read_text())
        cases = list(meta["cases"])
        present = np.array(meta["present"], dtype=bool).reshape(len(cases), len(SEQUENCES))
        wt = np.array(meta["volumes_ml"], dtype=np.float64).reshape(len(cases), len(REGIONS))[:, 0]
        bins = min(self.volume_bins, len(cases))
        edges = np.quantile(wt, np.linspace(0, 1, bins + 1)[1:-1]) if bins > 1 else np.zeros(0)
        labels = np.searchsorted(edges, wt, side="right").astype(np.int64)
        bounds = [0.0, *edges.tolist(), float("inf")]
        names = [f"WT {lo:.0f}-{hi:.0f} mL" if hi != float("inf") else f"WT >= {lo:.0f} mL"
                 for lo, hi in zip(bounds[:-1], bounds[1:])]
        groups = {"patient": np.array([CASE.match(c).group(2) for c in cases]),  # type: ignore[union-attr]
                  "case": np.array(cases)}
        if self.sites is not None:
            groups["site"] = self.read_sites(cases)
        return Samples(inputs=Volumes(entry, np.arange(len(cases)), present), labels=labels,
                       num_classes=max(1, bins), task="segmentation", modality="image", groups=groups,
                       label_names=names,
                       meta={"channels": SEQUENCES, "regions": tuple(REGIONS), "patch": self.patch,
                             "spacing": self.spacing, "size": self.size, "overlap": self.overlap})


def preprocess_case(files: dict[str, Path | None], seg_path: Path, size: int,
                    spacing: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, set[int]]:
    """One case: ``(volume (C, S, S, S) float16, labels (S, S, S) uint8, present (C,), labels seen)``; every file
    checked (3-D, the seg's shape, known labels), each error naming the file."""
    import nibabel as nib
    from monai.transforms import NormalizeIntensity, Resize

    normalize: Any = NormalizeIntensity(nonzero=True)

    seg_img = _read(nib, seg_path)
    shape = tuple(seg_img.shape)
    zooms = tuple(float(z) for z in seg_img.header.get_zooms()[:3])
    raw = np.asanyarray(seg_img.dataobj)
    seg = np.rint(raw).astype(np.int64)
    if not np.array_equal(seg, raw):
        raise ValueError(f"{seg_path}: labels must be integers, found {raw.flat[np.flatnonzero(seg != raw)[0]]}")
    seen = {int(v) for v in np.unique(seg)}
    unknown = sorted(seen - set(KNOWN_LABELS))
    if unknown:
        raise ValueError(f"{seg_path}: unknown labels {unknown}; BraTS 2023/2024 segs hold {list(KNOWN_LABELS)} "
                         f"(0 background, 1 NETC, 2 SNFH, 3 ET, 4 resection cavity)")
    image = np.zeros((len(SEQUENCES), *shape), dtype=np.float32)
    present = np.zeros(len(SEQUENCES), dtype=bool)
    for c, seq in enumerate(SEQUENCES):
        path = files.get(seq)
        if path is None:
            continue
        img = _read(nib, path)
        if tuple(img.shape) != shape:
            raise ValueError(f"{path}: shape {tuple(img.shape)}, but the case's seg {seg_path.name} has {shape}; "
                             f"every file of a case must be on the same grid")
        image[c] = np.asanyarray(img.dataobj, dtype=np.float32)
        present[c] = True
    if not np.isfinite(image).all():
        raise ValueError(f"{seg_path.parent}: a sequence holds non-finite values (NaN or inf)")
    labels = seg.astype(np.uint8)
    if any(abs(z - spacing) > 1e-3 for z in zooms):
        target = [max(1, int(round(n * z / spacing))) for n, z in zip(shape, zooms)]
        linear: Any = Resize(target, mode="trilinear")
        nearest: Any = Resize(target, mode="nearest")
        image = np.asarray(linear(image))
        labels = np.asarray(nearest(labels[None].astype(np.float32)))[0].round().astype(np.uint8)
    image, labels = _window(image, labels, size)
    for k in np.flatnonzero(present):
        if (image[k] != 0).any():
            image[k] = np.asarray(normalize(image[k]))
    return image.astype(np.float16), labels, present, seen


def _read(nib: Any, path: Path) -> Any:
    try:
        img = nib.load(str(path))
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise ValueError(f"{path}: not a readable NIfTI file ({type(err).__name__}: {err})") from err
    if len(img.shape) != 3:
        raise ValueError(f"{path}: shape {tuple(img.shape)}; a BraTS volume is 3-D (240 x 240 x 155 as released)")
    return img


def _window(image: np.ndarray, labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``size`` cube centred on the brain (non-zero voxels of any sequence), shifted to hold the tumour's bounding
    box where it fits, zero-padded outside the volume."""
    brain = np.flatnonzero(image.any(0).ravel()) if image.any() else np.zeros(0, dtype=np.int64)
    tumour = np.flatnonzero((labels > 0).ravel())
    shape = labels.shape
    out_image = np.zeros((image.shape[0], size, size, size), dtype=np.float32)
    out_labels = np.zeros((size, size, size), dtype=np.uint8)
    src, dst = [], []
    for axis, n in enumerate(shape):
        if len(brain):
            coords = np.unravel_index(brain, shape)[axis]
            lo, hi = int(coords.min()), int(coords.max()) + 1
        else:
            lo, hi = 0, n
        start = (lo + hi) // 2 - size // 2
        if len(tumour):
            t = np.unravel_index(tumour, shape)[axis]
            t_lo, t_hi = int(t.min()), int(t.max()) + 1
            if t_hi - t_lo <= size:
                start = min(max(start, t_hi - size), t_lo)
        a, b = max(0, start), min(n, start + size)
        src.append(slice(a, b))
        dst.append(slice(a - start, b - start))
    out_image[(slice(None), *dst)] = image[(slice(None), *src)]
    out_labels[tuple(dst)] = labels[tuple(src)]
    return out_image, out_labels
