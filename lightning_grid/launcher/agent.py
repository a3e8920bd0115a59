"""``lightning-grid agent``: the launcher's front end on the spot VM itself, for provisioners that start it.

A cloud's autoscaling group, a SkyPilot managed job or a Kubernetes Job starts a machine and runs
``lightning-grid agent --artifacts URL --name NAME -- python train.py``. The agent runs one attempt
— the same :func:`lightning_grid.launcher.attempt.run` as the local engine — applies the same
:func:`~lightning_grid.launcher.experiment.decide`, and exits with a status the provisioner
understands: 0 done, 75 (EX_TEMPFAIL) "run me again" (preempted, or a crash with a retry left), 1
failed. The provisioner, not the agent, relaunches.

There is no registry on such machines: the story goes to the artifact store, one object per event
(see :mod:`lightning_grid.launcher.events`), which ``lightning-grid status NAME --artifacts URL``
reads from anywhere. The budgets (restarts, crash retries and their backoff) are replayed from it.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_grid.errors import StoreError, UsageError
from lightning_grid.launcher import attempt, instances
from lightning_grid.launcher.events import Event, Kind, StoreEventLog
from lightning_grid.launcher.experiment import Budgets, Decision, Outcome, Status, decide
from lightning_grid.launcher.layout import StoreLayout, new_id
from lightning_grid.launcher.notices import (
    LauncherSignals,
    Notice,
    NoticeSource,
    SlurmSignals,
    notice_sources,
)
from lightning_grid.launcher.spec import Spec, validate_name

__all__ = ["AgentSpec", "run_agent", "read_events", "summarize", "settle_unended", "EX_PREEMPTED"]

log = logging.getLogger("lightning_grid")

EX_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"


@dataclass(frozen=True)
class AgentSpec:
    command: Sequence[str]
    artifacts: str
    name: str
    workdir: str = "."
    spec: Spec = field(default_factory=lambda: Spec(cloud="auto"))
    log_dir: str | None = None  # where attempt-N.log goes (default: the execution directory)


class _StoreObserver:
    """An attempt's story, told to the artifact store (and one line each on stderr)."""

    def __init__(
        self, events: StoreEventLog, number: int, command: Sequence[str], watch_stop: bool = False
    ) -> None:
        self.events, self.number, self.command = events, number, list(command)
        self.host = socket.gethostname()
        self.watch_stop = watch_stop  # a SLURM job's stop comes through the store (lightning-grid stop)
        self._next_stop_check = 0.0
        self._stopped = False

    def emit(self, kind: Kind, message: str, **data: Any) -> None:
        self._write(Event(kind.value, message, attempt=self.number, data={"host": self.host, **data}))
        if kind in (Kind.NOTICE, Kind.SYNC_FAILED, Kind.WARNING):
            print(f"lightning-grid agent: {message}", file=sys.stderr, flush=True)

    def _write(self, event: Event) -> None:
        """Best effort once the script runs: a store that fails now must neither stop a healthy
        script nor turn its end into "nothing ran" (the attempt still ends and is decided)."""
        try:
            self.events.emit(event)
        except StoreError as exc:
            print(f"lightning-grid agent: an event was not recorded ({exc})", file=sys.stderr, flush=True)

    def started(self, pid: int, log_path: str) -> None:
        self.emit(
            Kind.STARTED, f"attempt {self.number} started on {self.host}", pid=pid, command=self.command
        )

    def interrupting(self, notice: Notice, window_s: float) -> None:
        if notice.source == "user":  # a stop goes straight to stopped after the attempt, as locally
            return
        self._write(
            Event(
                Kind.TRANSITION.value,
                f"{notice.reason}; SIGTERM sent",
                attempt=self.number,
                from_status=Status.RUNNING.value,
                to_status=Status.INTERRUPTING.value,
                data={"host": self.host, "window_s": window_s},
            )
        )

    def stop_requested(self) -> bool:
        """A provisioner stops an agent by stopping its machine (a notice); under SLURM,
        ``lightning-grid stop`` leaves a stop event in the store, read here every few seconds."""
        if not self.watch_stop or self._stopped or time.monotonic() < self._next_stop_check:
            return self._stopped
        self._next_stop_check = time.monotonic() + 2.0
        try:
            self._stopped = any(e.kind == Kind.STOP_REQUESTED.value for e in self.events.read())
        except StoreError:
            pass  # unreadable now: ask again later
        return self._stopped


@dataclass(frozen=True)
class _Story:
    """What the events so far say, for the next attempt's decision."""

    attempts: int = 0
    restarts: int = 0
    failures: int = 0
    retry_at: float | None = None
    sync_s: float = 0.0
    status: str | None = None
    checkpoint_step: int | None = None  # the newest checkpoint an attempt left committed


