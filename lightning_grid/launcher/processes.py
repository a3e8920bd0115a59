"""Finding every process of an attempt, including those that left its process group.

An attempt's script runs in its own process group, and one signal to the group reaches the script
and its ordinary children. A child that calls ``setsid()`` (a daemonised helper, a data server)
leaves the group, and a launcher killed with SIGKILL leaves no one to signal anything. Every
process of an attempt inherits the contract's variables, so they name it: the experiment, the
attempt number and the checkpoint URL together identify one attempt on this machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from collections.abc import Sequence
from typing import Any

import psutil

from lightning_grid.contract import ENV_ATTEMPT, ENV_CHECKPOINTS, ENV_EXPERIMENT, ENV_NODE

__all__ = ["attempt_processes", "kill_attempt_processes", "die_with_parent"]


def _prctl() -> Any:
    """libc's ``prctl``, looked up here in the parent: a child forked from a process with threads
    must not ``dlopen`` (the loader's lock may have been held by another thread at the fork)."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()


def die_with_parent() -> None:
    """In a child (``preexec_fn``): SIGTERM when the launcher dies, so a SIGKILLed launcher leaves
    no orphan run (Linux; elsewhere a no-op)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def attempt_processes(
    experiment: str | None, attempt: int, checkpoints: str, nodes: Sequence[int] | None = None
) -> list[psutil.Process]:
    """The live processes (of this user) whose environment names this attempt; with ``nodes``,
    only those of these nodes (two agents of one job on one machine each reap their own)."""
    wanted = {ENV_EXPERIMENT: experiment or "", ENV_ATTEMPT: str(attempt), ENV_CHECKPOINTS: checkpoints}
    me = os.getpid()
    found = []
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            env = proc.environ()
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess, OSError):
            continue
        if all(env.get(k) == v for k, v in wanted.items()) and (
            nodes is None or env.get(ENV_NODE) in {str(n) for n in nodes}
        ):
            found.append(proc)
    return found


def kill_attempt_processes(
    experiment: str | None, attempt: int, checkpoints: str, nodes: Sequence[int] | None = None
) -> int:
    """SIGKILL what is left of an attempt (its group's SIGTERM and grace period are over). Returns
    how many processes were killed."""
    procs = attempt_processes(experiment, attempt, checkpoints, nodes)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=5)
    return len(procs)
