"""Turn termination signals into a flag the training loop acts on at a safe point.

Saving inside a signal handler could interrupt a half-finished optimizer step, so during ``fit``
the handler does nothing but remember the signal (as Lightning's own connector does); the callback
decides when the state is consistent.

From the first ``fit`` of a :class:`~lightning_grid.Resumable` on, the process keeps one handler
(:data:`guard`) until it is gone: a notice is an interruption wherever it lands (in ``test()``, in
the script's own code after ``fit``, while the interpreter exits), never something that kills the
process with the signal's default action. Once the process is on its way out the signals are set
to ``SIG_IGN``: CPython's finalization resets Python-level handlers to ``SIG_DFL`` (so a second
SIGTERM during the exit would kill it with -15) but leaves ``SIG_IGN`` alone.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

__all__ = ["SignalFlag", "ExitGuard", "guard"]

log = logging.getLogger("lightning_grid")


class SignalFlag:
    """One fit's "a stop signal came" flag. While installed, the process handler reports to it."""

    def __init__(self, signals: Iterable[int]) -> None:
        self.signals = [signal.Signals(s) for s in signals]
        self.received: signal.Signals | None = None
        self.count = 0
        self._previous: dict[signal.Signals, Any] = {}

    def __bool__(self) -> bool:
        return self.received is not None

    def _record(self, sig: signal.Signals) -> None:
        self.count += 1
        if self.received is None:
            self.received = sig
        # A second signal while saving changes nothing: the save in progress completes and commits,
        # and the process exits as planned. Only SIGKILL can cut it short, and that leaves the
        # previous committed checkpoint in force.

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        guard.handler(signum, frame)

    def install(self) -> bool:
        """(Re)install the handler; returns False where Python forbids it (not the main thread)."""
        guard.attach(self)
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in self.signals:
            current = signal.getsignal(sig)
            if current is not guard.handler:
                self._previous.setdefault(sig, current)
                signal.signal(sig, guard.handler)
        return True

    def uninstall(self) -> None:
        """The fit is over. Once the guard is armed it stays in charge of the signals; otherwise the
        handlers found at install are put back."""
        guard.detach(self)
        if threading.current_thread() is not threading.main_thread():
            return
        if guard.armed:
            guard.take_over(self.signals)
            self._previous.clear()
            return
        for sig, previous in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def set(self, sig: int = signal.SIGTERM) -> None:
        if self.received is None:
            self.received = signal.Signals(sig)


class ExitGuard:
    """The process-wide handler, from the first resumable ``fit`` until the process is gone.

    During a fit it reports each signal to that fit's :class:`SignalFlag` (the callback acts at a
    clean cut). Outside a fit it calls ``on_signal`` once, which records the interruption and
    leaves (``SystemExit(0)``). At interpreter exit ``at_exit`` runs with the signals already
    ignored, so that nothing after it can turn into a kill.
    """

    def __init__(self) -> None:
        self.signals: set[signal.Signals] = set()
        self.received: signal.Signals | None = None
        self.armed = False
        self.leaving = False  # the process is on its way out: further signals change nothing
        self.exiting = False  # the exit hook ran
        self.on_signal: Callable[[signal.Signals], None] | None = None
        self.at_exit: Callable[[], None] | None = None
        self._flags: list[SignalFlag] = []
        self._registered = False

    def arm(
        self,
        signals: Iterable[int],
        on_signal: Callable[[signal.Signals], None],
        at_exit: Callable[[], None],
    ) -> None:
        self.signals.update(signal.Signals(s) for s in signals)
        self.on_signal = on_signal
        self.at_exit = at_exit
        self.armed = True
        if not self._registered:
            # Registered now, so it runs before the exit hooks registered earlier (multiprocessing's,
            # logging's): those run with the signals already ignored.
            atexit.register(self._exit_hook)
            self._registered = True

    def attach(self, flag: SignalFlag) -> None:
        if flag not in self._flags:
            self._flags.append(flag)

    def detach(self, flag: SignalFlag) -> None:
        with contextlib.suppress(ValueError):
            self._flags.remove(flag)

    def take_over(self, signals: Iterable[signal.Signals]) -> None:
        """Handle ``signals`` outside a fit (main thread only)."""
        for sig in signals:
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, signal.SIG_IGN if self.leaving else self.handler)

    def handler(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if self.received is None:
            self.received = sig
        if self.leaving or self.exiting or not threading.main_thread().is_alive():
            # On the way out (the main thread is stopped once the interpreter starts to exit).
            self.ignore()
            return
        flags = list(self._flags)
        if flags:
            for flag in flags:
                flag._record(sig)
            return
        if not self.armed or self.on_signal is None:
            return
        self.leave()
        self.on_signal(sig)

    def leave(self) -> None:
        """The process is about to exit because of a signal: from now on, signals change nothing."""
        self.leaving = True
        self.ignore()

    def ignore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.signals:
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, signal.SIG_IGN)

    def _exit_hook(self) -> None:
        self.exiting = True
        if not self.armed:
            return
        self.ignore()
        if self.at_exit is not None:
            try:
                self.at_exit()
            except Exception as exc:  # an exit hook must not turn a clean exit into a traceback
                log.warning("lightning_grid: writing the exit marker failed: %s", exc)


guard = ExitGuard()
