"""The checkpoint writer thread: one long-lived thread per ``Resumable`` that runs its writes.

Why not a new thread per save: ``Thread.start`` returns only once the new thread has been
scheduled, and with every core busy training that took the training thread 2.5–5 ms per periodic
save (measured on a 2-vCPU VM with a 15 MB state saved every 50 steps, where a save cost the
training thread 11–14 ms in all). Handing a job to a thread that is already waiting costs a queue
put. The thread ends after a while with nothing to do, so a callback that is done with (a finished
fit, a test's hundredth instance) leaves no thread behind; the next save starts one again.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("lightning_grid")

#: The writer thread's name (tests and profiles find it by name).
THREAD_NAME = "lightning_grid-checkpoint"


class Job:
    """One write handed to the writer: whether it is still to end, and waiting for it (the
    interface of the ``threading.Thread`` each save used to get)."""

    def __init__(self) -> None:
        self._done = threading.Event()

    def is_alive(self) -> bool:
        return not self._done.is_set()

    def join(self, timeout: float | None = None) -> bool:
        """Whether the job has ended (always, without a timeout)."""
        return self._done.wait(timeout)


class Writer:
    """Runs the jobs handed to it one after another, in the order they came, on a daemon thread
    (a write never keeps a process alive: the callback waits for what must be durable itself)."""

    #: Seconds with no job after which the thread ends.
    IDLE_S = 60.0

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Job, Callable[..., Any], tuple[Any, ...]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Job:
        """``fn(*args)`` on the writer thread, after the jobs before it. ``fn`` reports its own
        failures: an exception that escapes it is logged, and the writer goes on."""
        job = Job()
        with self._lock:
            self._jobs.put((job, fn, args))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
                self._thread.start()
        return job

    def _run(self) -> None:
        while True:
            try:
                job, fn, args = self._jobs.get(timeout=self.IDLE_S)
            except queue.Empty:
                with self._lock:  # a job put while this thread decided to end would never run
                    if self._jobs.empty():
                        self._thread = None
                        return
                continue
            try:
                fn(*args)
            except BaseException:
                log.exception("lightning_grid: the checkpoint writer's job failed")
            finally:
                job._done.set()
                # The job's arguments hold the snapshot: released now, not when the next job comes.
                del job, fn, args
