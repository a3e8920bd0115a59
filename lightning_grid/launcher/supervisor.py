"""One attempt: spawn the script, stream its output, watch for notices, interrupt it in order.

The clock and the notice sources are injected, so the decision logic can be driven by a script
of events; the process is real. Stopping is SIGTERM to the script's whole process group, a grace
period, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO

import psutil

from lightning_grid.contract import Contract
from lightning_grid.launcher.nodes import workers_of
from lightning_grid.launcher.notices import Notice, NoticeSource
from lightning_grid.launcher.processes import die_with_parent

__all__ = ["AttemptResult", "Launch", "NodeResult", "PEER_GRACE_S", "attempt_env", "run_attempt"]

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
    nodes: tuple[NodeResult, ...] = ()  # multi-node (torchrun) attempts: one per node
    lost_node: int | None = None  # a node that died without notice (killed by a signal not ours)
    failed_node: int | None = None  # a node whose process failed on its own while others ran


def attempt_env(contract: Contract, devices: str | None = None) -> dict[str, str]:
    """The script's environment: ours, plus the contract, plus the devices its instance type gets."""
    env = dict(os.environ)
    env.update(contract.to_env())
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    env["PYTHONUNBUFFERED"] = "1"  # its output reaches the log as it is written
    return env


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


@dataclass(frozen=True)
class Launch:
    """One process of an attempt: the script itself, or one node's torchrun agent."""

    command: Sequence[str]
    env: dict[str, str]
    torchrun: bool = False  # signal its workers on a notice, not the agent (see launcher.nodes)


@dataclass(frozen=True)
class NodeResult:
    """How one node's process ended (multi-node attempts: one per torchrun agent)."""

    node: int
    pid: int
    exit_code: int | None
    noticed: bool  # the notice was delivered to this node
    lost: bool  # ended by a signal the launcher never sent: the machine went away without notice
    stopped: bool = False  # told to stop by the launcher because another node could not go on


#: After a node is lost, how long the others get before SIGKILL. They cannot save (a checkpoint
#: needs every rank) and may be stuck in a collective that waits for the lost peer.
PEER_GRACE_S = 10.0


