"""What only a GPU can show (issue 17): FHBench's OrganAMNIST federation on one GPU, sequential and client-batched.

    bash benchmarks/gpu.sh                        # the prepared run (about 5 minutes on an H200)
    python benchmarks/gpu.py --tiny --device cpu  # a smoke test of this driver: tiny model, 1 round, CPU

Workload: ``configs/organamnist_fedavg.yaml`` (FHBench, arXiv 2504.10817: 20 clients, Dirichlet 0.1, each client
split 40/30/30, ViT-B/16 at 224 px with LoRA r=8 alpha=16 on query and value, batch 32, SGD) on fixture data that
fedhb's own writer makes in OrganAMNIST's published format (``fedhb.data.fixtures``; no download on the GPU machine),
with a random-init ViT-B/16 (``transformers.ViTConfig()``'s defaults, saved to a local folder: the machine reaches no
hub), 3 rounds, the global model evaluated every round. Cells, each in a fresh process:

- ``fedavg bf16 sequential``: ``--fabric.precision bf16-mixed``, one client at a time;
- ``fedavg bf16 client_batch 8``: the same with ``--federation.client_batch 8`` (fedhb.batched);
- ``scaffold 16-mixed``, ``apple 16-mixed``: fp16 with Lightning's loss scaler, the algorithms that read gradients
  (SCAFFOLD corrects them, APPLE differentiates its mixture): the run must finish with finite losses;
- ``state swaps``: the client states of a CUDA loop are page-locked, and loading one into the model queues
  non-blocking copies (timed against blocking ones).

Per cell: steady round (median of rounds 2..), client updates per second in it, ``torch.cuda.max_memory_allocated``,
and from ``nvidia-smi`` sampled every 200 ms the peak memory used and the mean utilisation. The table goes to stdout
and to ``--out`` (markdown, plus a JSON of every figure).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
CELLS: dict[str, list[str]] = {
    "fedavg bf16 sequential": ["--fabric.precision", "bf16-mixed"],
    "fedavg bf16 client_batch 8": ["--fabric.precision", "bf16-mixed", "--federation.client_batch", "8"],
    "scaffold 16-mixed": ["--fabric.precision", "16-mixed", "--algorithm", "SCAFFOLD"],
    "apple 16-mixed": ["--fabric.precision", "16-mixed", "--algorithm", "APPLE"],
}


def prepare(folder: Path, tiny: bool) -> tuple[Path, Path]:
    """The fixture data and the random-init ViT folder (ViT-B/16 at 224 px; ``tiny``: 2 layers of 32 at 28 px)."""
    import torch
    from transformers import ViTConfig, ViTModel

    from fedhb.data.fixtures import write_medmnist_fixture

    size = 28 if tiny else 224
    data = folder / "data"
    # 4,000 samples pooled (FHBench's 20% of OrganAMNIST is 11,800): 1,600 training samples a round, 80 per client.
    write_medmnist_fixture(data, "organamnist", size, (240, 0, 60) if tiny else (3200, 0, 800), seed=0)
    model = folder / "vit"
    torch.manual_seed(0)
    config = (ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64) if tiny else ViTConfig(num_channels=1))
    ViTModel(config, add_pooling_layer=False).save_pretrained(model)
    return data, model


def fit_args(data: Path, model: Path, out: Path, tiny: bool, rounds: int, device: str) -> list[str]:
    return ["fit", "--config", str(ROOT / "configs" / "organamnist_fedavg.yaml"), "--data.root", str(data),
            "--data.size", "28" if tiny else "224", "--data.download", "false", "--data.fraction", "1.0",
            "--model.backbone", str(model), "--federation.rounds", str(rounds), "--federation.eval_every", "1",
            "--fabric.accelerator", device, "--out_dir", str(out), "--overwrite", "true",
            "--checkpoint.minutes", "0", *(["--partition.num_clients", "4"] if tiny else [])]


# -- one cell, in its own process ----------------------------------------------------------------------------------
def run_cell(args: list[str], result: Path) -> None:
    """``fedhb fit args`` in this process; its rounds and the CUDA allocator's peak go to ``result``."""
    import torch

    from fedhb.cli import main

    main(args)
    out = Path(args[args.index("--out_dir") + 1])
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    result.write_text(json.dumps({"history": history, "max_memory_allocated": peak,
                                  "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none"}))


