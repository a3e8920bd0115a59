"""One attempt, the same wherever it runs: restore → start → watch → SIGTERM → grace → publish → classify.

The local engine and the on-instance agent are front ends over :func:`run`. They differ only in
where the story goes (the registry, or the artifact store) and in who relaunches (the engine
itself, or a provisioner); both pass an :class:`Observer` for the first and apply
:func:`~lightning_grid.launcher.experiment.decide` to the :class:`AttemptReport` for the second.
Every behaviour of an attempt — the shutdown window, the contract, the devices, steps redone,
"training finished as the notice came" — is written here once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from lightning_grid.checkpoints import COMPLETED_MARKER, CheckpointStore
from lightning_grid.contract import ENV_NODE, Contract
from lightning_grid.errors import StoreError
from lightning_grid.launcher import artifacts, rendezvous_store
from lightning_grid.launcher.events import Kind
from lightning_grid.launcher.experiment import Outcome, classify
from lightning_grid.launcher.layout import StoreLayout
from lightning_grid.launcher.nodes import Rendezvous, torchrun_command
from lightning_grid.launcher.notices import Notice, NoticeSource
from lightning_grid.launcher.processes import kill_attempt_processes
from lightning_grid.launcher.spec import Spec
from lightning_grid.launcher.supervisor import AttemptResult, Launch, attempt_env, run_attempt
from lightning_grid.launcher.window import ShutdownWindow

__all__ = ["Observer", "AttemptSetup", "AttemptReport", "run", "conclude", "steps_redone", "save_workdir"]


class Observer(Protocol):
    """Where an attempt's story goes, and how the front end hears of a stop request."""

    def emit(self, kind: Kind, message: str, **data: Any) -> None: ...

    def started(self, pid: int, log_path: str) -> None: ...

    def interrupting(self, notice: Notice, window_s: float) -> None: ...

    def stop_requested(self) -> bool | str: ...


@dataclass(frozen=True)
class AttemptSetup:
    """Everything one attempt needs, decided by the front end before it starts."""

    number: int
    spec: Spec
    command: Sequence[str]
    workdir: str  # the execution directory on this machine
    layout: StoreLayout
    log_path: str
    private_dir: str  # our own files for this attempt (notice file, spool): never synced
    devices: str | None = None  # CUDA_VISIBLE_DEVICES for the script (None: leave as is)
    sync_s: float = 0.0  # how long the last execution-directory sync took (for the window plan)
    fresh: bool = True  # empty the workdir before restoring (the engine); the agent restores over it
    experiment_id: str | None = None  # the store folder must belong to this experiment
    last_checkpoint_step: int | None = None  # the newest checkpoint the story knows was committed
    echo: bool = True
    # Multi-node (or several processes per node): where the torchrun agents meet, and which of the
    # experiment's nodes run here (all of them under the local engine; one under an agent).
    rendezvous: Rendezvous | None = None
    nodes: tuple[int, ...] = (0,)
    # The machine that owns the execution directory (node 0). The others restore it but never
    # capture or save it: one writer per store folder.
    primary: bool = True


@dataclass(frozen=True)
class AttemptReport:
    number: int
    outcome: Outcome
    reason: str
    exit_code: int | None
    notice_source: str | None
    notice_at: float | None  # wall-clock time of the notice
    window_s: float | None
    plan: str | None
    checkpoint_step: int | None
    steps_redone: int | None
    sigterm_after_notice_s: float | None
    exit_after_sigterm_s: float | None
    synced_after_notice_s: float | None
    sync_s: float | None  # None: the sync failed
    seconds: float
    # Multi-node: how each node's process ended ({node, pid, exit_code, noticed, lost}), and the
    # node the notice reached (None: all of them, or a single machine).
    nodes: tuple[dict[str, Any], ...] = ()
    notice_node: int | None = None


