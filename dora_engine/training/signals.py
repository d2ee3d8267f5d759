"""Stopping a run on SIGTERM / SIGINT (docs/design.md section 6, "Stopping train").

A signal is recorded, not acted on at once: the loop finishes the current optimizer step, saves a
checkpoint and exits; a signal that arrives while the run is still starting (data, reference pass,
engine) stops it before its first step. A second SIGINT interrupts at once (``KeyboardInterrupt``).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """The stop request of one run: ``received`` is the name of the first stop signal (or of whatever
    else asked the run to stop), None while none has."""

    def __init__(self) -> None:
        self.received: str | None = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self.received = self.received or signal.Signals(signum).name

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        """Record SIGTERM / SIGINT in this object inside the block (the previous handlers come back after
        it). Outside the main thread, where Python allows no handler, the block runs without."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