def swap_check(data: Path, model: Path, tiny: bool, device: str, result: Path) -> None:
    """Whether a loop's client states are page-locked (they must be on CUDA, not on CPU), and the time to load a
    client's state into the model with non-blocking copies (fedhb's) and with blocking ones."""
    import torch

    from fedhb.algorithms import FedAvg
    from fedhb.build import build_loop
    from fedhb.config import FabricArgs, FederationArgs, ModelArgs, OptimArgs, PartitionArgs
    from fedhb.data import MedMNIST
    from fedhb.fit import prepare_partition
    from fedhb.strategy import make_fabric

    fabric = make_fabric(FabricArgs(accelerator=device))
    fabric.launch()
    samples, splits, _ = prepare_partition(MedMNIST(root=str(data), size=28 if tiny else 224),
                                           PartitionArgs(num_clients=4 if tiny else 20), 42)
    loop = build_loop(fabric, samples, splits, FedAvg(), model=ModelArgs(backbone=str(model)),
                      federation=FederationArgs(rounds=1), optim=OptimArgs(), seed=42)
    pinned = all(t.is_pinned() for s in loop.states.values() for t in s.values()) if device == "cuda" else False
    params = loop.client_module.trainable()

    def swaps(non_blocking: bool, n: int = 200) -> float:
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        for i in range(n):
            state = loop.states[loop.mine[i % len(loop.mine)]]
            if non_blocking:
                loop.load(state)
            else:
                with torch.no_grad():
                    for k in loop.model_names:
                        params[k].copy_(state[k])
        sync()
        return (time.perf_counter() - t) / n

    swaps(True, 10)
    blocking, queued = swaps(False), swaps(True)
    last = loop.states[loop.mine[-1]]
    loop.load(last)
    loaded = all(torch.equal(params[k].detach().cpu(), last[k]) for k in loop.model_names)
    result.write_text(json.dumps({"pin_states": loop.pin_states, "pinned": pinned, "loaded_exactly": loaded,
                                  "swap_ms_non_blocking": 1000 * queued, "swap_ms_blocking": 1000 * blocking,
                                  "state_bytes": sum(t.numel() * t.element_size() for t in loop.states[0].values())}))


