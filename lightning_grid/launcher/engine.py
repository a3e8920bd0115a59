"""The engine behind ``lightning-grid run`` and ``Experiment(...).run()``: submit, supervise, relaunch.

One supervision loop with the restart budgets; each attempt is restore → run → classify → sync.
A file lock per experiment makes sure two launchers never run the same experiment at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec
import psutil

from lightning_grid.checkpoints import COMPLETED_MARKER, CheckpointStore
from lightning_grid.contract import Contract, default_home
from lightning_grid.errors import LightningGridError, UsageError
from lightning_grid.launcher import artifacts, instances
from lightning_grid.launcher.experiment import Outcome, Status, classify, decide
from lightning_grid.launcher.notices import (
    LauncherSignals,
    Notice,
    NoticeSource,
    SimulatedPreemption,
    cloud_notices,
)
from lightning_grid.launcher.registry import ExperimentRow, Registry
from lightning_grid.launcher.supervisor import attempt_env, run_attempt
from lightning_grid.launcher.window import ShutdownWindow

__all__ = ["Spec", "Engine", "parse_simulation"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ADJECTIVES = ["brisk", "calm", "eager", "lucid", "nimble", "quiet", "rapid", "sturdy", "vivid", "witty"]
_NOUNS = ["falcon", "otter", "lynx", "heron", "badger", "comet", "maple", "quartz", "tern", "walrus"]


@dataclass
class Spec:
    """What the user asked for (the CLI and the SDK both build one)."""

    script: str
    args: list[str] = field(default_factory=list)
    name: str | None = None
    resumable: bool = False
    use_spot: bool = False
    instance_type: str = "local"
    max_restarts: int = 20
    retries: int = 0
    artifacts: str | None = None
    simulate_preemptions: list[float] = field(default_factory=list)
    grace_period: float = 120.0
    cloud: str = "none"  # where interruption notices come from: aws, gcp, azure, auto, none
    every_n_train_steps: int | None = None  # periodic saves, for scripts that do not add Resumable
    every_n_seconds: float | None = None


def parse_simulation(text: str | None) -> list[float]:
    if not text:
        return []
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(
            f"--simulate-preemptions must be seconds separated by commas, got {text!r}"
        ) from None
    if not values or any(v < 0 for v in values):
        raise UsageError(f"--simulate-preemptions must be non-negative seconds, got {text!r}")
    return values


class Engine:
    def __init__(self, home: str | None = None, echo: bool = True, out: IO[str] | None = None) -> None:
        self.home = home or default_home()
        self.registry = Registry(self.home)
        self.echo = echo
        self.out = out or sys.stderr
        self._sync_s: dict[str, float] = {}  # the last execution-directory sync, per experiment

    def say(self, message: str) -> None:
        print(f"lightning-grid: {message}", file=self.out, flush=True)

    # -- submit ------------------------------------------------------------------------------------
    def submit(self, spec: Spec) -> ExperimentRow:
        script = os.path.abspath(spec.script)
        if not os.path.exists(script):
            raise UsageError(f"script not found: {spec.script}")
        if os.path.isdir(script):
            raise UsageError(f"{spec.script} is a directory; give the script to run")
        instance = instances.lookup(spec.instance_type)
        instances.visible_devices(instance, _gpu_count())  # more GPUs than this machine has: say so now
        if spec.max_restarts < 0:
            raise UsageError(f"--max_restarts must be >= 0, got {spec.max_restarts}")
        if spec.retries < 0:
            raise UsageError(f"--retries must be >= 0, got {spec.retries}")
        if spec.cloud not in ("none", "auto", "aws", "gcp", "azure"):
            raise UsageError(f"unknown --cloud {spec.cloud!r}; choose aws, gcp, azure, auto or none")
        if spec.grace_period <= 0:
            raise UsageError(f"--grace-period must be > 0 seconds, got {spec.grace_period}")
        if spec.every_n_train_steps is not None and spec.every_n_train_steps < 1:
            raise UsageError(f"--every-n-train-steps must be >= 1, got {spec.every_n_train_steps}")
        if spec.every_n_seconds is not None and spec.every_n_seconds <= 0:
            raise UsageError(f"--every-n-seconds must be > 0, got {spec.every_n_seconds}")
        name = spec.name or self._generate_name()
        if not _NAME.match(name):
            raise UsageError(f"invalid experiment name {name!r}: letters, digits, '.', '_', '-' (max 64)")
        store = spec.artifacts or os.path.join(self.home, "artifacts")
        if "://" not in store:
            store = os.path.abspath(store)  # the script runs elsewhere: a relative path would move with it
        artifacts_url = store.rstrip("/") + f"/{name}"
        _check_url(artifacts_url)
        if self.registry.exists(name):
            raise UsageError(
                f"an experiment named {name!r} already exists (see: lightning-grid status {name})"
            )
        now = time.time()
        row = ExperimentRow(
            name=name, status=Status.QUEUED, script=os.path.basename(script), args=list(spec.args),
            source_dir=os.path.dirname(script), artifacts=artifacts_url, resumable=spec.resumable,
            use_spot=spec.use_spot, instance_type=instance.name, max_restarts=spec.max_restarts,
            retries=spec.retries, grace_period=spec.grace_period, simulate=list(spec.simulate_preemptions),
            cloud=spec.cloud, restarts=0, failures=0, reason="", stop_requested=False, created=now, updated=now,
            every_n_train_steps=spec.every_n_train_steps, every_n_seconds=spec.every_n_seconds,
        )  # fmt: skip
        with self._lock(name):
            # The execution directory starts as a copy of the script's folder, kept in the store;
            # captured before the experiment exists, so a failed capture leaves nothing half-made.
            stats = artifacts.upload(row.source_dir, self.execdir_url(row))
            self.registry.create(row)
            self.registry.note(
                name, f"execution directory captured from {row.source_dir}: {stats.describe()}"
            )
        if spec.simulate_preemptions and not spec.use_spot:
            self.say(
                "note: --simulate-preemptions without --use_spot: preemptions only happen on spot capacity"
            )
        return row

    def _generate_name(self) -> str:
        for _ in range(100):
            name = f"{random.choice(_ADJECTIVES)}-{random.choice(_NOUNS)}-{random.randint(100, 999)}"
            if not self.registry.exists(name):
                return name
        raise LightningGridError("could not generate a free experiment name; pass --name")

    # -- paths -------------------------------------------------------------------------------------
    @staticmethod
    def execdir_url(row: ExperimentRow) -> str:
        return f"{row.artifacts}/execdir"

    @staticmethod
    def checkpoints_url(row: ExperimentRow) -> str:
        return f"{row.artifacts}/checkpoints"

    def _attempt_dir(self, name: str, number: int) -> str:
        return os.path.join(self.home, "runs", name, f"attempt-{number}")

    @contextlib.contextmanager
    def _lock(self, name: str, wait: bool = False) -> Iterator[None]:
        folder = os.path.join(self.home, "locks")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{name}.lock"), "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise UsageError(f"experiment {name!r} is being run by another launcher") from None
            yield

    # -- run ---------------------------------------------------------------------------------------
    def run(self, name: str) -> ExperimentRow:
        """Supervise ``name`` until it ends or this launcher is told to stop. Returns the final row."""
        with self._lock(name):
            row = self.registry.get(name)
            if row.status.is_terminal():
                raise UsageError(f"experiment {name!r} has already ended ({row.status.value})")
            if self._wait_for_orphans(name):
                self._repair(name, "the launcher was killed; its script got SIGTERM")
            else:
                self._repair(name, "the previous launcher stopped after an attempt ended")
            signals = LauncherSignals()
            signals.install()
            try:
                return self._loop(row, signals)
            finally:
                signals.uninstall()

    def _wait_for_orphans(self, name: str) -> bool:
        """A previous launcher was SIGKILLed: its script got SIGTERM (parent-death signal) and may still
        be saving. Never run two attempts at once: wait for it, within its grace period. Returns
        whether there was such an attempt (now recorded as ended, its directory saved)."""
        attempts = self.registry.attempts(name)
        if not attempts or attempts[-1].ended is not None or attempts[-1].pid is None:
            return False
        last = attempts[-1]
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(last.pid)
            if proc.create_time() <= last.started + 1:
                self.say(f"waiting for attempt {last.number} (pid {last.pid}) of a previous launcher to exit")
                try:
                    proc.wait(timeout=self.registry.get(name).grace_period)
                except psutil.TimeoutExpired:
                    proc.kill()
        self.registry.update_attempt(
            name,
            last.number,
            ended=time.time(),
            outcome=Outcome.KILLED.value,
            reason="its launcher was killed",
        )
        exec_dir = self._attempt_dir(name, last.number)
        if os.path.isdir(exec_dir):  # what the script saved on its way out
            self._save_execdir(self.registry.get(name), last.number, exec_dir)
        return True

    def _loop(self, row: ExperimentRow, signals: LauncherSignals) -> ExperimentRow:
        name = row.name
        instance = instances.lookup(row.instance_type)
        available = _gpu_count()
        devices = instances.visible_devices(instance, available, os.environ.get("CUDA_VISIBLE_DEVICES"))
        if instance.gpus and not available:
            self.say(
                f"{instance.name} has {instance.gpus} {instance.gpu} GPU(s); this machine has none, running on CPU"
            )
        while True:
            row = self.registry.get(name)
            if row.stop_requested:
                self._finish_stop(row)
                return self.registry.get(name)
            if signals.received is not None and row.status is Status.PENDING:
                # Told to stop between attempts: starting one now would only be interrupted at once.
                self.say(f"{name} is pending; continue it with: lightning-grid run --resume {name}")
                return row
            number = len(self.registry.attempts(name)) + 1
            if row.status is Status.PENDING:
                self.registry.transition(name, Status.RESTORING, f"restoring for attempt {number}")
            exec_dir = self._attempt_dir(name, number)
            shutil.rmtree(exec_dir, ignore_errors=True)
            stats = artifacts.restore(self.execdir_url(row), exec_dir)
            self.registry.note(name, f"attempt {number}: execution directory restored ({stats.describe()})")
            status_now = self.registry.get(name).status
            if status_now is not Status.RUNNING:
                self.registry.transition(name, Status.RUNNING, f"attempt {number} started")
            outcome = self._attempt(row, number, exec_dir, devices, signals)
            self._save_execdir(row, number, exec_dir)
            row = self.registry.get(name)
            decision = decide(outcome, row.restarts, row.max_restarts, row.failures, row.retries)
            if decision.relaunch:
                preempted = outcome in (Outcome.PREEMPTED, Outcome.KILLED)
                counters = {"restarts": row.restarts + 1} if preempted else {"failures": row.failures + 1}
                # After a notice the experiment waits (pending); a plain crash is relaunched at once.
                target = (
                    Status.PENDING if row.status is Status.INTERRUPTING or preempted else Status.RESTORING
                )
                self.registry.transition(name, target, decision.reason, **counters)
            else:
                self.registry.transition(name, decision.status, decision.reason)
            if not decision.relaunch:
                return self.registry.get(name)
            if signals.received is not None:
                self.say(f"{name} is pending; continue it with: lightning-grid run --resume {name}")
                return self.registry.get(name)
            self.say(f"{name}: {decision.reason}; relaunching")

    def _save_execdir(self, row: ExperimentRow, number: int, exec_dir: str) -> None:
        """Sync an attempt's directory; a store that fails here is an event, not a stuck experiment."""
        try:
            sync = artifacts.upload(exec_dir, self.execdir_url(row))
        except LightningGridError as exc:
            self.registry.note(row.name, f"attempt {number}: saving the execution directory failed: {exc}")
            self.say(f"warning: {exc}")
            return
        self._sync_s[row.name] = sync.seconds
        self.registry.note(row.name, f"attempt {number}: execution directory saved ({sync.describe()})")

    def _repair(self, name: str, why: str) -> None:
        """A launcher that died left a live status behind an ended attempt: record the interruption
        as it happened (interrupted, then waiting) so the experiment can continue."""
        row = self.registry.get(name)
        attempts = self.registry.attempts(name)
        if (
            not attempts
            or attempts[-1].ended is None
            or row.status not in (Status.RUNNING, Status.INTERRUPTING)
        ):
            return
        if row.status is Status.RUNNING:
            self.registry.transition(name, Status.INTERRUPTING, why)
        self.registry.transition(name, Status.PENDING, "waiting for a launcher")

    def _attempt(
        self, row: ExperimentRow, number: int, exec_dir: str, devices: str | None, signals: LauncherSignals
    ) -> Outcome:
        name = row.name
        ckpt_url = self.checkpoints_url(row)
        run_dir = os.path.join(self.home, "runs", name)
        log_path = os.path.join(run_dir, f"attempt-{number}.log")
        os.makedirs(run_dir, exist_ok=True)
        store = CheckpointStore(ckpt_url)
        window = ShutdownWindow(
            store,
            notice_path=os.path.join(run_dir, f"attempt-{number}.notice.json"),
            spool_dir=os.path.join(run_dir, f"spool-{number}"),
            sync_s=self._sync_s.get(name, 0.0),
        )
        contract = Contract(
            resumable=row.resumable,
            checkpoints=ckpt_url,
            experiment=name,
            attempt=number,
            notice_file=window.notice_path,
            every_n_train_steps=row.every_n_train_steps,
            every_n_seconds=row.every_n_seconds,
        )
        env = attempt_env(contract, devices)
        simulated = row.simulate[number - 1] if row.use_spot and number - 1 < len(row.simulate) else None
        sources: list[NoticeSource] = [SimulatedPreemption(simulated), signals, *cloud_notices(row.cloud)]

        def on_start(pid: int) -> None:
            self.registry.start_attempt(name, number, pid, log_path)

        def on_notice(notice: Notice, window_s: float) -> None:
            self.registry.note(name, f"attempt {number}: notice from {notice.source}: {notice.reason}")
            plan = window.plan(window_s) if row.resumable else None
            if plan is not None:
                self.registry.note(name, f"attempt {number}: shutdown plan {plan.plan.value}: {plan.reason}")
            if notice.source != "user":  # a user's stop goes straight to stopped after the attempt
                self.registry.transition(name, Status.INTERRUPTING, f"{notice.reason}; SIGTERM sent")
            self.say(f"{name}: {notice.reason}; sending SIGTERM, {window_s:g}s until SIGKILL")

        store.clear_marker()
        store.clear_marker(COMPLETED_MARKER)
        result = run_attempt(
            [sys.executable, row.script, *row.args],
            cwd=exec_dir,
            env=env,
            log_path=log_path,
            notices=sources,
            grace_period=row.grace_period,
            stop_requested=lambda: self.registry.stop_requested(name),
            on_start=on_start,
            on_notice=on_notice,
            echo=self.echo,
        )
        published = window.publish()
        if published is not None:
            self.registry.note(name, f"attempt {number}: {published}")
        marker = store.read_marker()
        noticed = result.notice is not None and result.notice.source != "user"
        if noticed and result.exit_code == 0 and marker is None and store.read_marker(COMPLETED_MARKER):
            noticed = False  # training had finished and the script ended on its own: a success
        outcome = classify(
            result.exit_code, noticed, result.killed_after_grace, row.resumable, result.stopped
        )
        reason = outcome.value
        redo = _steps_redone(outcome, marker)
        if outcome is Outcome.PREEMPTED:
            if marker is None:
                reason = "preempted; exited 0 (no checkpoint marker)"
            elif redo:
                reason = f"preempted; no new save fitted, kept the checkpoint at step {marker['step']} ({redo} steps to redo)"
            else:
                reason = f"preempted; checkpoint at step {marker['step']}"
        elif outcome is Outcome.KILLED:
            allowed = result.window_s if result.window_s is not None else row.grace_period
            reason = f"no exit within the {allowed:.3g}s the notice allowed: SIGKILL"
        elif outcome is Outcome.FAILED:
            reason = f"exited {result.exit_code}"
        self.registry.update_attempt(
            name,
            number,
            ended=time.time(),
            exit_code=result.exit_code,
            outcome=outcome.value,
            reason=reason,
            notice_at=result.notice_at,
            checkpoint_step=marker["step"] if marker else None,
            steps_redone=redo,
        )
        if result.exit_after_sigterm_s is not None:
            used = ""
            if result.window_s:
                used = f", {100 * result.exit_after_sigterm_s / result.window_s:.0f}% of its {result.window_s:.0f}s window"
            self.registry.note(
                name,
                f"attempt {number}: SIGTERM {result.sigterm_after_notice_s or 0:.2f}s after the notice, exit"
                f" {result.exit_after_sigterm_s:.2f}s after SIGTERM{used}",
            )
        return outcome

    def _finish_stop(self, row: ExperimentRow) -> None:
        if not row.status.is_terminal():
            self.registry.transition(row.name, Status.STOPPED, "stopped by the user")

    # -- stop --------------------------------------------------------------------------------------
    def stop(self, name: str) -> ExperimentRow:
        row = self.registry.get(name)
        if row.status.is_terminal():
            return row
        self.registry.request_stop(name)
        try:
            with self._lock(name):
                # No launcher holds it: nobody else will act on the request.
                self._finish_stop(self.registry.get(name))
        except UsageError:
            deadline = time.monotonic() + row.grace_period + 30
            while time.monotonic() < deadline and not self.registry.get(name).status.is_terminal():
                time.sleep(0.2)
        return self.registry.get(name)


def _steps_redone(outcome: Outcome, marker: dict[str, Any] | None) -> int | None:
    """Steps the next attempt computes again: none after a full save; those since the checkpoint
    kept when no new save fitted the notice's window; unknown after a SIGKILL."""
    if outcome is not Outcome.PREEMPTED or marker is None:
        return None
    return max(0, int(marker.get("left_at", marker["step"])) - int(marker["step"]))


def _gpu_count() -> int:
    """GPUs this launcher may hand out, without importing torch (the launcher stays small and quick)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    proc_dir = "/proc/driver/nvidia/gpus"
    if os.path.isdir(proc_dir):
        return len(os.listdir(proc_dir))
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return 0
        return sum(line.startswith("GPU ") for line in out.splitlines())
    return 0


def _check_url(url: str) -> None:
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    try:
        fsspec.get_filesystem_class(protocol)
    except (ValueError, ImportError) as exc:
        raise UsageError(
            f"unknown or unavailable scheme {protocol!r} in --artifacts {url!r}: {exc}"
        ) from None
