"""Peak memory of a training-like pass over 50,000 images read through fedhb's on-disk image cache
(:mod:`fedhb.data.image_cache`), against the same images decoded into memory.

    python benchmarks/image_cache.py                 # 50,000 JPGs, 80 px sources cached at 128 px (a few minutes)
    python benchmarks/image_cache.py --n 5000        # a smoke test

The fixture is ``--n`` grey JPGs of ``--source`` px (random smooth images, written once under ``--root``). The cache
is built once (timed; every file decoded by DataLoader workers), opened again (timed: the hit only hashes the file
list), then each mode runs in a fresh process that prepares the images as fedhb's image encoder does
(``torch.from_numpy(np.asarray(images))``, unsqueezed to ``(N, 1, H, W)``) and reads shuffled batches of 48 rows from
the tensor, converting each to float as the encoder's ``pixel_values`` does:

- ``in-memory``: the decoded images as one array in the process's memory (what a dataset without the cache holds);
- ``mapped``: the cache entry as a bare memory map, one epoch over every row, its touched pages kept mapped;
- ``cache``: the cache entry as fedhb opens it (tracked by :mod:`fedhb.mapped`, whose ``gather`` gives a batch's
  pages back after each batch); one epoch over every row;
- ``cache 10%``: the same, reading a tenth of the rows (one client's share).

Per mode, from ``/proc/self/status`` (sampled every 10 batches): the peak resident set ``VmHWM`` (it includes the
~230 MB that importing torch costs; ``getrusage`` would not do, as Linux carries the parent's peak across ``exec``),
the resident set before the data, and how much each of its two parts grew over the pass: ``RssAnon``, the process's
own memory, which only the in-memory mode grows by the dataset, and ``RssFile``, mapped pages of files (clean copies
of the cache file in the kernel's page cache). A bare map's ``RssFile`` grows to the whole file over an epoch, and
faster than the rows read (each page fault maps the neighbouring pages already in the page cache: fault-around, whole
large folios); fedhb's cache gives them back after each batch (``madvise(MADV_DONTNEED)``: they leave the process and
stay in the page cache), so its resident set stays at a batch's pages whatever the cache's size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fedhb.resources import memory_status

BATCH = 48


def write_fixture(root: Path, n: int, source: int, seed: int = 0) -> list[Path]:
    """``n`` grey JPGs ``root/<k // 1000>/<k>.jpg`` (kept when already there)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (64, source // 8, source // 8), dtype=np.uint8)  # 64 smooth patterns, varied below
    paths = [root / f"{k // 1000:03d}" / f"{k}.jpg" for k in range(n)]
    if all(p.is_file() for p in (paths[0], paths[-1])):
        return paths
    for k, path in enumerate(paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(base[k % 64]).resize((source, source), Image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.int16) + rng.integers(-20, 21, (source, source))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    return paths


def run_mode(mode: str, cache_file: str, share: float, seed: int = 0) -> dict[str, float]:
    """One training-like pass in this process; peaks in MB."""
    import torch

    torch.set_num_threads(1)
    before = memory_status()
    from fedhb.mapped import release, track

    if mode == "in-memory":
        array = np.load(cache_file)  # the decoded images, read into the process's memory
    elif mode == "mapped":
        array = np.load(cache_file, mmap_mode="c")  # a bare memory map, its touched pages never given back
    else:
        array = track(np.load(cache_file, mmap_mode="c"))  # what fedhb.data.image_cache.open_cache returns
    pixels = torch.from_numpy(np.asarray(array)).unsqueeze(1).contiguous()  # as ImageEncoder.prepare
    rows = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(seed))[: int(share * len(pixels))]
    peak = dict(before)
    total = 0.0
    for b, start in enumerate(range(0, len(rows), BATCH)):
        batch = pixels[rows[start:start + BATCH]]  # the trainer's batch: only these rows are read
        release()  # what fedhb.mapped.gather does after each batch (a no-op for the untracked modes)
        total += float(batch.float().div_(255.0).mean())  # as ImageEncoder.pixel_values
        if b % 10 == 0:
            peak = {k: max(v, peak[k]) for k, v in memory_status().items()}
    peak = {k: max(v, peak[k]) for k, v in memory_status().items()}
    return {"rss_mb": peak["VmHWM"] / 1024,
            "anon_mb": peak["RssAnon"] / 1024, "file_mb": peak["RssFile"] / 1024,
            "baseline_mb": before["VmRSS"] / 1024, "anon_added_mb": (peak["RssAnon"] - before["RssAnon"]) / 1024,
            "file_added_mb": (peak["RssFile"] - before["RssFile"]) / 1024, "rows": float(len(rows)), "check": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000, help="images in the fixture")
    parser.add_argument("--source", type=int, default=80, help="side of the fixture's JPGs, px")
    parser.add_argument("--size", type=int, default=128, help="side the cache resizes them to, px")
    parser.add_argument("--root", default="/tmp/fedhb_image_cache_bench", help="fixture and cache folder")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: up to 4)")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--cache-file", help=argparse.SUPPRESS)
    parser.add_argument("--share", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:  # a child: one mode, result as JSON
        print(json.dumps(run_mode(args.mode, args.cache_file, args.share)))
        return

    from fedhb.data.image_cache import CachedImages

    root = Path(args.root)
    start = time.perf_counter()
    paths = write_fixture(root / "jpg", args.n, args.source)
    fixture_s = time.perf_counter() - start
    source_mb = sum(p.stat().st_size for p in paths) / 1e6
    cache_dir = root / "cache"
    for old in cache_dir.glob("*.npy"):
        old.unlink()
    images = CachedImages(paths, args.size, dataset="bench", root=root / "jpg", cache_dir=cache_dir,
                          workers=args.workers)
    start = time.perf_counter()
    images.open()
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    images.open()
    hit_s = time.perf_counter() - start
    [cache_file] = cache_dir.glob("*.npy")
    decoded_mb = args.n * args.size * args.size / 1e6
    cache_mb = cache_file.stat().st_size / 1e6
    print(f"{args.n:,} JPGs of {args.source} px ({source_mb:.0f} MB, written in {fixture_s:.0f} s) cached at "
          f"{args.size} px: build {build_s:.1f} s, hit {hit_s:.2f} s; cache file {cache_mb:.1f} MB, decoded dataset "
          f"{decoded_mb:.1f} MB; {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print("\n| mode | rows read | MB read | peak RSS MB | RSS before the data MB | RssAnon added MB | "
          "RssFile added MB |")
    print("|---|---|---|---|---|---|---|")
    for mode, share in (("in-memory", 1.0), ("mapped", 1.0), ("cache", 1.0), ("cache 10%", 0.1)):
        out = subprocess.run([sys.executable, __file__, "--mode", mode.split()[0], "--cache-file", str(cache_file),
                              "--share", str(share)], check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"| {mode} | {int(r['rows']):,} | {r['rows'] * args.size ** 2 / 1e6:.0f} | {r['rss_mb']:.0f} | "
              f"{r['baseline_mb']:.0f} | {r['anon_added_mb']:.0f} | {r['file_added_mb']:.0f} |")


if __name__ == "__main__":
    main()