def settle_unended(events: StoreEventLog, spec: Spec, why: str) -> Decision | None:
    """An attempt that started and never ended (its machine vanished, SLURM SIGKILLed its job) is a
    *killed* attempt, decided like any other: a resumable run continues from its newest periodic
    checkpoint, and the restart budget counts it. Both the next agent and the SLURM follower call
    this; the first to find the attempt unended records it. Returns the decision, or None."""
    past = events.read()
    started = [e.attempt for e in past if e.kind == Kind.STARTED.value and e.attempt]
    ended = {e.attempt for e in past if e.kind == Kind.ENDED.value}
    if not started or started[-1] in ended:
        return None
    number = started[-1]
    story = _replay(past)
    outcome = Outcome.KILLED if spec.resumable else Outcome.INTERRUPTED_NOT_RESUMABLE
    events.emit(
        Event(
            Kind.ENDED.value,
            f"ended: {why}",
            attempt=number,
            data={"outcome": outcome.value, "reason": why, "exit_code": None, "steps_redone": None},
        )
    )
    decision = decide(
        outcome, Budgets(story.restarts, spec.max_restarts, story.failures, spec.retries, spec.retry_delay)
    )
    _emit_decision(events, number, decision)
    return decision


def _emit_decision(events: StoreEventLog, number: int, decision: Decision) -> None:
    events.emit(
        Event(
            Kind.DECISION.value,
            decision.reason,
            attempt=number,
            to_status=decision.status.value,
            data={
                "status": decision.status.value,
                "relaunch": decision.relaunch,
                "restarts": decision.restarts,
                "failures": decision.failures,
                "delay_s": decision.delay_s,
                "retry_at": time.time() + decision.delay_s if decision.delay_s else None,
            },
        )
    )


def _replay(events: Sequence[Event]) -> _Story:
    attempts = max((e.attempt or 0 for e in events), default=0)
    decisions = [e for e in events if e.kind == Kind.DECISION.value]
    syncs = [e.data.get("seconds") for e in events if e.kind == Kind.SYNCED.value]
    last = decisions[-1].data if decisions else {}
    steps = [
        int(e.data["checkpoint_step"])
        for e in events
        if e.kind == Kind.ENDED.value and e.data.get("checkpoint_step") is not None
    ]
    return _Story(
        attempts=attempts,
        restarts=int(last.get("restarts", 0)),
        failures=int(last.get("failures", 0)),
        retry_at=last.get("retry_at"),
        sync_s=float(syncs[-1] or 0.0) if syncs else 0.0,
        status=last.get("status"),
        checkpoint_step=max(steps) if steps else None,
    )


