"""Stopping a run at a safe point: SIGINT (Ctrl-C) and SIGTERM (what SLURM sends before it kills a job).

While a federation runs, either signal only sets a flag and prints one line; the loop finishes the round in progress,
every rank agrees to stop at the same round, the run is checkpointed, and ``fedhb fit`` exits with 128 + the signal
number (130 for Ctrl-C, 143 for SIGTERM) after one line saying how to resume. A second signal stops at once
(``KeyboardInterrupt``); the rounds in the last checkpoint are kept.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):  # noqa: N818 - it is what happened, not an error in the program
    """The run stopped at a round boundary on a signal, its state checkpointed.

    Attributes:
        signum: The signal that stopped it.
        exit_code: ``128 + signum``, the shell's convention (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class StopRequest:
    """A context manager that turns SIGINT and SIGTERM into a flag while it is active (main thread only).

    Args:
        announce: Print the one-line notice when the first signal arrives (rank 0 only).
    """

    def __init__(self, announce: bool = True) -> None:
        self.signum = 0
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in _SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum:
            raise KeyboardInterrupt  # the second signal: stop now
        self.signum = signum
        if self.announce:
            print(f"fedhb: {signal.Signals(signum).name} received: stopping after the round in progress and saving a "
                  "checkpoint (send it again to stop at once)", file=sys.stderr, flush=True)