def run(setup: AttemptSetup, sources: Sequence[NoticeSource], observer: Observer) -> AttemptReport:
    spec = setup.spec
    layout = setup.layout
    store = CheckpointStore(layout.checkpoints)
    try:
        if setup.experiment_id is not None:
            layout.check_owner(setup.experiment_id)
        _restore(setup, observer)
        os.makedirs(setup.private_dir, exist_ok=True)
        os.makedirs(os.path.dirname(setup.log_path), exist_ok=True)
        store.clear_marker()
        store.clear_marker(COMPLETED_MARKER)
        lost = _lost_steps(setup, store, observer)
    except StoreError:
        raise
    except Exception as exc:  # any backend's failure before the script starts: nothing ran, nothing lost
        raise StoreError(f"store unreachable or unwritable: {layout.base}: {_one_line(exc)}") from exc
    window = ShutdownWindow(
        store,
        notice_path=os.path.join(setup.private_dir, f"notice-{setup.number}.json"),
        spool_dir=os.path.join(setup.private_dir, f"spool-{setup.number}"),
        sync_s=setup.sync_s,
    )
    contract = Contract(
        resumable=spec.resumable,
        checkpoints=layout.checkpoints,
        experiment=spec.name,
        attempt=setup.number,
        notice_file=window.notice_path,
        every_n_train_steps=spec.every_n_train_steps,
        every_n_seconds=spec.every_n_seconds,
        progress_file=os.path.join(setup.private_dir, f"progress-{setup.number}.json"),
    )
    plans: list[tuple[str, str]] = []

    def on_notice(notice: Notice, window_s: float) -> None:
        """Before the SIGTERM: only the plan file the script reads (its history read is bounded).
        A plan that cannot be written leaves the script to its default, a full save."""
        if spec.resumable:
            try:
                plan = window.plan(window_s)
                plans.append((plan.plan.value, plan.reason))
            except Exception as exc:  # a full disk, say: the SIGTERM must go out all the same
                plans.append(("full", f"the plan could not be written ({_one_line(exc)}): saving in full"))

    def on_signalled(notice: Notice, window_s: float) -> None:
        """Right after the SIGTERM: the story (store writes may be slow; they never delay it)."""
        observer.emit(
            Kind.NOTICE,
            f"notice from {notice.source}: {notice.reason}",
            source=notice.source,
            reason=notice.reason,
            window_s=window_s,
        )
        for value, why in plans:
            observer.emit(Kind.PLAN, f"shutdown plan {value}: {why}", plan=value, window_s=window_s)
        observer.interrupting(notice, window_s)

    env = attempt_env(contract, setup.devices)
    with _rendezvous(setup) as rendezvous:  # its store outlives every node's agent
        result = run_attempt(
            _launches(setup, rendezvous, env) if rendezvous is not None else list(setup.command),
            cwd=setup.workdir,
            env=env,
            log_path=setup.log_path,
            notices=sources,
            grace_period=spec.grace_period,
            stop_requested=observer.stop_requested,
            on_start=lambda pid: observer.started(pid, setup.log_path),
            on_notice=on_notice,
            on_signalled=on_signalled,
            echo=setup.echo,
        )
    after_exit = time.monotonic()
    try:
        published = window.publish()
    except Exception as exc:  # the store failed while publishing: the previous checkpoint stays in force
        published = f"publishing the spooled checkpoint failed: {_one_line(exc)}"
    if published is not None:
        observer.emit(Kind.PUBLISHED, published)
    stragglers = kill_attempt_processes(
        spec.name, setup.number, layout.checkpoints, setup.nodes if setup.rendezvous is not None else None
    )
    if stragglers:
        observer.emit(
            Kind.WARNING,
            f"{stragglers} process(es) of the attempt outlived it (they left its process group): killed",
            processes=stragglers,
        )
    sync_s = save_workdir(setup.workdir, layout, observer) if setup.primary else None
    marker, completed = _markers(store, observer)
    outcome, reason = conclude(result, marker, completed, spec.resumable, spec.grace_period)
    if outcome is Outcome.FAILED:
        last = _last_line(setup.log_path)
        reason = f"{reason}: {last}" if last else reason  # the script's own last word names the cause
    redone = steps_redone(outcome, marker)
    if redone is None and outcome in (Outcome.KILLED, Outcome.FAILED):
        redone = _past_newest_checkpoint(contract.progress_file, store)
    if lost:
        redone = lost + (redone or 0)
    if result.exit_after_sigterm_s is not None:
        used = ""
        if result.window_s:
            used = f", {100 * result.exit_after_sigterm_s / result.window_s:.0f}% of its {result.window_s:.0f}s window"
        observer.emit(
            Kind.EXITED,
            f"SIGTERM {result.sigterm_after_notice_s or 0:.2f}s after the notice, exit"
            f" {result.exit_after_sigterm_s:.2f}s after SIGTERM{used}",
            sigterm_after_notice_s=result.sigterm_after_notice_s,
            exit_after_sigterm_s=result.exit_after_sigterm_s,
            window_s=result.window_s,
        )
    synced_after = None
    if result.exit_after_sigterm_s is not None:
        synced_after = (
            (result.sigterm_after_notice_s or 0.0)
            + result.exit_after_sigterm_s
            + time.monotonic()
            - after_exit
        )
    report = AttemptReport(
        number=setup.number,
        outcome=outcome,
        reason=reason,
        exit_code=result.exit_code,
        notice_source=result.notice.source if result.notice else None,
        notice_at=result.notice_at,
        window_s=result.window_s,
        plan=plans[0][0] if plans else None,
        checkpoint_step=int(marker["step"]) if marker and marker.get("step") is not None else None,
        steps_redone=redone,
        sigterm_after_notice_s=result.sigterm_after_notice_s,
        exit_after_sigterm_s=result.exit_after_sigterm_s,
        synced_after_notice_s=synced_after,
        sync_s=sync_s,
        seconds=result.seconds,
        nodes=tuple({**n.__dict__, "node": setup.nodes[n.node]} for n in result.nodes),
        notice_node=setup.nodes[result.notice.node]
        if result.notice is not None and result.notice.node is not None and len(setup.nodes) > 1
        else None,
    )
    observer.emit(Kind.ENDED, f"ended: {reason}", **_fields(report))
    return report


