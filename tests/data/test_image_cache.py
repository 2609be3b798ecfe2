"""The on-disk image cache: keyed by files and settings, built atomically, identical to a direct decode, zero-copy."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fedhb.data import image_cache
from fedhb.data.base import Samples
from fedhb.data.image_cache import CachedImages, decode_image, open_cache


def write_images(folder: Path, n: int, size: int = 20, suffix: str = ".png", seed: int = 0, mode: str = "L"
                 ) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        shape = (size, size + 3) if mode == "L" else (size, size + 3, 3)
        path = folder / f"img{i}{suffix}"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
        paths.append(path)
    return paths


def reference(path: Path, size: int, rgb: bool = False) -> np.ndarray:
    """Pillow's own conversion and bilinear resize (a JPEG decoded at the DCT scale that keeps ``size``), channels
    first for RGB: what the cache must hold."""
    from PIL import Image

    with Image.open(path) as image:
        if path.suffix == ".jpg":
            image.draft("RGB" if rgb else "L", (size, size))
        out = np.asarray(image.convert("RGB" if rgb else "L").resize((size, size), Image.Resampling.BILINEAR))
    return out.transpose(2, 0, 1) if rgb else out


def mapped(array: np.ndarray) -> bool:
    """Whether ``array`` is a view of a file mapping (no copy in the process's own memory)."""
    import mmap

    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    return base is not None


def file_at(address: int) -> str | None:
    """The file mapped at ``address`` in this process (``/proc/self/maps``), or ``None`` (private memory)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *_, name = line.split(maxsplit=5) if len(line.split()) == 6 else (line.split()[0], None)
        low, high = (int(x, 16) for x in span.split("-"))
        if low <= address < high:
            return name
    return None


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.npy"))


def test_cached_pixels_equal_a_direct_decode_and_the_encoder_keeps_the_memmap(tmp_path):
    from fedhb.models.vision import build_image_encoder

    grey = write_images(tmp_path / "grey", 5, suffix=".jpg")
    rgb = write_images(tmp_path / "rgb", 3, mode="RGB")
    images = CachedImages([grey[0], None, *grey[1:]], 12, dataset="t", cache_dir=tmp_path / "c")
    colour = CachedImages(rgb, 12, channels=3, dataset="t", cache_dir=tmp_path / "c")

    array, array3 = np.asarray(images), np.asarray(colour)

    assert mapped(array) and mapped(array3) and array.shape == (6, 12, 12) and array.dtype == np.uint8
    np.testing.assert_array_equal(array[0], reference(grey[0], 12))
    np.testing.assert_array_equal(array[1], np.zeros((12, 12), np.uint8))  # no file: zeros
    np.testing.assert_array_equal(np.stack(array[2:]), np.stack([reference(p, 12) for p in grey[1:]]))
    np.testing.assert_array_equal(array3, np.stack([reference(p, 12, rgb=True) for p in rgb]))
    # the encoder's tensors share the mapping: no copy of the dataset into memory, in either layout
    encoder = build_image_encoder("tiny-vit")
    for cached, memmap, shape in ((images, array, (6, 1, 12, 12)), (colour, array3, (3, 3, 12, 12))):
        pixels = encoder.prepare(Samples(inputs=cached, labels=np.zeros(len(cached), np.int64), num_classes=2,
                                         task="binary", modality="image"))["pixels"]
        assert pixels.shape == shape and pixels.dtype.is_floating_point is False
        # the tensor's memory is the mapped cache file itself, not a copy
        name = file_at(pixels.data_ptr())
        assert name is not None and Path(name).parent == tmp_path / "c" and f"-{shape[1]}c-" in name
        np.testing.assert_array_equal(pixels.numpy().reshape(memmap.shape), memmap)


def test_minmax_scaling_of_a_16_bit_png(tmp_path):
    from PIL import Image

    path = tmp_path / "x.png"
    Image.fromarray(np.array([[1000, 2000], [3000, 5000]], dtype=np.uint16)).save(path)

    out = decode_image(path, 2, scaling="minmax")

    np.testing.assert_array_equal(out, [[0, 63], [127, 255]])  # (x - 1000) / 4000 * 255, truncated


def test_the_key_follows_files_size_and_order_and_a_hit_reads_without_decoding(tmp_path, monkeypatch):
    paths = write_images(tmp_path / "img", 4)
    cache = tmp_path / "c"
    built: list[int] = []
    real = image_cache.build_cache
    monkeypatch.setattr(image_cache, "build_cache", lambda target, p, *a, **k: (built.append(len(p)),
                                                                                 real(target, p, *a, **k)))

    first = np.array(open_cache(paths, 8, cache_dir=cache))
    again = np.array(open_cache(paths, 8, cache_dir=cache))
    assert built == [4] and len(entries(cache)) == 1  # a hit: nothing decoded
    np.testing.assert_array_equal(first, again)

    open_cache(paths, 10, cache_dir=cache)  # another size
    open_cache(paths[::-1], 8, cache_dir=cache)  # another row order
    open_cache(paths[:3], 8, cache_dir=cache)  # another file list
    assert built == [4, 4, 4, 3] and len(entries(cache)) == 4

    write_images(tmp_path / "img", 1, seed=7)  # img0.png rewritten with other pixels
    os.utime(paths[0], ns=(1, 1))  # and an mtime that cannot equal the first one's
    changed = np.array(open_cache(paths, 8, cache_dir=cache))
    assert built == [4, 4, 4, 3, 4] and len(entries(cache)) == 5
    np.testing.assert_array_equal(changed[0], reference(paths[0], 8))
    np.testing.assert_array_equal(changed[1:], first[1:])


def test_a_build_interrupted_midway_leaves_no_entry_and_a_stale_temporary_file_is_never_trusted(tmp_path,
                                                                                              monkeypatch):
    paths = write_images(tmp_path / "img", 6)
    cache = tmp_path / "c"
    monkeypatch.setattr(image_cache, "CHUNK", 2)
    real = image_cache._Decode.__getitem__

    def crash(self, chunk):
        if chunk == 2:
            raise KeyboardInterrupt  # the process dies with two chunks written
        return real(self, chunk)

    monkeypatch.setattr(image_cache._Decode, "__getitem__", crash)
    with pytest.raises(KeyboardInterrupt):
        open_cache(paths, 8, cache_dir=cache, workers=0)
    assert entries(cache) == [] and not list(cache.glob("*.tmp-*"))

    monkeypatch.setattr(image_cache._Decode, "__getitem__", real)
    name = f"images-8px-1c-{image_cache.cache_key(paths, 8, 1, 'none')[:24]}.npy"
    (cache / f"{name}.tmp-999999").write_bytes(b"half a cache left by a killed process")  # a crash's leftover
    array = open_cache(paths, 8, cache_dir=cache, workers=0)
    np.testing.assert_array_equal(array, np.stack([reference(p, 8) for p in paths]))
    assert entries(cache) == [name] and not list(cache.glob("*.tmp-*"))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_truncated_jpg_and_a_non_image_are_named_and_no_entry_is_written(tmp_path, monkeypatch, workers):
    monkeypatch.setattr(image_cache, "CHUNK", 2)  # several chunks, so that two workers share the decoding
    paths = write_images(tmp_path / "img", 5, size=40, suffix=".jpg")
    data = paths[3].read_bytes()
    paths[3].write_bytes(data[: len(data) // 2])  # truncated
    paths[1].write_bytes(b"not an image at all")

    with pytest.raises(ValueError, match="img1.jpg: not a readable image") as err:
        open_cache(paths, 8, cache_dir=tmp_path / "c", workers=workers)
    assert "img3.jpg: not a readable image" in str(err.value)
    assert entries(tmp_path / "c") == [] and not list((tmp_path / "c").glob("*.tmp-*"))


def test_selecting_rows_reads_nothing_and_opens_the_entry_of_those_rows(tmp_path):
    paths = write_images(tmp_path / "img", 4)
    images = CachedImages(paths, 8, cache_dir=tmp_path / "c")

    part = images[np.array([3, 1])]

    assert entries(tmp_path / "c") == [] and part.shape == (2, 8, 8) and len(images[1:]) == 3
    np.testing.assert_array_equal(np.asarray(part), np.stack([reference(paths[3], 8), reference(paths[1], 8)]))
    with pytest.raises(FileNotFoundError, match="gone.png"):
        np.asarray(CachedImages([tmp_path / "gone.png"], 8, cache_dir=tmp_path / "c"))