def run_attempt(
    command: Sequence[str] | Sequence[Launch],
    cwd: str,
    env: dict[str, str] | None,
    log_path: str,
    notices: Sequence[NoticeSource],
    grace_period: float,
    stop_requested: Callable[[], bool | str],
    on_start: Callable[[int], None],
    on_notice: Callable[[Notice, float], None],
    echo: bool = True,
    on_signalled: Callable[[Notice, float], None] | None = None,
    poll_s: float = 0.1,
    clock: Callable[[], float] = time.monotonic,
    stop_check_s: float = 1.0,
) -> AttemptResult:
    """Run one attempt to its end: one process (``command`` and ``env``), or one per node
    (``command`` a list of :class:`Launch`, ``env`` None). Notices are polled every ``poll_s``
    (sources rate-limit their own network calls); a stop request, which means opening the
    registry, once every ``stop_check_s``: an idle launcher then costs a fraction of a percent of
    a core.

    A notice naming a node (:attr:`Notice.node`) is delivered to that node only: its ranks tell the
    others through the collective they already run at every batch end, and all stop at one step.
    A node that dies without notice (or fails) ends the attempt: the others are stopped within
    :data:`PEER_GRACE_S`, whatever collective they wait in."""
    launches = _launches(command, env)
    started = clock()
    start_offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0
    # Where the script's output is echoed: decided before it starts (a stdout without a byte
    # buffer, as in a notebook, means no echo rather than an unsupervised script).
    sink = getattr(sys.stdout, "buffer", None) if echo else None
    procs: list[subprocess.Popen[bytes]] = []
    with open(log_path, "ab") as log:
        try:
            for launch in launches:
                procs.append(
                    subprocess.Popen(
                        list(launch.command),
                        cwd=cwd,
                        env=launch.env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,  # its own process group: one signal reaches it and its children
                        preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
                    )
                )
        except BaseException:
            for proc in procs:
                _signal_group(proc, signal.SIGKILL)
            raise
    follower = _Follower(log_path, start_offset, sink) if sink is not None else None
    if follower is not None:
        follower.start()
    notice: Notice | None = None
    notice_mono = sigterm_mono = None
    notice_wall = None
    killed = escalated = hard_killed = False
    stopped: bool | str = False
    deadline = None
    window = None
    lost: int | None = None  # the first node that ended badly on its own while others ran
    ended_badly: int | None = None
    signalled: set[int] = set()
    noticed: set[int] = set()
    next_stop_check = started
    try:
        on_start(procs[0].pid)
        while any(proc.poll() is None for proc in procs):
            if notice is None:
                if clock() >= next_stop_check:
                    stopped = stop_requested()
                    next_stop_check = clock() + stop_check_s
                for source in notices:
                    notice = notice or source.poll()
                if stopped and notice is None:  # a string says why (see the agent's other nodes)
                    notice = Notice("user", stopped if isinstance(stopped, str) else "stopped by the user")
                if notice is not None:
                    notice_mono, notice_wall = clock(), time.time()
                    window = grace_period
                    if notice.deadline is not None:
                        window = max(0.0, min(window, notice.deadline - notice_mono))
                    on_notice(notice, window)  # only what the script must find (the plan file)
                    targets = _targets(notice, len(procs))
                    noticed.update(targets)
                    for index in targets:
                        _terminate(procs[index], launches[index], procs, launches, signalled, index)
                    sigterm_mono = clock()
                    if on_signalled is not None:  # the story: never before the SIGTERM
                        on_signalled(notice, window)
                    deadline = notice_mono + window
            if ended_badly is None and len(procs) > 1:
                ended_badly = _first_ended_badly(procs)
                if ended_badly is not None and any(proc.poll() is None for proc in procs):
                    # A machine gone, or a node's workers failed (or died of the notice before
                    # they could handle it): nobody can cut a checkpoint now, and the others may
                    # wait for the missing ranks in a collective.
                    if ended_badly not in signalled:
                        lost = ended_badly
                    for index, proc in enumerate(procs):
                        if proc.poll() is None:
                            _terminate(proc, launches[index], procs, launches, signalled, index)
                    peer_deadline = clock() + min(grace_period, PEER_GRACE_S)
                    deadline = min(deadline, peer_deadline) if deadline is not None else peer_deadline
            if deadline is not None and clock() >= deadline and not hard_killed:
                _kill_all(procs, launches)
                hard_killed = True
                killed = notice is not None
            # A source that asks to escalate (a second Ctrl-C to the launcher): the grace period
            # is not waited out, the whole group is killed now.
            if (
                notice is not None
                and not hard_killed
                and any(getattr(s, "escalated", False) for s in notices)
            ):
                _kill_all(procs, launches)
                killed = escalated = hard_killed = True
            time.sleep(poll_s)
        if notice is None and (notice := _delivered(notices)) is not None:
            notice_mono, notice_wall = clock(), time.time()
            noticed.update(_targets(notice, len(procs)))
    except BaseException:
        # The supervisor itself failed: never leave the script running unsupervised. A second
        # interruption while the script saves (another Ctrl-C) kills it at once.
        for index, proc in enumerate(procs):
            _terminate(proc, launches[index], procs, launches, signalled, index)
        end = time.monotonic() + grace_period
        try:
            for proc in procs:
                proc.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        finally:
            _kill_all(procs, launches)
        raise
    finally:
        if follower is not None and all(proc.poll() is not None for proc in procs):
            follower.done.set()
            follower.join(timeout=5)
    codes = [proc.wait() for proc in procs]
    ended = clock()
    # Whatever the script left running in its group goes too: nothing survives an attempt.
    _kill_all(procs, launches)
    nodes = tuple(
        NodeResult(
            node=index,
            pid=proc.pid,
            exit_code=code,
            noticed=index in noticed,
            lost=code is not None and code < 0 and index not in signalled,
            stopped=index in signalled and index not in noticed,
        )
        for index, (proc, code) in enumerate(zip(procs, codes, strict=True))
    )
    return AttemptResult(
        exit_code=_attempt_exit_code(codes, launches, signalled),
        notice=notice,
        notice_at=notice_wall,
        sigterm_after_notice_s=(sigterm_mono - notice_mono) if sigterm_mono and notice_mono else None,
        exit_after_sigterm_s=(ended - sigterm_mono) if sigterm_mono else None,
        killed_after_grace=killed,
        stopped=bool(stopped),
        seconds=ended - started,
        window_s=window,
        escalated=escalated,
        nodes=nodes if len(nodes) > 1 or launches[0].torchrun else (),
        lost_node=lost if lost is not None and nodes[lost].lost else None,
        failed_node=lost if lost is not None and not nodes[lost].lost else None,
    )