def _rendezvous(setup: AttemptSetup) -> AbstractContextManager[Rendezvous | None]:
    """Where this attempt's agents meet. A c10d rendezvous's store is hosted on node 0's machine
    (the primary's) from before its agent starts until after the last has exited, by the
    interpreter torchrun runs with (see :mod:`lightning_grid.launcher.rendezvous_store`); the
    other machines' agents, and a static rendezvous, are given the rendezvous as it is."""
    rendezvous = setup.rendezvous
    if rendezvous is None or rendezvous.backend != "c10d" or not setup.primary:
        return contextlib.nullcontext(rendezvous)
    return rendezvous_store.hosted(rendezvous, setup.spec.python or sys.executable)


def _launches(setup: AttemptSetup, rendezvous: Rendezvous, env: dict[str, str]) -> list[Launch]:
    """One torchrun agent per node run here. Each node's processes carry its number, and on a
    machine with GPUs each local node gets its own share of them."""
    python = setup.spec.python or sys.executable
    devices = (setup.devices or "").split(",") if setup.devices else []
    per_node = rendezvous.nproc_per_node
    launches = []
    for position, node in enumerate(setup.nodes):
        node_env = {**env, ENV_NODE: str(node)}
        share = devices[position * per_node : (position + 1) * per_node]
        if len(setup.nodes) > 1 and len(share) == per_node:
            node_env["CUDA_VISIBLE_DEVICES"] = ",".join(share)
        command = torchrun_command(
            python, setup.command, rendezvous, shutdown_timeout=setup.spec.grace_period
        )
        launches.append(Launch(command, node_env, torchrun=True))
    return launches


def _markers(store: CheckpointStore, observer: Observer) -> tuple[dict[str, Any] | None, bool]:
    """What the script left: a store that does not answer now is an event, and the attempt is then
    judged without its markers (a preemption "without a marker"), never a crashed launcher."""
    try:
        return store.read_marker(), store.read_marker(COMPLETED_MARKER) is not None
    except Exception as exc:  # any backend's failure
        observer.emit(Kind.WARNING, f"cannot read the markers in {store.url}: {_one_line(exc)}")
        return None, False


def _past_newest_checkpoint(progress_file: str | None, store: CheckpointStore) -> int | None:
    """After a SIGKILL or a crash: how far training got (the script's progress note) past the
    newest committed checkpoint, which is where the next attempt resumes. None: unknown (the
    script never noted progress, e.g. it does not use Resumable)."""
    try:
        with open(progress_file or "") as handle:
            reached = int(handle.read().strip())
        newest = next(iter(store.committed()), None)
    except Exception:  # no note, a torn one, or a store that does not answer: unknown
        return None
    return max(0, reached - (newest.step if newest is not None else 0))


def _lost_steps(setup: AttemptSetup, store: CheckpointStore, observer: Observer) -> int:
    """Steps the story says were checkpointed but the store no longer has (a deleted or replaced
    checkpoint folder): this attempt trains them again, and the bill says so."""
    expected = setup.last_checkpoint_step
    if not expected:
        return 0
    newest = next(iter(store.committed()), None)
    have = newest.step if newest is not None else 0
    if have >= expected:
        return 0
    where = f"step {have}" if newest is not None else "the start"
    observer.emit(
        Kind.WARNING,
        f"the checkpoint at step {expected} is gone from {store.url}; training resumes from {where}",
        expected_step=expected,
        found_step=have,
    )
    return expected - have


