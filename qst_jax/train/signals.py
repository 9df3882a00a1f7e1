"""Stopping a run cleanly on SIGINT/SIGTERM: the loop sees the signal, saves a checkpoint and returns."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
from collections.abc import Iterator


@dataclasses.dataclass
class Stop:
    signal: int | None = None


@contextlib.contextmanager
def catch_signals() -> Iterator[Stop]:
    """SIGINT/SIGTERM set `stop.signal` instead of killing the run (main thread only)."""
    stop, handlers = Stop(), {}

    def on_signal(signum, _frame):
        stop.signal = signum

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            handlers[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread
            pass
    try:
        yield stop
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