def _launches(command: Sequence[str] | Sequence[Launch], env: dict[str, str] | None) -> list[Launch]:
    if command and isinstance(command[0], Launch):
        return [launch for launch in command if isinstance(launch, Launch)]
    if env is None:
        raise ValueError("a single command needs its environment")
    return [Launch([str(part) for part in command], env)]


def _delivered(notices: Sequence[NoticeSource]) -> Notice | None:
    """Once the script is gone: a notice that is a signal this launcher had already received.
    SLURM signals every process of the job step at once, so a script that leaves on its signal
    at once can be gone before the next poll; its exit was the notice's, not a finish (which
    would end the job instead of requeueing it). Only such sources are asked (``delivered``):
    what a cloud's metadata says now is news from after the exit."""
    for source in notices:
        if getattr(source, "delivered", False) and (found := source.poll()) is not None:
            return found
    return None


def _targets(notice: Notice, count: int) -> list[int]:
    """The nodes a notice reaches: the one it names, or all (this machine's own notice: every
    node the launcher runs here goes down with it)."""
    if notice.node is not None and 0 <= notice.node < count:
        return [notice.node]
    return list(range(count))


def _terminate(
    proc: subprocess.Popen[bytes],
    launch: Launch,
    procs: Sequence[subprocess.Popen[bytes]],
    launches: Sequence[Launch],
    signalled: set[int],
    index: int,
) -> None:
    """SIGTERM for one node. A torchrun node's workers get it directly (its agent would kill them
    after its own shutdown timeout); before it has any (still at the rendezvous) there is nothing
    to save, so every node's agent is told to stop, lest the others wait for this one."""
    signalled.add(index)
    if not launch.torchrun:
        _signal_group(proc, signal.SIGTERM)
        return
    workers = workers_of(proc.pid)
    if workers:
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                worker.send_signal(signal.SIGTERM)
        return
    for other, other_proc in enumerate(procs):
        if other_proc.poll() is None and not workers_of(other_proc.pid):
            signalled.add(other)
            _signal_group(other_proc, signal.SIGTERM)


def _first_ended_badly(procs: Sequence[subprocess.Popen[bytes]]) -> int | None:
    """A node that ended with a non-zero exit or by a signal: the attempt cannot go on without it."""
    for index, proc in enumerate(procs):
        code = proc.poll()
        if code is not None and code != 0:
            return index
    return None


def _attempt_exit_code(codes: Sequence[int], launches: Sequence[Launch], signalled: set[int]) -> int:
    """One exit code for the attempt: the first node's that is not 0. torchrun reports a worker
    that died of a signal as its own failure (exit 1); a node whose workers the launcher sent
    SIGTERM to counts as ended by that SIGTERM (-15), as a single script killed by it would."""
    for index, code in enumerate(codes):
        if code != 0:
            return -signal.SIGTERM if launches[index].torchrun and index in signalled and code > 0 else code
    return codes[0]


def _kill_all(procs: Sequence[subprocess.Popen[bytes]], launches: Sequence[Launch]) -> None:
    for proc, launch in zip(procs, launches, strict=True):
        if launch.torchrun:  # its workers are in sessions of their own
            for worker in workers_of(proc.pid):
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    worker.send_signal(signal.SIGKILL)
        _signal_group(proc, signal.SIGKILL)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
