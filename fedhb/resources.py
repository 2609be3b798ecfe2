"""What the machine offers a run: the CPU cores this process may use, and a warning when a run asks for more."""

from __future__ import annotations

import os


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, e.g. under SLURM or taskset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_oversubscription_warning(processes: int, cores: int) -> str | None:
    """One line to print when ``processes`` CPU processes would share fewer ``cores``; ``None`` when they fit.

    Oversubscribing gives the same numbers (a federation is identical on any number of processes) but runs slower
    than fewer processes would, as they take turns on the cores; nothing else tells the user so.
    """
    if processes <= cores:
        return None
    return (f"fedhb: warning: --fabric.devices {processes} starts {processes} CPU processes on {cores} "
            f"core{'s' if cores != 1 else ''}: they take turns on the cores, so the run is slower than with "
            f"--fabric.devices {max(1, cores)} (the numbers are the same on any number of processes)")


def memory_status() -> dict[str, int]:
    """This process's ``VmHWM`` (peak resident set), ``VmRSS``, ``RssAnon`` (its own memory) and ``RssFile`` (mapped
    file pages), in kB, from ``/proc/self/status`` (Linux; ``{}`` elsewhere): what the benchmarks report."""
    from pathlib import Path

    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0])
    return out
