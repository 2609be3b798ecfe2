"""Checks on the paths a run writes to, made before any work starts, each naming the flag and the path."""

from __future__ import annotations

from pathlib import Path


def check_out_dir(path: str | Path) -> None:
    """Refuse an ``--out_dir`` that cannot become a folder: it, or a folder above it, is an existing file.

    Without this check the run loads its data and model first and then fails in ``mkdir`` with ``[Errno 17] File
    exists`` (or ``[Errno 20] Not a directory``), naming neither the flag nor which path is the file.

    Raises:
        FileExistsError: Naming ``--out_dir``, the file and what to do.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out_dir {out} is a file, not a folder: choose another --out_dir, or move or delete "
                              "the file")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FileExistsError(f"--out_dir {out}: {parent} is a file, not a folder, so the run folder cannot "
                                      "be made below it; choose another --out_dir")
            break
