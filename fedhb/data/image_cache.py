"""Images decoded and resized once into an on-disk cache of memory-mapped ``uint8`` arrays, for image sets larger
than RAM (MIMIC-CXR-JPG's 377,110 JPGs are 18.9 GB as 224 px grey uint8).

A dataset gives its images as :class:`CachedImages`, an array-like over file paths: indexing it (``--data.fraction``,
the partition) selects paths and reads nothing; ``np.asarray`` (the image encoder's ``prepare``) opens the cache entry
of exactly those paths, building it first if it does not exist, and returns it as a copy-on-write ``np.memmap`` of
shape ``(N, H, W)`` (one channel) or ``(N, C, H, W)``: the layout the encoder keeps, so that ``torch.from_numpy``
shares the mapping and each training batch reads only its own rows from the file (the kernel's page cache holds what
was read lately, and drops it under memory pressure; nothing of the cache is copied into the process's own memory).

An entry is the file ``<dataset>-<size>px-<channels>c-<key>.npy`` (the ``.npy`` format, so ``np.load`` reads it too).
Its key is a SHA-256 over the decoder, the image size, the channel count and, in row order, each file's path relative
to the dataset's root, its size in bytes and its modification time (``--`` for a row without a file; in row order,
not sorted, because the entry's rows are the samples' order, which lets the encoder use the mapping without a copy):
changing, adding, removing or reordering a file, or asking for another size, gives another entry; deleting the cache
folder is always safe. The build decodes every file (in DataLoader worker processes when there are more than 1,024
files and 3 or more cores, or ``--data.workers``), so a truncated or corrupt JPG
or PNG is reported, naming the file, before training starts, and no entry is written. The build writes a temporary
file next to the entry and renames it into place once complete and synced (under a lock file, so concurrent ranks
build it once): a build interrupted by a crash leaves only a temporary file, which is never read, and which the next
build removes.

The cache folder is ``--data.cache_dir``, else ``$FEDHB_IMAGE_CACHE``, else ``$FEDHB_CACHE/images``, else
``~/.cache/fedhb/images``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedhb.mapped import track

#: How pixel values become 8 bits: ``none`` converts to 8-bit grey (or RGB) as Pillow does (8-bit JPG/PNG: the
#: stored values); ``minmax`` scales each image's own range to 0-255 (16-bit PNGs such as PadChest's).
Scaling = Literal["none", "minmax"]
#: Bumped whenever decoding changes, so that old entries are not trusted.
VERSION = 2
#: Images per decoded chunk (what a worker returns at once).
CHUNK = 256


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: ``cache_dir``, ``$FEDHB_IMAGE_CACHE``, ``$FEDHB_CACHE/images`` or ``~/.cache/fedhb/images``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("FEDHB_IMAGE_CACHE"):
        return Path(os.environ["FEDHB_IMAGE_CACHE"]).expanduser()
    base = os.environ.get("FEDHB_CACHE") or Path.home() / ".cache" / "fedhb"
    return Path(base).expanduser() / "images"


def decode_image(path: str | Path, size: int, channels: int = 1, scaling: Scaling = "none") -> np.ndarray:
    """One image file as ``uint8`` ``(size, size)`` (one channel) or ``(channels, size, size)``, resized bilinearly
    (Pillow's antialiased resize); a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides
    at least ``size`` (Pillow's ``draft``), as a MIMIC-CXR JPG of 2,500 x 3,000 px needs no more for 224 px.

    Raises:
        ValueError: Naming the file, when it is not a readable image (truncated, corrupt, not an image).
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.format == "JPEG" and scaling == "none":  # decode at the smallest 1/2, 1/4, 1/8 scale that is
                image.draft("L" if channels == 1 else "RGB", (size, size))  # still >= size: 5-10x faster on a CXR
            image.load()  # decode now: a truncated file fails here, not later
            if scaling == "minmax":
                pixels = np.asarray(image, dtype=np.float32)
                if pixels.ndim == 3:
                    pixels = pixels.mean(-1)
                low, high = float(pixels.min()), float(pixels.max())
                scaled = np.zeros_like(pixels) if high <= low else (pixels - low) / (high - low) * 255.0
                grey = Image.fromarray(scaled.astype(np.uint8))
                image8 = grey if channels == 1 else grey.convert("RGB")
            else:
                image8 = image.convert("L" if channels == 1 else "RGB")
            out = np.asarray(image8.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises all three for damaged files
        raise ValueError(f"{path}: not a readable image ({type(err).__name__}: {err}); download it again or "
                         f"remove it") from err
    return out if channels == 1 else np.ascontiguousarray(out.transpose(2, 0, 1))


def cache_key(paths: Sequence[Path | None], size: int, channels: int, scaling: str, root: Path | None = None) -> str:
    """SHA-256 over the decoding settings and each row's relative path, byte size and mtime, in row order."""
    digest = hashlib.sha256(f"fedhb-images v{VERSION} {size} {channels} {scaling}\n".encode())
    for path in paths:
        if path is None:
            digest.update(b"--\n")
            continue
        try:
            stat = os.stat(path)
        except OSError as err:
            raise FileNotFoundError(f"{path}: cannot be read ({err.strerror}); the image is listed by the dataset's "
                                    f"files but is not there") from err
        name = str(path)
        if root is not None:
            try:
                name = str(Path(path).relative_to(root))
            except ValueError:
                pass
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class _Decode:
    """A map-style dataset of chunks of rows, for DataLoader workers: ``(start, pixels, errors)``."""

    def __init__(self, paths: Sequence[Path | None], size: int, channels: int, scaling: Scaling) -> None:
        self.paths, self.size, self.channels, self.scaling = paths, size, channels, scaling

    def __len__(self) -> int:
        return (len(self.paths) + CHUNK - 1) // CHUNK

    def __getitem__(self, chunk: int) -> tuple[int, np.ndarray, list[str]]:
        start = chunk * CHUNK
        rows = self.paths[start:start + CHUNK]
        shape = (self.size, self.size) if self.channels == 1 else (self.channels, self.size, self.size)
        out = np.zeros((len(rows), *shape), dtype=np.uint8)
        errors = []
        for i, path in enumerate(rows):
            if path is None:
                continue
            try:
                out[i] = decode_image(path, self.size, self.channels, self.scaling)
            except ValueError as err:  # reported together after the pass, so one run names every damaged file
                errors.append(str(err))
        return start, out, errors


def _first(batch: list[Any]) -> Any:
    return batch[0]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (released when the process ends, even by a crash)."""
    import fcntl

    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_cache(target: Path, paths: Sequence[Path | None], size: int, channels: int = 1, scaling: Scaling = "none",
                workers: int | None = None) -> None:
    """Decode ``paths`` into the ``.npy`` file ``target``: written to a temporary file, renamed when complete.

    Raises:
        ValueError: Naming the first damaged files (and how many there are); no entry is written.
    """
    import torch.utils.data

    shape = (len(paths), size, size) if channels == 1 else (len(paths), channels, size, size)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    files = sum(p is not None for p in paths)
    n_workers = default_workers(files) if workers is None else max(0, int(workers))
    decode: Any = _Decode(paths, size, channels, scaling)  # a map-style dataset (len and getitem)
    loader: Any = torch.utils.data.DataLoader(decode, batch_size=1, num_workers=n_workers, collate_fn=_first)
    errors: list[str] = []
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        for start, pixels, failed in loader:
            out[start:start + len(pixels)] = pixels
            errors += failed
        out.flush()
        del out
        if errors:
            more = f" (and {len(errors) - 3} more damaged images)" if len(errors) > 3 else ""
            raise ValueError("; ".join(errors[:3]) + more)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    try:  # the rename itself survives a power cut once the folder is synced
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def default_workers(n: int) -> int:
    """Decoding processes for ``n`` files: none for up to a thousand (starting a worker costs more) or on fewer than
    3 cores (one worker beside the process that writes gains little), else up to 4."""
    workers = min(4, (os.cpu_count() or 1) - 1)
    return 0 if n <= 4 * CHUNK or workers < 2 else workers


def open_cache(paths: Sequence[Path | None], size: int, channels: int = 1, scaling: Scaling = "none",
               dataset: str = "images", root: str | Path | None = None, cache_dir: str | Path | None = None,
               workers: int | None = None) -> np.memmap:
    """The cache entry of ``paths`` as a copy-on-write memmap, built first when missing."""
    folder = cache_root(cache_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"image cache folder {folder}: cannot be created ({err.strerror}); set --data.cache_dir "
                         f"(or FEDHB_IMAGE_CACHE) to a writable folder") from err
    key = cache_key(paths, size, channels, scaling, None if root is None else Path(root))
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in dataset)
    target = folder / f"{safe}-{size}px-{channels}c-{key[:24]}.npy"
    if not target.is_file():
        with _locked(folder / f"{target.name}.lock"):
            if not target.is_file():  # another rank may have built it while this one waited
                for stale in folder.glob(f"{target.name}.tmp-*"):  # left by a crashed build: never trusted
                    stale.unlink(missing_ok=True)
                build_cache(target, paths, size, channels, scaling, workers)
    expected = (len(paths), size, size) if channels == 1 else (len(paths), channels, size, size)
    try:
        array = track(np.load(target, mmap_mode="c"))  # its pages leave RSS after each batch
    except (OSError, ValueError) as err:
        raise ValueError(f"image cache {target}: unreadable ({err}); delete it and rerun") from err
    if array.dtype != np.uint8 or array.shape != expected:
        raise ValueError(f"image cache {target}: holds {array.dtype} {array.shape}, expected uint8 {expected}; "
                         f"delete it and rerun")
    return array


class CachedImages:
    """Image files as an array-like of ``uint8`` images, decoded once into the on-disk cache.

    ``images[index]`` selects rows (paths) without reading anything; ``np.asarray(images)`` returns the cache entry of
    exactly these rows as a memmap ``(N, size, size)`` or ``(N, channels, size, size)``, building it when missing.
    A ``None`` path is a row of zeros (an absent image: the presence mask tells the model to ignore it).
    """

    def __init__(self, paths: Sequence[Path | None], size: int, *, channels: int = 1, scaling: Scaling = "none",
                 dataset: str = "images", root: str | Path | None = None, cache_dir: str | Path | None = None,
                 workers: int | None = None) -> None:
        if channels not in (1, 3):
            raise ValueError(f"image channels must be 1 or 3, got {channels!r}")
        self.paths = list(paths)
        self.size, self.channels, self.scaling = size, channels, scaling
        self.dataset, self.root, self.cache_dir, self.workers = dataset, root, cache_dir, workers
        self.shape = (len(self.paths), size, size) if channels == 1 else (len(self.paths), channels, size, size)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(np.uint8)
        #: Tells the image encoder that ``(N, C, H, W)`` rows need no permute (its ``(N, H, W, C)`` arrays do).
        self.channels_first = True

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: Any) -> CachedImages:
        rows = np.arange(len(self.paths))[index]
        if np.ndim(rows) == 0:
            raise TypeError("CachedImages selects rows with a slice or an index array, not a single integer")
        return CachedImages([self.paths[i] for i in rows], self.size, channels=self.channels, scaling=self.scaling,
                            dataset=self.dataset, root=self.root, cache_dir=self.cache_dir, workers=self.workers)

    def open(self) -> np.memmap:
        """The cache entry (built when missing)."""
        return open_cache(self.paths, self.size, self.channels, self.scaling, self.dataset, self.root,
                          self.cache_dir, self.workers)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self.open()
        if copy:
            return np.array(array, dtype=dtype)
        return array if dtype is None or np.dtype(dtype) == array.dtype else array.astype(dtype)
