"""One attempt: spawn the script, stream its output, watch for notices, interrupt it in order.

The clock and the notice sources are injected, so the decision logic can be driven by a script
of events; the process is real. Stopping is SIGTERM to the script's whole process group, a grace
period, then SIGKILL.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO

from lightning_grid.contract import Contract
from lightning_grid.launcher.notices import Notice, NoticeSource

__all__ = ["AttemptResult", "attempt_env", "run_attempt"]

_CHUNK = 1 << 20  # bytes of a log copied at once


@dataclass(frozen=True)
class AttemptResult:
    exit_code: int | None
    notice: Notice | None
    notice_at: float | None  # wall-clock time
    sigterm_after_notice_s: float | None
    exit_after_sigterm_s: float | None
    killed_after_grace: bool
    stopped: bool
    seconds: float
    window_s: float | None = None  # time the notice allowed, from the notice to SIGKILL
    escalated: bool = False  # killed at once on the launcher's second interruption (a second Ctrl-C)


def attempt_env(contract: Contract, devices: str | None = None) -> dict[str, str]:
    """The script's environment: ours, plus the contract, plus the devices its instance type gets."""
    env = dict(os.environ)
    env.update(contract.to_env())
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    env["PYTHONUNBUFFERED"] = "1"  # its output reaches the log as it is written
    return env


def _die_with_parent() -> None:
    """In the child: SIGTERM when the launcher dies, so a SIGKILLed launcher leaves no orphan run."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class _Follower(threading.Thread):
    """Echoes the attempt's log file as it grows.

    The script writes to the file itself, not to a pipe the launcher reads: if the launcher dies,
    the script's next print must not fail on a broken pipe while it is saving its checkpoint.
    """

    def __init__(self, path: str, start: int, out: IO[bytes]) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.offset = start
        self.out = out
        self.done = threading.Event()

    def _drain(self) -> None:
        """Copy what is new in bounded chunks: a script that writes hundreds of MB between two polls
        must not make the launcher hold them all at once."""
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            while chunk := handle.read(_CHUNK):
                self.offset += len(chunk)
                self.out.write(chunk)
            self.out.flush()

    def run(self) -> None:
        while not self.done.wait(0.1):
            self._drain()
        self._drain()


def run_attempt(
    command: Sequence[str],
    cwd: str,
    env: dict[str, str],
    log_path: str,
    notices: Sequence[NoticeSource],
    grace_period: float,
    stop_requested: Callable[[], bool],
    on_start: Callable[[int], None],
    on_notice: Callable[[Notice, float], None],
    echo: bool = True,
    on_signalled: Callable[[Notice, float], None] | None = None,
    poll_s: float = 0.1,
    clock: Callable[[], float] = time.monotonic,
    stop_check_s: float = 1.0,
) -> AttemptResult:
    """Run one attempt to its end. Notices are polled every ``poll_s`` (sources rate-limit their own
    network calls); a stop request, which means opening the registry, once every ``stop_check_s``:
    an idle launcher then costs a fraction of a percent of a core."""
    started = clock()
    start_offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0
    # Where the script's output is echoed: decided before it starts (a stdout without a byte
    # buffer, as in a notebook, means no echo rather than an unsupervised script).
    sink = getattr(sys.stdout, "buffer", None) if echo else None
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(command),
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: one signal reaches the script and its children
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
    follower = _Follower(log_path, start_offset, sink) if sink is not None else None
    if follower is not None:
        follower.start()
    notice: Notice | None = None
    notice_mono = sigterm_mono = None
    notice_wall = None
    killed = stopped = escalated = False
    deadline = None
    window = None
    next_stop_check = started
    try:
        on_start(proc.pid)
        while proc.poll() is None:
            if notice is None:
                if clock() >= next_stop_check:
                    stopped = stop_requested()
                    next_stop_check = clock() + stop_check_s
                for source in notices:
                    notice = notice or source.poll()
                if stopped and notice is None:
                    notice = Notice("user", "stopped by the user")
                if notice is not None:
                    notice_mono, notice_wall = clock(), time.time()
                    window = grace_period
                    if notice.deadline is not None:
                        window = max(0.0, min(window, notice.deadline - notice_mono))
                    on_notice(notice, window)  # only what the script must find (the plan file)
                    _signal_group(proc, signal.SIGTERM)
                    sigterm_mono = clock()
                    if on_signalled is not None:  # the story: never before the SIGTERM
                        on_signalled(notice, window)
                    deadline = notice_mono + window
            elif deadline is not None and clock() >= deadline and not killed:
                _signal_group(proc, signal.SIGKILL)
                killed = True
            # A source that asks to escalate (a second Ctrl-C to the launcher): the grace period
            # is not waited out, the whole group is killed now.
            if notice is not None and not killed and any(getattr(s, "escalated", False) for s in notices):
                _signal_group(proc, signal.SIGKILL)
                killed = escalated = True
            time.sleep(poll_s)
    except BaseException:
        # The supervisor itself failed: never leave the script running unsupervised. A second
        # interruption while the script saves (another Ctrl-C) kills it at once.
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_period)
        except subprocess.TimeoutExpired:
            pass
        finally:
            _signal_group(proc, signal.SIGKILL)
        raise
    finally:
        if follower is not None and proc.poll() is not None:
            follower.done.set()
            follower.join(timeout=5)
    exit_code = proc.wait()
    ended = clock()
    # Whatever the script left running in its group goes too: nothing survives an attempt.
    _signal_group(proc, signal.SIGKILL)
    return AttemptResult(
        exit_code=exit_code,
        notice=notice,
        notice_at=notice_wall,
        sigterm_after_notice_s=(sigterm_mono - notice_mono) if sigterm_mono and notice_mono else None,
        exit_after_sigterm_s=(ended - sigterm_mono) if sigterm_mono else None,
        killed_after_grace=killed,
        stopped=stopped,
        seconds=ended - started,
        window_s=window,
        escalated=escalated,
    )


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
