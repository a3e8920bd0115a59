"""Experiment and attempt lifecycles: enums, the transition table, and the pure decision function.

::

    queued ─▶ running ─▶ succeeded
                 │  └──▶ failed            (non-zero exit, no notice; or a budget is spent)
                 ▼
            interrupting ─(exit 0 + checkpoint, resumable)─▶ pending ─▶ restoring ─▶ running ...
                 ├──────(not resumable / exit≠0)──────────▶ failed
                 └──────(training finished first)─────────▶ succeeded
       running ─(exit≠0, a retry left)─▶ pending (until the retry's time) ─▶ restoring ─▶ running ...
       any live status ─(lightning-grid stop)─▶ stopped
       failed ─(lightning-grid run --resume, the user's word)─▶ pending
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from lightning_grid.launcher.spec import MAX_RETRY_DELAY_S

__all__ = [
    "Status",
    "Outcome",
    "TRANSITIONS",
    "can_transition",
    "classify",
    "Budgets",
    "Decision",
    "decide",
    "retry_delay",
]


class Status(str, Enum):
    QUEUED = "queued"  # submitted, execution directory prepared, no attempt yet
    RUNNING = "running"  # an attempt's process is alive
    INTERRUPTING = "interrupting"  # a notice came (or the launcher was told to stop): SIGTERM sent, waiting
    PENDING = "pending"  # waiting to relaunch: for capacity, a launcher, or a crash retry's time
    RESTORING = "restoring"  # fresh execution directory being restored from the artifact store
    SUCCEEDED = "succeeded"  # the script exited 0 without a notice
    FAILED = "failed"  # the script failed, was interrupted without being resumable, or a budget ran out
    STOPPED = "stopped"  # the user stopped it

    def is_terminal(self) -> bool:
        return self in (Status.SUCCEEDED, Status.FAILED, Status.STOPPED)


_LIVE = (Status.QUEUED, Status.RUNNING, Status.INTERRUPTING, Status.PENDING, Status.RESTORING)

TRANSITIONS: dict[Status, frozenset[Status]] = {
    # queued/restoring → pending: the store did not answer before the script started.
    Status.QUEUED: frozenset({Status.RUNNING, Status.PENDING, Status.FAILED, Status.STOPPED}),
    # running → pending: a crash waiting for its retry (all relaunches wait in pending).
    Status.RUNNING: frozenset(
        {Status.SUCCEEDED, Status.FAILED, Status.INTERRUPTING, Status.PENDING, Status.STOPPED}
    ),
    # A notice in the last steps: the script may finish training before it acts on the SIGTERM.
    Status.INTERRUPTING: frozenset({Status.PENDING, Status.SUCCEEDED, Status.FAILED, Status.STOPPED}),
    Status.PENDING: frozenset({Status.RESTORING, Status.FAILED, Status.STOPPED}),
    Status.RESTORING: frozenset({Status.RUNNING, Status.PENDING, Status.FAILED, Status.STOPPED}),
    Status.SUCCEEDED: frozenset(),
    # Only on the user's word (``run --resume``): continue from its committed checkpoints.
    Status.FAILED: frozenset({Status.PENDING}),
    Status.STOPPED: frozenset(),
}
assert all(Status.STOPPED in TRANSITIONS[s] for s in _LIVE)


def can_transition(current: Status, target: Status) -> bool:
    return target in TRANSITIONS[current]


class Outcome(str, Enum):
    """How one attempt ended."""

    SUCCEEDED = "succeeded"  # exit 0, no notice
    PREEMPTED = "preempted"  # notice, then exit 0 with a committed checkpoint (or a resumable script)
    KILLED = "killed"  # notice, no exit within the grace period: SIGKILL
    INTERRUPTED_NOT_RESUMABLE = "interrupted (not resumable)"
    FAILED = "failed"  # non-zero exit without a notice (user code)
    STOPPED = "stopped"  # stopped by the user


def classify(
    exit_code: int | None, noticed: bool, killed_after_grace: bool, resumable: bool, stopped: bool
) -> Outcome:
    """Exit code + notice → outcome. Pure, so it can be table-tested."""
    if stopped:
        return Outcome.STOPPED
    if noticed:
        if not resumable:
            return Outcome.INTERRUPTED_NOT_RESUMABLE
        if killed_after_grace:
            return Outcome.KILLED
        # Exit 0 is the orderly path; death by the SIGTERM we sent (the script had no handler at
        # that moment) is a preemption too, just without a new checkpoint.
        return Outcome.PREEMPTED if exit_code in (0, -15, 143) else Outcome.FAILED
    return Outcome.SUCCEEDED if exit_code == 0 else Outcome.FAILED


@dataclass(frozen=True)
class Budgets:
    """The counters and limits a decision weighs (the experiment's spec and its story so far)."""

    restarts: int  # preemptions survived so far
    max_restarts: int
    failures: int  # crashes retried so far
    retries: int
    retry_delay: float  # seconds before the first crash retry


@dataclass(frozen=True)
class Decision:
    """What follows an attempt. The front end applies it as it is: it never second-guesses it."""

    status: Status  # where the experiment goes next
    relaunch: bool
    reason: str
    restarts: int  # the counters after this attempt
    failures: int
    delay_s: float = 0.0  # wait this long before the next attempt (crash retries back off)


def retry_delay(first_s: float, retry_number: int) -> float:
    """Exponential backoff for crash retries: first_s, 2·first_s, 4·first_s …, capped."""
    return min(MAX_RETRY_DELAY_S, first_s * 2 ** max(0, retry_number - 1))


def decide(outcome: Outcome, budgets: Budgets) -> Decision:
    """Outcome + budgets → next status, counters and delay. Pure, and the only place this is decided.

    Preemptions and crashes have separate budgets: a crash is not a preemption, and a crash loop
    must end. A preemption relaunches at once (the work is saved; waiting gains nothing); a crash
    waits, longer each time, so that a transient cause can pass. Every relaunch goes through
    ``pending``: the experiment waits there for capacity, a launcher, or its retry time."""
    b = budgets
    same = {"restarts": b.restarts, "failures": b.failures}
    if outcome is Outcome.SUCCEEDED:
        return Decision(Status.SUCCEEDED, False, "exited 0", **same)
    if outcome is Outcome.STOPPED:
        return Decision(Status.STOPPED, False, "stopped by the user", **same)
    if outcome is Outcome.INTERRUPTED_NOT_RESUMABLE:
        return Decision(Status.FAILED, False, "interrupted (not resumable)", **same)
    if outcome in (Outcome.PREEMPTED, Outcome.KILLED):
        if b.restarts >= b.max_restarts:
            return Decision(Status.FAILED, False, f"preempted; max_restarts={b.max_restarts} reached", **same)
        how = "preempted" if outcome is Outcome.PREEMPTED else "preempted; killed after the grace period"
        return Decision(Status.PENDING, True, how, restarts=b.restarts + 1, failures=b.failures)
    if b.failures < b.retries:
        number = b.failures + 1
        delay = retry_delay(b.retry_delay, number)
        return Decision(
            Status.PENDING,
            True,
            f"failed; retry {number} of {b.retries} in {delay:g}s",
            restarts=b.restarts,
            failures=number,
            delay_s=delay,
        )
    return Decision(
        Status.FAILED, False, "failed" if b.retries == 0 else f"failed; retries={b.retries} used", **same
    )
