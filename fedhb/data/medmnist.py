"""MedMNIST v2 (Yang et al., Scientific Data 2023), read from its official ``.npz`` files.

The files are ``{root}/{flag}.npz`` (28 px) or ``{root}/{flag}_{size}.npz`` (64/128/224 px) with the keys
``{train,val,test}_images`` (``uint8``, ``(N, H, W)`` or ``(N, H, W, 3)``) and ``{train,val,test}_labels``
(``(N, 1)`` class ids, or ``(N, 14)`` 0/1 for ChestMNIST). medmnist's own dataset class asserts the official sample
counts, so fedhb reads the files itself and accepts any count; the metadata (URLs, MD5s, labels) comes from
``medmnist.INFO``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from fedhb.data.base import FederatedDataset, Samples, Task

FLAGS_2D = (
    "organamnist", "organcmnist", "organsmnist", "pathmnist", "chestmnist", "dermamnist", "bloodmnist",
    "pneumoniamnist", "retinamnist", "breastmnist", "tissuemnist", "octmnist",
)
SPLITS = ("train", "val", "test")
SIZES = (28, 64, 128, 224)


def medmnist_info(flag: str) -> dict[str, Any]:
    """medmnist's metadata for ``flag``, read from its ``info.py`` alone: importing the package runs its evaluator,
    which imports pandas (about 60 MB and 0.2 s per process) and prints a warning without torchvision."""
    INFO = _medmnist_info_module().INFO
    if flag not in INFO:
        raise ValueError(f"--data.flag must be one of {list(FLAGS_2D)}, got {flag!r}")
    return INFO[flag]


@functools.cache
def _medmnist_info_module() -> Any:
    import importlib.util

    spec = importlib.util.find_spec("medmnist")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("MedMNIST's metadata comes from the medmnist package: pip install --no-deps medmnist")
    info = importlib.util.spec_from_file_location(
        "fedhb._medmnist_info", Path(next(iter(spec.submodule_search_locations))) / "info.py")
    assert info is not None and info.loader is not None
    module = importlib.util.module_from_spec(info)
    with contextlib.redirect_stdout(io.StringIO()):
        info.loader.exec_module(module)
    return module


def medmnist_filename(flag: str, size: int) -> str:
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def _url_md5(info: dict[str, Any], size: int) -> tuple[str, str]:
    suffix = "" if size == 28 else f"_{size}"
    return info[f"url{suffix}"], info[f"MD5{suffix}"]


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_medmnist(flag: str, size: int, root: str | Path) -> Path:
    """Download the official file to ``root`` (to a temporary name, checked against its MD5, then renamed)."""
    info = medmnist_info(flag)
    url, md5 = _url_md5(info, size)
    path = Path(root) / medmnist_filename(flag, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".npz.part")
    try:
        urllib.request.urlretrieve(url, tmp)  # noqa: S310 - the URL comes from medmnist's INFO
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise FileNotFoundError(
            f"could not download {url} to {path}: {err}. Download it by hand (MD5 {md5}) and pass --data.root."
        ) from err
    if _md5(tmp) != md5:
        tmp.unlink(missing_ok=True)
        raise OSError(f"downloaded {url} but its MD5 is not {md5}; the file was removed, try again")
    os.replace(tmp, path)
    return path


#: What numpy raises for a cut-off or damaged ``.npz`` (a zip archive), when opened or when a member is read.
_DAMAGED = (zipfile.BadZipFile, zlib.error, EOFError)


def read_medmnist_npz(path: str | Path, flag: str, size: int, num_classes: int, multi_label: bool) -> dict[str, Any]:
    """Read and check one official file; every problem names the file and what is wrong."""
    path = Path(path)
    try:
        npz = np.load(path, allow_pickle=False)
    except _DAMAGED as err:
        raise ValueError(_damaged(path, flag, size, err)) from err
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable .npz file ({err}); delete it and download it again") from err
    try:
        with npz:
            return _check_arrays(npz, path, flag, size, num_classes, multi_label)
    except _DAMAGED as err:
        raise ValueError(_damaged(path, flag, size, err)) from err


def _damaged(path: Path, flag: str, size: int, err: Exception) -> str:
    url, md5 = _url_md5(medmnist_info(flag), size)
    return (f"{path}: the file is truncated or damaged ({type(err).__name__}: {err}; {path.stat().st_size:,} bytes; "
            f"an interrupted download or copy?). Delete it, then download {url} (MD5 {md5}) again or rerun with "
            f"--data.download true")


def _check_arrays(npz: Any, path: Path, flag: str, size: int, num_classes: int, multi_label: bool) -> dict[str, Any]:
    """Check every split of an open file and return ``{split: (images, labels)}``."""
    missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in npz.files]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}; a MedMNIST file has {[f'{s}_images' for s in SPLITS]} "
                         f"and {[f'{s}_labels' for s in SPLITS]}, found {sorted(npz.files)}")
    out: dict[str, Any] = {}
    for split in SPLITS:
        images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
        where = f"{path}: {split}_images"
        if images.dtype != np.uint8:
            raise ValueError(f"{where} has dtype {images.dtype}, expected uint8")
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
            raise ValueError(f"{where} has shape {images.shape}, expected (N, {size}, {size}) or "
                             f"(N, {size}, {size}, 3)")
        if images.shape[1:3] != (size, size):
            raise ValueError(f"{where} holds {images.shape[1]}x{images.shape[2]} images but --data.size is "
                             f"{size}; use the file {medmnist_filename(flag, images.shape[1])} or set --data.size")
        width = num_classes if multi_label else 1
        if labels.ndim == 1:
            labels = labels[:, None]
        if labels.ndim != 2 or labels.shape != (len(images), width):
            raise ValueError(f"{path}: {split}_labels has shape {labels.shape}, expected ({len(images)}, {width}) "
                             f"to match {split}_images")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{path}: {split}_labels has dtype {labels.dtype}, expected an integer type")
        high = 1 if multi_label else num_classes - 1
        if labels.size and (labels.min() < 0 or labels.max() > high):
            raise ValueError(f"{path}: {split}_labels holds values in [{labels.min()}, {labels.max()}], "
                             f"expected [0, {high}] for {flag}")
        out[split] = (images, labels)
    return out


class MedMNIST(FederatedDataset):
    """A 2D MedMNIST dataset read from its official ``.npz`` file.

    The partition is fed by the official splits named in ``splits`` (all three by default, pooled, as FHBench does),
    subsampled to ``fraction`` (stratified, seeded; FHBench uses 20%), then split over clients and into each client's
    own train/val/test.
    """

    default_group_by = None

    def __init__(
        self,
        flag: str = "organamnist",
        root: str = "data/medmnist",
        size: int = 28,
        download: bool = False,
        fraction: float = 1.0,
        splits: list[str] | None = None,
    ) -> None:
        """
        Args:
            flag: MedMNIST flag: organamnist, organcmnist, organsmnist, pathmnist, chestmnist, dermamnist,
                bloodmnist, pneumoniamnist, retinamnist, breastmnist, tissuemnist, octmnist.
            root: Folder that holds ``{flag}.npz`` (28 px) or ``{flag}_{size}.npz``.
            size: Image size of the file: 28, 64, 128 or 224.
            download: Download the official file into ``root`` when it is missing.
            fraction: Fraction of the pooled samples to keep (stratified by label, seeded by ``--seed``).
            splits: Official splits pooled before partitioning (default: train, val and test).
        """
        if flag not in FLAGS_2D:
            raise ValueError(f"--data.flag must be one of {list(FLAGS_2D)}, got {flag!r}")
        if size not in SIZES:
            raise ValueError(f"--data.size must be one of {list(SIZES)}, got {size!r}")
        if not 0 < fraction <= 1:
            raise ValueError(f"--data.fraction must be in (0, 1], got {fraction!r}")
        splits = list(splits) if splits is not None else list(SPLITS)
        if not splits or any(s not in SPLITS for s in splits):
            raise ValueError(f"--data.splits must be a non-empty subset of {list(SPLITS)}, got {splits!r}")
        self.flag, self.root, self.size, self.download = flag, root, size, download
        self.fraction, self.splits = fraction, splits
        self.name = flag

    @property
    def path(self) -> Path:
        return Path(self.root) / medmnist_filename(self.flag, self.size)

    def load(self) -> Samples:
        info = medmnist_info(self.flag)
        path = self.path
        if not path.is_file():
            url, md5 = _url_md5(info, self.size)
            if self.download:
                download_medmnist(self.flag, self.size, self.root)
            else:
                size = "" if self.size == 28 else f" --size {self.size}"
                raise FileNotFoundError(
                    f"MedMNIST file not found: {path}. Download {url} (MD5 {md5}) into --data.root, or pass "
                    f"--data.download true; for a small test file run "
                    f"`python -m fedhb.data.fixtures --flag {self.flag} --root {self.root}{size}`."
                )
        multi_label = info["task"].startswith("multi-label")
        label_names = [info["label"][str(i)] for i in range(len(info["label"]))]
        num_classes = len(label_names)
        arrays = read_medmnist_npz(path, self.flag, self.size, num_classes, multi_label)
        images = np.concatenate([arrays[s][0] for s in self.splits])
        labels = np.concatenate([arrays[s][1] for s in self.splits]).astype(np.int64)
        source = np.concatenate([np.full(len(arrays[s][0]), s) for s in self.splits])
        if not multi_label:
            labels = labels[:, 0]
        task: Task = "multi-label" if multi_label else ("binary" if num_classes == 2 else "multi-class")
        return Samples(
            inputs=images, labels=labels, num_classes=num_classes, task=task, modality="image",
            source_split=source, label_names=label_names, meta={"channels": 1 if images.ndim == 3 else 3},
        )
