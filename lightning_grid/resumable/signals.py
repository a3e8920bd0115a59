"""Turn termination signals into a flag the training loop acts on at a safe point.

Saving inside a signal handler could interrupt a half-finished optimizer step, so the handler does
nothing but remember the signal (as Lightning's own connector does); the callback decides when the
state is consistent. Handlers we replace are put back on teardown.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterable
from types import FrameType
from typing import Any

__all__ = ["SignalFlag"]


class SignalFlag:
    def __init__(self, signals: Iterable[int]) -> None:
        self.signals = [signal.Signals(s) for s in signals]
        self.received: signal.Signals | None = None
        self.count = 0
        self._previous: dict[signal.Signals, Any] = {}

    def __bool__(self) -> bool:
        return self.received is not None

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self.received is None:
            self.received = signal.Signals(signum)
        # A second signal while saving changes nothing: the save in progress completes and commits,
        # and the process exits as planned. Only SIGKILL can cut it short, and that leaves the
        # previous committed checkpoint in force.

    def install(self) -> bool:
        """(Re)install our handler; returns False where Python forbids it (not the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in self.signals:
            current = signal.getsignal(sig)
            if current is not self._handler:
                self._previous.setdefault(sig, current)
                signal.signal(sig, self._handler)
        return True

    def uninstall(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def set(self, sig: int = signal.SIGTERM) -> None:
        if self.received is None:
            self.received = signal.Signals(sig)