def _last_line(path: str, limit: int = 200) -> str:
    """The last non-empty line of a log (read from its end: logs can be large)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.path.getsize(path) - 4096))
            tail = handle.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip(": ")


def _fields(report: AttemptReport) -> dict[str, Any]:
    data = dict(report.__dict__)
    data["outcome"] = report.outcome.value
    return data


def _restore(setup: AttemptSetup, observer: Observer) -> None:
    """The execution directory as the last attempt left it; on an agent's first machine, the other
    way round: the directory it was started in becomes the experiment's."""
    execdir = setup.layout.execdir
    if setup.fresh:
        shutil.rmtree(setup.workdir, ignore_errors=True)
    os.makedirs(setup.workdir, exist_ok=True)
    if artifacts.has_snapshot(execdir):
        stats = artifacts.restore(execdir, setup.workdir)
        observer.emit(
            Kind.RESTORED, f"execution directory restored ({stats.describe()})", seconds=stats.seconds
        )
    elif setup.primary:
        stats = artifacts.upload(setup.workdir, execdir)
        observer.emit(
            Kind.CAPTURED, f"execution directory captured ({stats.describe()})", seconds=stats.seconds
        )


def save_workdir(workdir: str, layout: StoreLayout, observer: Observer) -> float | None:
    """Sync an attempt's directory; a store that fails here is an event, not a lost experiment
    (the checkpoints went to the store directly). Returns the seconds it took (None: failed)."""
    try:
        sync = artifacts.upload(workdir, layout.execdir)
    except Exception as exc:  # any backend's failure (botocore's are not OSErrors)
        observer.emit(
            Kind.SYNC_FAILED, f"saving the execution directory failed: {_one_line(exc)}", error=str(exc)
        )
        return None
    observer.emit(
        Kind.SYNCED,
        f"execution directory saved ({sync.describe()})",
        seconds=round(sync.seconds, 3),
        files=sync.files,
        transferred=sync.transferred,
    )
    return sync.seconds


def conclude(
    result: AttemptResult,
    marker: dict[str, Any] | None,
    completed: bool,
    resumable: bool,
    grace_period: float,
) -> tuple[Outcome, str]:
    """The attempt's outcome and its one-line reason, from the process result and the markers the
    script left (PREEMPTED: it saved and left at the notice; COMPLETED: it had finished on its own)."""
    noticed = result.notice is not None and result.notice.source != "user"
    if noticed and result.exit_code == 0 and marker is None and completed:
        noticed = False  # training had finished and the script ended on its own: a success
    if result.notice is None and not result.stopped:
        if result.lost_node is not None:
            # A machine gone without notice: a preemption the cloud did not announce. The others
            # could not cut a checkpoint without it; the newest committed one is the resume point.
            return Outcome.KILLED, (
                f"node {result.lost_node} lost without notice (exit {result.nodes[result.lost_node].exit_code});"
                " the other nodes were stopped"
            )
        if result.failed_node is not None:
            code = result.nodes[result.failed_node].exit_code
            return Outcome.FAILED, f"node {result.failed_node} exited {code}; the other nodes were stopped"
        if result.exit_code == 0 and marker is not None and not completed:
            # The script saved and left on a signal this launcher did not send: another node's
            # notice (its ranks told ours through the collective), or a scheduler's SIGTERM.
            noticed = True
    outcome = classify(result.exit_code, noticed, result.killed_after_grace, resumable, result.stopped)
    if outcome is Outcome.PREEMPTED:
        redo = steps_redone(outcome, marker)
        if marker is None or marker.get("step") is None:
            return outcome, "preempted; exited 0 (no checkpoint marker)"
        if redo:
            return outcome, (
                f"preempted; no new save fitted, kept the checkpoint at step {marker['step']} ({redo} steps to redo)"
            )
        return outcome, f"preempted; checkpoint at step {marker['step']}"
    if outcome is Outcome.KILLED and result.escalated:
        return outcome, "killed at once by a second interruption of the launcher (a second Ctrl-C)"
    if outcome is Outcome.KILLED:
        allowed = result.window_s if result.window_s is not None else grace_period
        return outcome, f"no exit within the {allowed:.3g}s the notice allowed: SIGKILL"
    if outcome is Outcome.FAILED:
        return outcome, f"exited {result.exit_code}"
    return outcome, outcome.value


def steps_redone(outcome: Outcome, marker: dict[str, Any] | None) -> int | None:
    """Steps the next attempt computes again: none after a full save; those since the checkpoint
    kept when no new save fitted the notice's window; unknown after a SIGKILL."""
    if outcome is not Outcome.PREEMPTED or marker is None or marker.get("step") is None:
        return None
    return max(0, int(marker.get("left_at", marker["step"])) - int(marker["step"]))