def run_agent(agent: AgentSpec) -> int:
    command = list(agent.command)
    if not command:
        raise UsageError(
            "give the command to run after --, e.g.: lightning-grid agent ... -- python train.py"
        )
    if shutil.which(command[0]) is None and not os.path.exists(command[0]):
        raise UsageError(f"command not found: {command[0]}")
    validate_name(agent.name)
    slurm_job = os.environ.get("SLURM_JOB_ID") if agent.spec.backend == "slurm" else None
    if agent.spec.backend == "slurm" and not slurm_job:
        raise UsageError(
            "--backend slurm: this is not a SLURM job (no SLURM_JOB_ID); lightning-grid run submits it"
        )
    # A provisioner's agent is resumable by definition; a SLURM job keeps what the user submitted.
    forced = {} if slurm_job else {"resumable": True, "use_spot": True}
    # The script runs in --workdir: a relative store path would move with it.
    artifacts_url = agent.artifacts if "://" in agent.artifacts else os.path.abspath(agent.artifacts)
    spec = agent.spec.with_(name=agent.name, artifacts=artifacts_url, **forced).validated()
    workdir = os.path.abspath(agent.workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UsageError(f"--workdir {agent.workdir} is not a directory")
    instance = instances.lookup(spec.instance_type)
    available = instances.gpu_count()
    devices = instances.visible_devices(instance, available, os.environ.get("CUDA_VISIBLE_DEVICES"))
    try:  # before the store is touched: a bad --workdir leaves nothing behind
        os.makedirs(workdir, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot use --workdir {agent.workdir}: {exc.strerror}") from None
    layout = StoreLayout.of(artifacts_url, agent.name)
    events = StoreEventLog(layout)
    try:
        if slurm_job:  # a SLURM job's runs never overlap: an unended attempt before this one was killed
            settle_unended(
                events, spec, "the previous run of the job ended without a word from its agent (killed)"
            )
        story = _replay(events.read())
        if layout.owner() is None:
            layout.claim(new_id(), agent.name)  # every agent of this experiment shares the store's id
    except StoreError as exc:  # the store is down: nothing ran, another try may reach it
        print(
            f"lightning-grid agent: {exc}; nothing ran: exit {EX_PREEMPTED} (run me again)", file=sys.stderr
        )
        return EX_PREEMPTED
    if story.status in (Status.SUCCEEDED.value, Status.FAILED.value, Status.STOPPED.value):
        # A provisioner that starts a finished job again must not pay for it to redo anything.
        print(f"lightning-grid agent: {agent.name} has already ended ({story.status})", file=sys.stderr)
        return 0 if story.status == Status.SUCCEEDED.value else 1
    if story.retry_at is not None and time.time() < story.retry_at:
        wait = story.retry_at - time.time()
        print(f"lightning-grid agent: retrying in {wait:.0f}s", file=sys.stderr, flush=True)
        time.sleep(wait)
    number = story.attempts + 1
    setup = attempt.AttemptSetup(
        number=number,
        spec=spec,
        command=command,
        workdir=workdir,
        layout=layout,
        # The log sits in the execution directory, so it reaches the store with it (a name with
        # the private ".lightning_grid-" prefix would never be synced).
        log_path=os.path.join(agent.log_dir, f"attempt-{number}.log")
        if agent.log_dir
        else os.path.join(workdir, f"lightning_grid-attempt-{number}.log"),
        # Our own files live in the workdir's .lightning_grid folder, which is never synced.
        private_dir=os.path.join(workdir, ".lightning_grid"),
        devices=devices,
        sync_s=story.sync_s,
        fresh=False,
        last_checkpoint_step=story.checkpoint_step,
    )
    signals = LauncherSignals()
    signals.install()
    own: NoticeSource = signals
    if slurm_job:
        from lightning_grid.launcher import slurm

        own = SlurmSignals(signals, slurm.node_window(os.environ.get("SLURM_JOB_PARTITION")), slurm_job)
    observer = _StoreObserver(events, number, command, watch_stop=slurm_job is not None)
    try:
        report = attempt.run(setup, notice_sources(spec, number, own), observer)
    except StoreError as exc:
        # Nothing ran and nothing is lost; the story cannot be written either. Another machine
        # (the provisioner's next try) may reach the store: "run me again".
        print(
            f"lightning-grid agent: {exc}; nothing ran: exit {EX_PREEMPTED} (run me again)", file=sys.stderr
        )
        signals.uninstall()
        return EX_PREEMPTED
    except BaseException:
        signals.uninstall()
        raise
    # The handlers stay until the decision is written: a second SIGTERM (SLURM's at the end of
    # GraceTime, a pod's) must not end the agent between the attempt's end and its decision.
    decision = decide(
        report.outcome,
        Budgets(story.restarts, spec.max_restarts, story.failures, spec.retries, spec.retry_delay),
    )
    try:
        _emit_decision(events, number, decision)
    except StoreError as exc:  # the attempt is over; the next agent settles it from its story
        print(f"lightning-grid agent: the decision could not be recorded: {exc}", file=sys.stderr)
    finally:
        signals.uninstall()
    if slurm_job and decision.relaunch:
        # SLURM requeues a preempted job by itself, but not one whose script crashed, nor one that
        # finished its save before the end of GraceTime: ask, with the crash retry's backoff.
        from lightning_grid.launcher import slurm

        try:
            print(
                f"lightning-grid agent: {slurm.requeue(slurm_job, decision.delay_s)}",
                file=sys.stderr,
                flush=True,
            )
        except Exception as exc:  # noqa: BLE001 - the follower requeues a job that ended unrequeued
            print(
                f"lightning-grid agent: could not requeue job {slurm_job}: {exc}", file=sys.stderr, flush=True
            )
    if decision.status in (Status.SUCCEEDED, Status.STOPPED):
        return 0
    return EX_PREEMPTED if decision.relaunch else 1


def read_events(artifacts_url: str, name: str) -> list[Event]:
    validate_name(name)
    return StoreEventLog(StoreLayout.of(artifacts_url, name)).read()


_ATTEMPT_FIELDS = (
    "exit_code",
    "outcome",
    "reason",
    "notice_source",
    "window_s",
    "plan",
    "checkpoint_step",
    "steps_redone",
    "sigterm_after_notice_s",
    "exit_after_sigterm_s",
    "synced_after_notice_s",
    "host",
)


def summarize(name: str, events: Sequence[Event]) -> dict[str, Any]:
    """The ``status --json`` shape, from the events agents left in the store."""
    if not events:
        raise UsageError(f"no experiment named {name!r} in that artifact store")
    ended = [e for e in events if e.kind == Kind.ENDED.value]
    story = _replay(events)
    if story.status is not None:
        status = story.status
    elif ended:  # agents from before decisions were recorded
        last = ended[-1].data.get("outcome")
        status = {"succeeded": "succeeded", "preempted": "pending", "killed": "pending"}.get(
            str(last), str(last)
        )
    else:
        status = "running"
    if ended and story.attempts > len(ended) and status == Status.PENDING.value:
        status = Status.RUNNING.value  # a newer attempt has started and not ended yet
    return {
        "name": name,
        "status": status,
        "restarts": story.restarts
        if story.status is not None
        else sum(e.data.get("outcome") in ("preempted", "killed") for e in ended),
        "failures": story.failures,
        "retry_at": story.retry_at,
        "attempts": [{"number": e.attempt, **{k: e.data.get(k) for k in _ATTEMPT_FIELDS}} for e in ended],
        "events": [
            {"time": e.time, "kind": e.kind, "attempt": e.attempt, "message": e.message, "data": e.data}
            for e in events
        ],
    }
