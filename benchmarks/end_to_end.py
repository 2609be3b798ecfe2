"""fedhb end to end against the simplest loop: one model copy per client in plain PyTorch (PFLlib, FLamby).

    python benchmarks/end_to_end.py            # 3 batches x 3 runs of each runner (about 8 minutes on 2 cores)
    python benchmarks/end_to_end.py --quick    # 1 batch x 1 run: a smoke test

Workload (issue 17): 20 clients, Dirichlet 0.1 over 11 classes, 4,000 training and 800 test images of 28 px (one
channel; the learnable OrganAMNIST-format fixture), a random-init ViT with hidden size 64, 4 layers, 4 heads, patch 7
(saved once to a local folder, so both runners load the same weights), LoRA r=8 alpha=16 on query and value plus a
linear head (8,907 trainable parameters), 1 local epoch, batch 32, SGD at a constant 0.05, FedAvg, 5 rounds, the
global model evaluated every round.

Runners, each in fresh processes, interleaved within every batch:

- ``fedhb 1``: ``fedhb fit`` on one process; ``fedhb 2``: on two (``--fabric.devices 2 --fabric.strategy ddp``);
- ``copy``: this file's ``--cell copy``, plain PyTorch with transformers' ViT and peft's LoRA (it imports neither fedhb
  nor Lightning): the same partition, initial weights and data order (prepared once by this script with fedhb's own
  partition and model builder; per-client seeds as fedhb draws them), a ``deepcopy`` of the model per client, clients
  trained one after another, every trainable tensor averaged by sample count, each client handed the average, every
  client's test split scored. It must reach fedhb's accuracy in every round (checked), so both do the same work.

Each runner uses its default torch threads (fedhb gives each of its processes cores // processes). The table gives
medians over all runs, with the range of the batch medians in brackets: the steady round (rounds 2 to 5), the whole
run from process start to exit, and the peak resident memory summed over the process tree (sampled every 20 ms), each
also as a ratio to the copy loop.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve()
SEED, CLIENTS, ROUNDS, BATCH, LR, ALPHA = 42, 20, 5, 32, 0.05, 0.1
TRAIN, TEST = 4000, 800
SPLIT = (TRAIN / (TRAIN + TEST), 0.0, TEST / (TRAIN + TEST))  # each client's train/val/test


def prepare(folder: Path) -> tuple[Path, Path, Path]:
    """The fixture file, the random-init ViT folder, and what the copy loop starts from (written once per invocation
    by this process, which imports fedhb; the measured copy-loop processes never do)."""
    import torch
    from transformers import ViTConfig, ViTModel

    from fedhb.build import build_module
    from fedhb.config import ModelArgs, OptimArgs, PartitionArgs
    from fedhb.data import MedMNIST
    from fedhb.data.fixtures import write_medmnist_fixture
    from fedhb.fit import prepare_partition
    from fedhb.models.lora import resolve_target_modules

    data = folder / "data"
    write_medmnist_fixture(data, "organamnist", 28, (TRAIN, 0, TEST), seed=0)
    model = folder / "vit"
    torch.manual_seed(0)
    config = ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=64, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=128)
    vit = ViTModel(config, add_pooling_layer=False)
    vit.save_pretrained(model)
    # fedhb's partition (fit's own function) and fedhb's initial adapter and head (its own builder, from the seed).
    samples, splits, _ = prepare_partition(MedMNIST(root=str(data), size=28), PartitionArgs(
        num_clients=CLIENTS, alpha=ALPHA, split=SPLIT), SEED)
    module = build_module(ModelArgs(backbone=str(model)), samples, OptimArgs(lr=LR, schedule="constant"), SEED)
    start = folder / "copy_start.pt"
    torch.save({"tensors": module.prepare(samples), "splits": [(s.train, s.test) for s in splits],
                "trainable": module.get_state(), "targets": resolve_target_modules(vit, ["query", "value"]),
                "classes": samples.num_classes}, start)
    return data, model, start


def fit_args(data: Path, model: Path, out: Path) -> list[str]:
    return ["--data", "MedMNIST", "--data.root", str(data), "--data.size", "28", "--algorithm", "FedAvg",
            "--seed", str(SEED), "--partition.num_clients", str(CLIENTS), "--partition.alpha", str(ALPHA),
            "--partition.split", json.dumps(list(SPLIT)), "--model.backbone", str(model),
            "--federation.rounds", str(ROUNDS), "--federation.batch_size", str(BATCH),
            "--federation.eval_every", "1", "--optim.name", "sgd", "--optim.lr", str(LR),
            "--optim.schedule", "constant", "--fabric.accelerator", "cpu", "--out_dir", str(out), "--overwrite",
            "true"]


# -- the model-copy loop --------------------------------------------------------------------------------------------
def copy_cell(model_dir: Path, start: Path) -> dict[str, Any]:
    """One model copy per client in plain PyTorch (transformers' ViT, peft's LoRA, a linear head; no fedhb, no
    Lightning), from the same initial weights, partition and per-client seeds as fedhb."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from torch import nn
    from transformers import ViTModel

    prep = torch.load(start, weights_only=False)
    tensors, splits = prep["tensors"], prep["splits"]

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            vit = ViTModel.from_pretrained(model_dir, add_pooling_layer=False)
            for p in vit.parameters():
                p.requires_grad_(False)
            self.vit = inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, target_modules=prep["targets"]), vit)
            self.head = nn.Sequential(nn.Dropout(0.0), nn.Linear(64, prep["classes"]))

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            x = (pixels.float() / 255.0 - 0.5) / 0.5  # fedhb's ViT normalisation (mean = std = 0.5)
            return self.head(self.vit(pixel_values=x).last_hidden_state[:, 0])

    server = Net()
    own = {n: p for n, p in server.named_parameters() if "lora" in n or n.startswith("head.")}
    for p in own.values():  # fedhb names these encoders.image.model.* and head.*
        p.requires_grad_(True)
    with torch.no_grad():
        for name, value in prep["trainable"].items():
            own[name.replace("encoders.image.model.", "vit.")].copy_(value)
    clients = [copy.deepcopy(server) for _ in splits]
    params = [[p for n, p in m.named_parameters() if n in own] for m in clients]
    optimizers = [torch.optim.SGD(ps, lr=LR) for ps in params]
    sizes = torch.tensor([len(train) for train, _ in splits], dtype=torch.float64)
    weights = (sizes / sizes.sum()).tolist()
    history = []
    for rnd in range(1, ROUNDS + 1):
        began = time.perf_counter()
        for c, (m, opt, (train, _)) in enumerate(zip(clients, optimizers, splits)):
            seed = client_seed(SEED, rnd, c)
            torch.manual_seed(seed)  # dropout masks, as fedhb seeds them
            order = torch.Generator().manual_seed(seed)
            m.train()
            perm = torch.randperm(len(train), generator=order)
            for s in range(0, len(perm), BATCH):
                rows = torch.from_numpy(train[perm[s:s + BATCH].numpy()])
                loss = nn.functional.cross_entropy(m(tensors["pixels"][rows]), tensors["labels"][rows])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # FedAvg by sample count, in float64, then every client gets the average
            for j in range(len(params[0])):
                total = torch.zeros(params[0][j].shape, dtype=torch.float64)
                for w, ps in zip(weights, params):
                    total.add_(ps[j].to(torch.float64), alpha=w)
                for ps in params:
                    ps[j].copy_(total.to(ps[j].dtype))
        correct, total_n, accs = 0, 0, []
        with torch.no_grad():
            for m, (_, test) in zip(clients, splits):
                m.eval()
                hits = 0
                for s in range(0, len(test), 256):
                    rows = torch.from_numpy(test[s:s + 256])
                    hits += int((m(tensors["pixels"][rows]).argmax(1) == tensors["labels"][rows]).sum())
                if len(test):
                    accs.append(hits / len(test))
                correct, total_n = correct + hits, total_n + len(test)
        history.append({"round": rnd, "personalized_acc": float(np.mean(accs)), "global_acc": correct / total_n,
                        "round_time_s": time.perf_counter() - began})
    return {"history": history}


