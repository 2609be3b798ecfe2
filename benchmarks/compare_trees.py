"""Steady round time of two checkouts of fedhb on the same machine, interleaved: did a refactor make rounds slower?

    git worktree add /tmp/fedhb-before <commit>
    python benchmarks/compare_trees.py /tmp/fedhb-before           # this checkout against that one
    python benchmarks/compare_trees.py OLD NEW --clients 10 100 --repeats 5

Each repetition runs ``benchmarks/throughput.py``'s fedhb cell (tiny-vit + LoRA, FedAvg, one process, one torch
thread; round 1 not timed) once in each tree, alternating which goes first, every cell in a fresh process that imports
that tree's ``fedhb`` (``PYTHONPATH``, run from outside both trees). The table gives the median steady round time and
updates/s of each tree and their ratio; on a shared machine only the ratio means much.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parents[1]


def cell(tree: Path, clients: int, rounds: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(tree / "benchmarks" / "throughput.py"), "--cell", "fedhb", "--clients",
                          str(clients), "--rounds", str(rounds)], env=env, cwd=tempfile.gettempdir(),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", type=Path, help="the checkout to compare against")
    parser.add_argument("new", type=Path, nargs="?", default=HERE, help="default: this checkout")
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    print(f"old: {trees['old']}\nnew: {trees['new']}\ncores: {os.cpu_count()}, load average before: "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| clients | old round s | new round s | new / old | old updates/s | new updates/s | accuracy old, new |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for n in args.clients:
        runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
        for rep in range(args.repeats):
            for name in (("old", "new") if rep % 2 == 0 else ("new", "old")):
                runs[name].append(cell(trees[name], n, args.rounds))
        med = {k: float(np.median([r["round_s"] for r in v])) for k, v in runs.items()}
        ups = {k: float(np.median([r["updates_per_s"] for r in v])) for k, v in runs.items()}
        acc = {k: v[-1]["accuracy"] for k, v in runs.items()}
        print(f"| {n} | {med['old']:.3f} | {med['new']:.3f} | {med['new'] / med['old']:.2f}x | {ups['old']:.1f} | "
              f"{ups['new']:.1f} | {acc['old']:.4f}, {acc['new']:.4f} |", flush=True)
    print(f"\nload average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
