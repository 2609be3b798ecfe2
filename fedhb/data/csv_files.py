"""Reading a published CSV file (gzip-compressed or not) row by row, with the checks every dataset needs: the header
has the expected columns, every row has the header's length, and the file is readable; each error names the file
(and the line) and says what to do."""

from __future__ import annotations

import csv
import gzip
from collections.abc import Iterator, Sequence
from pathlib import Path


def checked_rows(path: Path, columns: Sequence[str], expected: str, fix: str) -> Iterator[tuple[int, dict[str, str]]]:
    """``(line number, row)`` of every data row of ``path``.

    Args:
        columns: The columns every row must have.
        expected: What the header should be, for the message (``the header of PadChest's label file``).
        fix: What to do about an unreadable file (``download or reinstall it``).
    """
    opener = gzip.open if path.suffix == ".gz" else open
    kind = "gzip-compressed CSV" if path.suffix == ".gz" else "CSV"
    try:
        with opener(path, "rt", newline="", encoding="utf-8") as handle:  # type: ignore[operator]
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            missing = [c for c in columns if c not in header]
            if missing:
                raise ValueError(f"{path}: line 1: missing columns {missing}; expected {expected}")
            for row in reader:
                if None in row or any(row[c] is None for c in columns):
                    raise ValueError(f"{path}: line {reader.line_num}: {len(header)} columns expected, found a row "
                                     "of another length")
                yield reader.line_num, row
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path}: not a readable {kind} ({type(err).__name__}: {err}); {fix}") from err