def client_seed(seed: int, rnd: int, client: int) -> int:
    """fedhb's per-client seed (fedhb.seeds.client_seed), restated so the copy loop imports nothing of fedhb."""
    return int(np.random.SeedSequence([seed, rnd, client]).generate_state(1)[0])


# -- measuring ------------------------------------------------------------------------------------------------------
def _tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (Linux /proc)."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            continue
    return total


def measure(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """Run ``cmd``; its wall time from start to exit, the peak of its process tree's summed RSS, its stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.02)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed:\n{err[-3000:]}")
    return wall, peak[0], out


def run(runner: str, data: Path, model: Path, start: Path, out: Path, env: dict[str, str]) -> dict[str, Any]:
    if runner == "copy":
        wall, peak, stdout = measure([sys.executable, str(HERE), "--cell", "copy", "--model", str(model), "--start",
                                      str(start)], env)
        history = json.loads(stdout.strip().splitlines()[-1])["history"]
    else:
        extra = ["--fabric.devices", "2", "--fabric.strategy", "ddp"] if runner == "fedhb 2" else []
        wall, peak, _ = measure([sys.executable, "-m", "fedhb", "fit", *fit_args(data, model, out), *extra], env)
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"wall": wall, "peak": peak, "round": float(np.median([h["round_time_s"] for h in history[1:]])),
            "acc": [h["personalized_acc"] for h in history], "global": [h["global_acc"] for h in history]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one batch of one run per runner")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3, help="runs per runner and batch")
    parser.add_argument("--cell", choices=["copy"], help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--start", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell == "copy":
        print(json.dumps(copy_cell(args.model, args.start)), flush=True)
        return
    batches, runs = (1, 1) if args.quick else (args.batches, args.runs)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(key, None)  # each runner with its default threads
    runners = ("copy", "fedhb 1", "fedhb 2")
    results: dict[str, list[list[dict[str, Any]]]] = {r: [] for r in runners}
    with tempfile.TemporaryDirectory() as tmp:
        data, model, start = prepare(Path(tmp))
        for b in range(batches):
            batch: dict[str, list[dict[str, Any]]] = {r: [] for r in runners}
            for k in range(runs):
                order = runners[k % 3:] + runners[:k % 3]  # who goes first rotates
                for r in order:
                    batch[r].append(run(r, data, model, start, Path(tmp) / f"run-{r.replace(' ', '')}", env))
            for r in runners:
                results[r].append(batch[r])
            print(f"batch {b + 1}/{batches} done", file=sys.stderr, flush=True)
    reference = results["copy"][0][0]
    # The same work: every run of every runner reaches the copy loop's accuracy in every round (to float32 rounding:
    # torchmetrics divides in float32, the copy loop in float64; one test sample more or less would be >= 1e-3).
    for r in runners:
        for batch in results[r]:
            for one in batch:
                np.testing.assert_allclose(one["acc"], reference["acc"], rtol=0, atol=1e-6, err_msg=r)
                np.testing.assert_allclose(one["global"], reference["global"], rtol=0, atol=1e-6, err_msg=r)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: {cores} cores; load average at the end {', '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{batches} batches x {runs} runs per runner; accuracy per round (all runners, checked equal): "
          f"{', '.join(f'{a:.4f}' for a in reference['acc'])}\n")

    def stat(r: str, key: str) -> tuple[float, float, float]:
        per_batch = [float(np.median([one[key] for one in batch])) for batch in results[r]]
        return float(np.median([one[key] for batch in results[r] for one in batch])), min(per_batch), max(per_batch)

    print("| | model-copy loop | fedhb, 1 process | fedhb, 2 processes |\n|---|---|---|---|")
    for key, name, unit in (("round", "steady round", "s"), ("wall", "whole run, start to exit", "s"),
                            ("peak", "peak RSS, all processes", "MB")):
        base = stat("copy", key)[0]
        cells = []
        for r in runners:
            med, lo, hi = stat(r, key)
            scale = 2 ** -20 if unit == "MB" else 1
            value = f"{med * scale:,.0f} MB" if unit == "MB" else f"{med:.3f} s"
            ratio = "" if r == "copy" else f" = {med / base:.2f}x [{lo / base:.2f}-{hi / base:.2f}]"
            cells.append(value + ratio)
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
