"""Wall time of every command whose duration the README or a config header mentions, measured in one go.

    python benchmarks/timings.py              # everything (about 6 minutes on 2 quiet cores)
    python benchmarks/timings.py --only demo smoke

Each command runs as a user would type it, from a scratch folder (so nothing lands in this checkout), with the
machine's default torch threads; the table is what ``README.md``'s "Timings" section records. A command that fails
stops the script with its last lines.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def signal_steps(name: str) -> list[list[str]]:
    config = ROOT / "configs" / f"{name}.yaml"
    from fedhb.data.fixtures_signals import header_commands

    writer, overrides = header_commands(config)
    return [[PY, *writer[1:]], [PY, "-m", "fedhb", "fit", "--config", str(config), *overrides,
                                "--out_dir", f"runs/{name}", "--overwrite", "true"]]


#: name -> (what it is, the commands in order; the first ones that only write fixtures are timed too).
COMMANDS: dict[str, tuple[str, list[list[str]]]] = {
    "quickstart": ("`make quickstart` (`python -m fedhb.quickstart`): IU X-ray reports, EPFL then FedAvg",
                   [[PY, "-m", "fedhb.quickstart", "--config", str(ROOT / "configs" / "quickstart_iu_xray_epfl.yaml"),
                     "--out_dir", "runs/quickstart_iu_xray"]]),
    "quickstart-padchest": ("`make quickstart-padchest` (`python -m fedhb.quickstart_padchest`): PadChest text + "
                            "tabular, FedAvg, EPFL, Local", [[PY, "-m", "fedhb.quickstart_padchest", "--out_dir",
                                                               "runs/quickstart_padchest"]]),
    "demo": ("image demo: `python -m fedhb.data.fixtures --root data/fixture` and "
             "`fedhb fit --config configs/quickstart_organamnist.yaml`",
             [[PY, "-m", "fedhb.data.fixtures", "--root", "data/fixture"],
              [PY, "-m", "fedhb", "fit", "--config", str(ROOT / "configs" / "quickstart_organamnist.yaml")]]),
    "smoke": ("FHBench smoke grid: `python benchmarks/fhbench/grid.py run --smoke --out /tmp/fhbench-smoke`",
              [[PY, str(ROOT / "benchmarks" / "fhbench" / "grid.py"), "run", "--smoke", "--out", "fhbench-smoke"]]),
    "ptbxl": ("PTB-XL header command of `configs/ptbxl_epfl.yaml` (fixture, then the fit)", signal_steps("ptbxl_epfl")),
    "icbhi": ("ICBHI header command of `configs/icbhi_epfl.yaml` (fixture, then the fit)", signal_steps("icbhi_epfl")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(COMMANDS), help="measure these only")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: {cores} cores, {platform.machine()}, python {platform.python_version()}; load average before: "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| command | wall time |\n|---|---:|")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.only or list(COMMANDS):
            what, steps = COMMANDS[name]
            start = time.perf_counter()
            for step in steps:
                done = subprocess.run(step, cwd=scratch, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{name}: {' '.join(step)} failed:\n{(done.stdout + done.stderr)[-2000:]}")
            print(f"| {what} | {time.perf_counter() - start:.0f} s |", flush=True)
    print(f"\nload average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