# -- the parent: cells in fresh processes, nvidia-smi sampled beside them ------------------------------------------
class Smi:
    """``nvidia-smi`` sampled every 200 ms while a cell runs: peak memory used (MiB) and mean utilisation (%)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self.proc: subprocess.Popen[str] | None = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                          "--format=csv,noheader,nounits", "-lms", "200"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                util, mem = (float(x) for x in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((util, mem))

    def stop(self) -> dict[str, float | None]:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
        busy = [u for u, _ in self.samples]
        return {"smi_util_mean": sum(busy) / len(busy) if busy else None,
                "smi_mem_peak_mib": max((m for _, m in self.samples), default=None)}


def child(cmd: list[str], log: Path) -> tuple[int, float, dict[str, float | None]]:
    smi = Smi()
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            cwd=ROOT).returncode
    return rc, time.perf_counter() - start, smi.stop()


def summarise(name: str, rc: int, wall: float, smi: dict[str, Any], result: Path, log: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"cell": name, "rc": rc, "wall_s": wall, **smi}
    if rc != 0 or not result.is_file():
        row["error"] = " ".join(log.read_text().strip().splitlines()[-1:])[-300:] if log.is_file() else "no log"
        return row
    got = json.loads(result.read_text())
    if "history" not in got:
        return {**row, **got}
    hist = got["history"]
    steady = hist[1:] or hist
    times = sorted(h["round_time_s"] for h in steady)
    round_s = times[len(times) // 2]
    updates = sorted(h["clients_trained"] / h["round_time_s"] for h in steady)[len(steady) // 2]
    finite = all(h["train_loss"] == h["train_loss"] and abs(h["train_loss"]) < float("inf") for h in hist)
    return {**row, "gpu": got["gpu"], "round_s": round_s, "round1_s": hist[0]["round_time_s"],
            "updates_per_s": updates, "max_memory_allocated_mib": got["max_memory_allocated"] / 2**20,
            "finite_losses": finite, "personalized_acc": hist[-1].get("personalized_acc")}


def table(rows: list[dict[str, Any]], header: str) -> str:
    def f(x: Any, fmt: str) -> str:
        return "—" if x is None else format(x, fmt)

    lines = [header, "", "| cell | steady round s | round 1 s | client updates/s | max_memory_allocated MiB | "
             "nvidia-smi peak MiB | nvidia-smi util % | finite losses | pers. acc |", "|---|---:|---:|---:|---:|---:|"
             "---:|---|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['cell']} | failed (rc {r['rc']}): {r['error']} | | | | | | | |")
        elif "round_s" in r:
            lines.append(f"| {r['cell']} | {r['round_s']:.3f} | {r['round1_s']:.3f} | {r['updates_per_s']:.1f} | "
                         f"{r['max_memory_allocated_mib']:,.0f} | {f(r['smi_mem_peak_mib'], ',.0f')} | "
                         f"{f(r['smi_util_mean'], '.0f')} | {r['finite_losses']} | {f(r['personalized_acc'], '.3f')} |")
    by = {r["cell"]: r for r in rows}
    seq, bat = by.get("fedavg bf16 sequential", {}), by.get("fedavg bf16 client_batch 8", {})
    if "updates_per_s" in seq and "updates_per_s" in bat:
        lines += ["", f"client_batch 8 / sequential client updates per second: "
                      f"{bat['updates_per_s'] / seq['updates_per_s']:.2f}x (target: at least 3x)"]
    swap = by.get("state swaps")
    if swap and "pinned" in swap:
        lines += ["", f"state swaps: page-locked client states {swap['pinned']} (loop.pin_states "
                      f"{swap['pin_states']}), loaded exactly {swap['loaded_exactly']}; one client's state "
                      f"({swap['state_bytes'] / 2**20:.2f} MiB) in {swap['swap_ms_non_blocking']:.3f} ms non-blocking, "
                      f"{swap['swap_ms_blocking']:.3f} ms blocking"]
    elif swap:
        lines += ["", f"state swaps: failed (rc {swap['rc']}): {swap.get('error')}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny ViT at 28 px, 4 clients, 300 samples (smoke test)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cells", nargs="*", default=[*CELLS, "state swaps"], help="which cells to run")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedhb_gpu"), help="scratch folder")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/gpu_results.md"))
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell == "fit":
        run_cell(args.args, args.result)
        return
    if args.cell == "swap":
        swap_check(args.work / "data", args.work / "vit", args.tiny, args.device, args.result)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    data, model = prepare(args.work, args.tiny)
    print(f"prepared fixture and model in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    rows = []
    for name in args.cells:
        slug = name.replace(" ", "_")
        result, log = args.work / f"{slug}.json", args.work / f"{slug}.log"
        result.unlink(missing_ok=True)
        common = [sys.executable, str(HERE), "--work", str(args.work), "--device", args.device, "--result", str(result)]
        if name == "state swaps":
            cmd = [*common, "--cell", "swap", *(["--tiny"] if args.tiny else [])]
        else:
            fit = fit_args(data, model, args.work / slug, args.tiny, args.rounds, args.device) + CELLS[name]
            cmd = [*common, "--cell", "fit", "--", *fit]
        rc, wall, smi = child(cmd, log)
        rows.append(summarise(name, rc, wall, smi, result, log))
        print(f"{name}: rc {rc}, {wall:.1f} s", file=sys.stderr, flush=True)
    gpu = next((r["gpu"] for r in rows if r.get("gpu")), "none")
    text = table(rows, f"fedhb on {gpu} ({args.device}); {args.rounds} rounds; {time.strftime('%Y-%m-%d %H:%M')}")
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
