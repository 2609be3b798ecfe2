"""Time and peak memory of one BraTS segmentation round (training and evaluation) on a 16-case 96^3 fixture.

    python benchmarks/segmentation.py                                  # tiny SegResNet, CPU
    python benchmarks/segmentation.py --backbone tiny-swinunetr-lora   # frozen Swin encoder + LoRA
    python benchmarks/segmentation.py --accelerator cuda

The fixture (:func:`fedhb.data.fixtures_brats.write_brats_fixture`: ``--cases`` cases of four int16 sequences and a
seg, ``--size``^3 voxels, the released layout) is written once under ``--root``; the preprocessing cache is built
from it in a fresh folder (timed: every case read, cropped, z-scored and written to the float16 memory maps). Then
one FedAvg round of ``--clients`` IID clients (3/4 of each client's cases train, 1/4 test), ``--local_epochs`` over
random ``--patch``^3 crops in batches of 2 (Adam), and the evaluation: every client's test cases and the global model
on their union by sliding-window inference (windows of the patch, overlap 0.5), Dice and HD95 per region.

Reported, as one JSON line: the cache build time, the round's time (training and evaluation; wall clock and the
process's CPU time, all threads, which a machine shared with other work inflates less), the peak resident set
``VmHWM`` from ``/proc/self/status`` (it includes the ~500 MB that importing torch and MONAI costs), the resident set
before the round, and how much the process's own memory (``RssAnon``) grew over the round: the cases are read from the
memory-mapped cache a batch at a time (the page cache holds the file's pages, ``RssFile``, which the kernel can drop),
so the growth is the model, its optimizer and one batch's activations, not the data set.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from fedhb.resources import memory_status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "fedhb_bench_brats"))
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--backbone", default="tiny-segresnet")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--local_epochs", type=int, default=1)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from fedhb.algorithms import FedAvg
    from fedhb.build import build_loop
    from fedhb.config import FabricArgs, FederationArgs, ModelArgs, OptimArgs
    from fedhb.data import BraTS
    from fedhb.data.fixtures_brats import write_brats_fixture
    from fedhb.data.partition import partition_samples
    from fedhb.strategy import make_fabric

    root = Path(args.root) / f"{args.cases}x{args.size}"
    if not (root / "done").is_file():
        shutil.rmtree(root, ignore_errors=True)
        write_brats_fixture(root, cases=args.cases, size=args.size, seed=0)
        (root / "done").write_text("")
    cache = Path(tempfile.mkdtemp(prefix="fedhb_bench_brats_cache_"))
    try:
        t = time.perf_counter()
        samples = BraTS(root=str(root), size=args.size, patch=args.patch, volume_bins=1, cache=str(cache)).load()
        cache_s = time.perf_counter() - t
        splits = partition_samples(samples, "iid", args.clients, 1.0, 2, (0.75, 0.0, 0.25), 0, None)
        fabric = make_fabric(FabricArgs(accelerator=args.accelerator, devices=1))
        federation = FederationArgs(rounds=1, local_epochs=args.local_epochs, batch_size=2, eval_batch_size=2)
        loop = build_loop(fabric, samples, splits, FedAvg(), model=ModelArgs(backbone=args.backbone),
                          federation=federation, optim=OptimArgs(name="adam", lr=2e-4, schedule="constant"), seed=0)
        before = memory_status()
        if torch.cuda.is_available() and args.accelerator != "cpu":
            torch.cuda.reset_peak_memory_stats()
        t, cpu = time.perf_counter(), time.process_time()
        result = loop.run_round(1)
        round_s, round_cpu_s = time.perf_counter() - t, time.process_time() - cpu
        after = memory_status()
        metrics = result.metrics or {}
        out = {
            "cases": args.cases, "size": args.size, "patch": args.patch, "backbone": args.backbone,
            "clients": args.clients, "local_epochs": args.local_epochs, "accelerator": args.accelerator,
            "threads": torch.get_num_threads(),
            "trainable_parameters": sum(p.numel() for p in loop.client_module.trainable().values()),
            "cache_build_s": round(cache_s, 2), "round_s": round(round_s, 2),
            "round_cpu_s": round(round_cpu_s, 2),
            "peak_rss_mb": round(after["VmHWM"] / 1024, 1), "rss_before_round_mb": round(before["VmRSS"] / 1024, 1),
            "anon_growth_mb": round((after["RssAnon"] - before["RssAnon"]) / 1024, 1),
            "file_mapped_mb": round(after["RssFile"] / 1024, 1),
            "cache_mb": round(sum(f.stat().st_size for f in cache.rglob("*.npy")) / 2**20, 1),
            "train_loss": round(result.train_loss, 4), "global_dice": metrics.get("global_dice"),
        }
        if torch.cuda.is_available() and args.accelerator != "cpu":
            out["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        print(json.dumps(out))
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
