"""Experiment and attempt lifecycles: enums, the transition table, and the pure decision function.

::

    queued ─▶ running ─▶ succeeded
                 │  └──▶ failed            (non-zero exit, no notice; or a budget is spent)
                 ▼
            interrupting ─(exit 0 + checkpoint, resumable)─▶ pending ─▶ restoring ─▶ running ...
                 ├──────(not resumable / exit≠0)──────────▶ failed
                 └──────(training finished first)─────────▶ succeeded
       any live status ─(lightning-grid stop)─▶ stopped
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = ["Status", "Outcome", "TRANSITIONS", "can_transition", "classify", "Decision", "decide"]


class Status(str, Enum):
    QUEUED = "queued"  # submitted, execution directory prepared, no attempt yet
    RUNNING = "running"  # an attempt's process is alive
    INTERRUPTING = "interrupting"  # a notice came (or the launcher was told to stop): SIGTERM sent, waiting
    PENDING = "pending"  # interrupted with its state saved; waiting for capacity / a launcher
    RESTORING = "restoring"  # fresh execution directory being restored from the artifact store
    SUCCEEDED = "succeeded"  # the script exited 0 without a notice
    FAILED = "failed"  # the script failed, was interrupted without being resumable, or a budget ran out
    STOPPED = "stopped"  # the user stopped it

    def is_terminal(self) -> bool:
        return self in (Status.SUCCEEDED, Status.FAILED, Status.STOPPED)


_LIVE = (Status.QUEUED, Status.RUNNING, Status.INTERRUPTING, Status.PENDING, Status.RESTORING)

TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.QUEUED: frozenset({Status.RUNNING, Status.FAILED, Status.STOPPED}),
    Status.RUNNING: frozenset(
        {Status.SUCCEEDED, Status.FAILED, Status.INTERRUPTING, Status.RESTORING, Status.STOPPED}
    ),
    # A notice in the last steps: the script may finish training before it acts on the SIGTERM.
    Status.INTERRUPTING: frozenset({Status.PENDING, Status.SUCCEEDED, Status.FAILED, Status.STOPPED}),
    Status.PENDING: frozenset({Status.RESTORING, Status.FAILED, Status.STOPPED}),
    Status.RESTORING: frozenset({Status.RUNNING, Status.FAILED, Status.STOPPED}),
    Status.SUCCEEDED: frozenset(),
    Status.FAILED: frozenset(),
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
class Decision:
    status: Status  # where the experiment goes next
    relaunch: bool
    reason: str


def decide(outcome: Outcome, restarts: int, max_restarts: int, failures: int, retries: int) -> Decision:
    """Outcome + budgets → next status. Preemptions and failures have separate budgets: a crash is
    not a preemption, and a crash loop must end."""
    if outcome is Outcome.SUCCEEDED:
        return Decision(Status.SUCCEEDED, False, "exited 0")
    if outcome is Outcome.STOPPED:
        return Decision(Status.STOPPED, False, "stopped by the user")
    if outcome is Outcome.INTERRUPTED_NOT_RESUMABLE:
        return Decision(Status.FAILED, False, "interrupted (not resumable)")
    if outcome in (Outcome.PREEMPTED, Outcome.KILLED):
        if restarts >= max_restarts:
            return Decision(Status.FAILED, False, f"preempted; max_restarts={max_restarts} reached")
        how = "preempted" if outcome is Outcome.PREEMPTED else "preempted; killed after the grace period"
        return Decision(Status.PENDING, True, how)
    if failures < retries:
        return Decision(Status.PENDING, True, f"failed; retry {failures + 1} of {retries}")
    return Decision(Status.FAILED, False, "failed" if retries == 0 else f"failed; retries={retries} used")
