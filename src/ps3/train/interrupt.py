"""Ctrl-C and SIGTERM during training: finish the step, save it, stop.

A signal that arrived mid-step (inside the optimizer update, or while a checkpoint is written)
cannot be saved safely where it lands, so :class:`StopRequests` only records it; the step loop
reads :attr:`StopRequests.signal` between steps, saves the step it has finished and returns
(``--resume latest`` continues from there, ``ps3 export`` exports it). A second signal stops at
once (``KeyboardInterrupt``), for a save that hangs.
"""
from __future__ import annotations

import signal
import threading

__all__ = ["StopRequests", "exit_code", "next_batch"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """The shell's exit code for a process ended by ``signum`` (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + int(signum)


class StopRequests:
    """While entered (in the main thread), SIGINT and SIGTERM set :attr:`signal` instead of
    stopping the process; the previous handlers come back on exit. The handler prints nothing: a
    signal can land inside a write to stdout, which Python cannot re-enter."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for signum in _SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum


def next_batch(iterator, stop: StopRequests):
    """The iterator's next batch, or None at its end, or None when it fails after a stop was
    requested: a DataLoader worker dies of the same Ctrl-C a terminal sends this process."""
    try:
        return next(iterator, None)
    except Exception:
        if stop.signal is None:
            raise
        return None
