"""The local front end behind ``lightning-grid run`` and ``Experiment(...).run()``: submit, supervise, relaunch.

An attempt is :func:`lightning_grid.launcher.attempt.run`; what follows it is
:func:`~lightning_grid.launcher.experiment.decide`. This module only applies the decision: it keeps
the story in the registry, waits out a crash retry's backoff, and relaunches on this machine. A
file lock per experiment makes sure two launchers never run the same experiment at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

import fsspec
import psutil

from lightning_grid.contract import default_home
from lightning_grid.errors import LightningGridError, StoreError, UsageError
from lightning_grid.launcher import artifacts, attempt, instances, slurm
from lightning_grid.launcher.events import Kind
from lightning_grid.launcher.experiment import Budgets, Outcome, Status, decide
from lightning_grid.launcher.layout import StoreLayout, new_id
from lightning_grid.launcher.nodes import Rendezvous
from lightning_grid.launcher.notices import LauncherSignals, Notice, cloud_notices, notice_sources
from lightning_grid.launcher.processes import kill_attempt_processes
from lightning_grid.launcher.registry import ExperimentRow, Registry
from lightning_grid.launcher.spec import Spec, validate_name

__all__ = ["Engine"]

_ADJECTIVES = ["brisk", "calm", "eager", "lucid", "nimble", "quiet", "rapid", "sturdy", "vivid", "witty"]
_NOUNS = ["falcon", "otter", "lynx", "heron", "badger", "comet", "maple", "quartz", "tern", "walrus"]


class _RegistryObserver:
    """An attempt's story, told to the registry."""

    def __init__(self, engine: Engine, name: str, number: int) -> None:
        self.engine, self.registry, self.name, self.number = engine, engine.registry, name, number

    def emit(self, kind: Kind, message: str, **data: Any) -> None:
        self.registry.record(
            self.name, kind, f"attempt {self.number}: {message}", attempt=self.number, **data
        )
        if kind in (Kind.SYNC_FAILED, Kind.WARNING):
            self.engine.say(f"warning: {message}")

    def started(self, pid: int, log_path: str) -> None:
        self.registry.start_attempt(self.name, self.number, pid, log_path)
        if self.registry.get(self.name).status is not Status.RUNNING:
            self.registry.transition(
                self.name, Status.RUNNING, f"attempt {self.number} started", attempt=self.number
            )

    def interrupting(self, notice: Notice, window_s: float) -> None:
        if notice.source != "user":  # a user's stop goes straight to stopped after the attempt
            self.registry.transition(
                self.name, Status.INTERRUPTING, f"{notice.reason}; SIGTERM sent", attempt=self.number
            )
        self.engine.say(f"{self.name}: {notice.reason}; sending SIGTERM, {window_s:g}s until SIGKILL")

    def stop_requested(self) -> bool:
        return self.registry.stop_requested(self.name)


class Engine:
    def __init__(self, home: str | None = None, echo: bool = True, out: IO[str] | None = None) -> None:
        self.home = home or default_home()
        self.echo = echo
        self.out = out or sys.stderr

    @functools.cached_property
    def registry(self) -> Registry:
        """Opened on first use: a command rejected for its input leaves no home behind."""
        return Registry(self.home)

    def say(self, message: str) -> None:
        print(f"lightning-grid: {message}", file=self.out, flush=True)

    # -- submit ------------------------------------------------------------------------------------
    def submit(self, spec: Spec) -> ExperimentRow:
        """Check everything, then create the experiment; a rejected spec leaves nothing behind."""
        spec = spec.validated()
        script = os.path.abspath(spec.script)
        if not spec.script or not os.path.exists(script):
            raise UsageError(f"script not found: {spec.script}")
        if os.path.isdir(script):
            raise UsageError(f"{spec.script} is a directory; give the script to run")
        if spec.python and spec.backend == "local":
            found = shutil.which(spec.python)
            if found is None:
                raise UsageError(f"--python {spec.python}: no such interpreter on this machine")
            spec = spec.with_(python=os.path.abspath(found))  # attempts run in another folder
            if spec.distributed:
                _check_torchrun_python(spec.python or found)
        instance = instances.lookup(spec.instance_type)
        if spec.backend == "slurm":
            slurm.precheck(spec)  # SLURM's own word on the request, before anything is written
        else:
            instances.visible_devices(
                instance, instances.gpu_count()
            )  # more GPUs than this machine has: say so now
        name = spec.name or self._generate_name()
        root = spec.artifacts or os.path.join(self.home, "artifacts")
        if "://" not in root:
            root = os.path.abspath(root)  # the script runs elsewhere: a relative path would move with it
        _check_url(root)
        layout = StoreLayout.of(root, name)
        if self.registry.exists(name):
            raise UsageError(
                f"an experiment named {name!r} already exists (see: lightning-grid status {name})"
            )
        spec = spec.with_(script=os.path.basename(script), name=name, artifacts=root)
        now = time.time()
        row = ExperimentRow(
            name=name, id=new_id(), status=Status.QUEUED, spec=spec, source_dir=os.path.dirname(script),
            artifacts=layout.base, created=now, updated=now,
        )  # fmt: skip
        with self._lock(name, remove_on_error=True):
            # The folder in the store is bound to this experiment before anything is copied into it,
            # and the execution directory is captured before the experiment exists, so a failure
            # leaves nothing half-made (and another experiment's folder untouched).
            fresh = False
            try:
                fs, base_path = fsspec.core.url_to_fs(layout.base)
                fresh = not fs.exists(base_path)  # only what this submit created is removed on failure
                layout.claim(row.id, name)
                stats = artifacts.upload(row.source_dir, layout.execdir)
            except UsageError:
                raise
            except Exception as exc:  # any backend's failure: the store cannot be used, say why
                if fresh:
                    _remove_quietly(layout.base)
                raise UsageError(f"cannot use the artifact store {root}: {_one_line(exc)}") from None
            self.registry.create(row)
            self.registry.record(
                name,
                Kind.CAPTURED,
                f"execution directory captured from {row.source_dir}: {stats.describe()}",
                seconds=stats.seconds,
            )
        if spec.backend == "slurm":
            slurm.submit(self, row)
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

    def _run_dir(self, name: str) -> str:
        return os.path.join(self.home, "runs", name)

    def _attempt_dir(self, name: str, number: int) -> str:
        return os.path.join(self._run_dir(name), f"attempt-{number}")

    @contextlib.contextmanager
    def _lock(self, name: str, remove_on_error: bool = False) -> Iterator[None]:
        """One launcher per experiment. ``remove_on_error``: a submit that fails leaves no lock file."""
        validate_name(name)  # the name becomes a file name: never a path
        folder = os.path.join(self.home, "locks")
        os.makedirs(folder, mode=0o700, exist_ok=True)
        path = os.path.join(folder, f"{name}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "r+") as handle:
            deadline = time.monotonic() + 1.0  # a reader's brief look (``supervised``) is not a launcher
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise UsageError(f"experiment {name!r} is being run by another launcher") from None
                    time.sleep(0.05)
            try:
                yield
            except BaseException:
                if remove_on_error:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                raise

    def supervised(self, name: str) -> bool:
        """Whether a launcher holds this experiment right now (a non-blocking look at its lock)."""
        validate_name(name)
        path = os.path.join(self.home, "locks", f"{name}.lock")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing releases a lock we took
        return False

    # -- run ---------------------------------------------------------------------------------------
    def run(self, name: str) -> ExperimentRow:
        """Supervise ``name`` until it ends or this launcher is told to stop. Returns the final row."""
        validate_name(name)
        self.registry.get(name)  # a clear error for an unknown name, before any file is made
        with self._lock(name):
            row = self.registry.get(name)
            if row.status is Status.FAILED and row.spec.backend == "slurm":
                self.registry.clear_stop(name)
                slurm.resume_failed(self, row)  # a new SLURM job continues from the checkpoints
                return slurm.follow(self, name)
            if row.status is Status.FAILED:
                # The user asks for it, after fixing what failed (space freed, a bug fixed): its
                # committed checkpoints are still there to continue from. A stop asked for earlier
                # is not carried into the new life.
                self.registry.clear_stop(name)
                self.registry.transition(name, Status.PENDING, "resumed by the user after it failed")
                row = self.registry.get(name)
            if row.status.is_terminal():
                raise UsageError(f"experiment {name!r} has already ended ({row.status.value})")
            if row.spec.backend == "slurm":
                return slurm.follow(self, name)  # SLURM runs and requeues; this launcher follows
            if self._end_orphan(name, wait=True):
                self._repair(name, "the launcher was killed; its script got SIGTERM")
            else:
                self._repair(name, "the previous launcher stopped after an attempt ended")
            row = self.registry.get(name)
            if row.status.is_terminal():  # the repair's decision ended it (a budget, not resumable)
                return row
            signals = LauncherSignals()
            signals.install()
            try:
                return self._loop(name, signals)
            finally:
                signals.uninstall()

    def _end_orphan(self, name: str, wait: bool) -> bool:
        """A previous launcher was SIGKILLed: its script got SIGTERM (parent-death signal) and may
        still be saving. Never run two attempts at once: wait for it (``wait``) within its grace
        period, or signal it ourselves, then make sure nothing of its process group is left. A pid
        is only signalled if its start time matches the attempt's (pids are reused). Returns whether
        there was such an attempt (now recorded as ended, its directory saved)."""
        attempts = self.registry.attempts(name)
        last = attempts[-1] if attempts else None
        if last is None or last.ended is not None or last.pid is None:
            return False
        pid = last.pid
        row = self.registry.get(name)
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(pid)
            if proc.create_time() <= last.started + 1:
                self.say(f"ending attempt {last.number} (pid {last.pid}) of a previous launcher")
                if not wait:
                    _signal_group(pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=row.spec.grace_period)
                except psutil.TimeoutExpired:
                    pass
                _signal_group(pid, signal.SIGKILL)  # and whatever it left in its group
        # Its children outlive it when they ignore the SIGTERM or left its group: they name the
        # attempt in their environment.
        kill_attempt_processes(name, last.number, row.layout.checkpoints)
        self.registry.update_attempt(
            name,
            last.number,
            ended=time.time(),
            outcome=Outcome.KILLED.value,
            reason="its launcher was killed",
        )
        exec_dir = self._attempt_dir(name, last.number)
        if os.path.isdir(exec_dir):  # what the script saved on its way out
            attempt.save_workdir(exec_dir, row.layout, _RegistryObserver(self, name, last.number))
        return True

    def _repair(self, name: str, why: str) -> None:
        """A launcher that died left a live status behind an ended attempt: record the interruption
        as it happened and apply the same decision as after any attempt (budgets included)."""
        row = self.registry.get(name)
        attempts = self.registry.attempts(name)
        if (
            not attempts
            or attempts[-1].ended is None
            or row.status not in (Status.RUNNING, Status.INTERRUPTING)
        ):
            return
        last = attempts[-1]
        try:
            outcome = Outcome(last.outcome)
        except ValueError:
            outcome = Outcome.KILLED
        if outcome is Outcome.KILLED and not row.spec.resumable:
            outcome = Outcome.INTERRUPTED_NOT_RESUMABLE
        spec = row.spec
        decision = decide(
            outcome, Budgets(row.restarts, spec.max_restarts, row.failures, spec.retries, spec.retry_delay)
        )
        interrupted = (Outcome.KILLED, Outcome.PREEMPTED, Outcome.INTERRUPTED_NOT_RESUMABLE)
        if row.status is Status.RUNNING and outcome in interrupted:
            self.registry.transition(name, Status.INTERRUPTING, why, attempt=last.number)
        self.registry.transition(
            name,
            decision.status,
            f"{decision.reason} (attempt {last.number}: {last.reason or outcome.value})",
            attempt=last.number,
            restarts=decision.restarts,
            failures=decision.failures,
            retry_at=time.time() + decision.delay_s if decision.delay_s else None,
        )

    def _loop(self, name: str, signals: LauncherSignals) -> ExperimentRow:
        spec = self.registry.get(name).spec
        instance = instances.lookup(spec.instance_type)
        available = instances.gpu_count()
        devices = instances.visible_devices(instance, available, os.environ.get("CUDA_VISIBLE_DEVICES"))
        if instance.gpus and not available:
            self.say(
                f"{instance.name} has {instance.gpus} {instance.gpu} GPU(s); this machine has none, running on CPU"
            )
        waited = 0  # capacity checks that found too few machines (the simulation's next answer)
        while True:
            row = self.registry.get(name)
            if row.stop_requested:
                self._finish_stop(row)
                return self.registry.get(name)
            if signals.received is not None and row.status is Status.PENDING:
                # Told to stop between attempts: starting one now would only be interrupted at once.
                self.say(f"{name} is pending; continue it with: lightning-grid run --resume {name}")
                return row
            if row.retry_at is not None and time.time() < row.retry_at:
                time.sleep(min(0.5, row.retry_at - time.time()))
                continue
            if row.status is Status.PENDING and not self._notice_cleared(name, spec, signals):
                continue  # told to stop while waiting: the checks above act on it
            number = len(self.registry.attempts(name)) + 1
            machines = self._machines(name, spec, row.status, number + waited)
            if machines is None:
                waited += 1
                continue
            if row.status is Status.PENDING:
                self.registry.transition(
                    name, Status.RESTORING, f"restoring for attempt {number}", attempt=number
                )
            setup = attempt.AttemptSetup(
                number=number,
                spec=spec,
                command=spec.command(spec.python or sys.executable),
                workdir=self._attempt_dir(name, number),
                layout=row.layout,
                log_path=os.path.join(self._run_dir(name), f"attempt-{number}.log"),
                private_dir=os.path.join(self._run_dir(name), "private"),
                devices=devices,
                sync_s=self._last_sync_s(name),
                experiment_id=row.id,
                last_checkpoint_step=self._last_checkpoint_step(name),
                echo=self.echo,
                rendezvous=_local_rendezvous(spec, name, number),
                nodes=tuple(range(machines)),
            )
            try:
                report = attempt.run(
                    setup,
                    notice_sources(spec, number, signals, setup.nodes),
                    _RegistryObserver(self, name, number),
                )
            except StoreError as exc:
                # The store did not answer before the script started: nothing ran, nothing is lost.
                self.registry.transition(name, Status.PENDING, str(exc), attempt=number)
                self.say(f"{exc}; {name} is pending: continue it with: lightning-grid run --resume {name}")
                return self.registry.get(name)
            self.registry.update_attempt(
                name,
                number,
                ended=time.time(),
                exit_code=report.exit_code,
                outcome=report.outcome.value,
                reason=report.reason,
                notice_at=report.notice_at,
                checkpoint_step=report.checkpoint_step,
                steps_redone=report.steps_redone,
            )
            row = self.registry.get(name)
            budgets = Budgets(row.restarts, spec.max_restarts, row.failures, spec.retries, spec.retry_delay)
            decision = decide(report.outcome, budgets)
            self.registry.transition(
                name,
                decision.status,
                decision.reason,
                attempt=number,
                restarts=decision.restarts,
                failures=decision.failures,
                retry_at=time.time() + decision.delay_s if decision.delay_s else None,
            )
            if not decision.relaunch:
                return self.registry.get(name)
            if signals.received is not None:
                self.say(f"{name} is pending; continue it with: lightning-grid run --resume {name}")
                return self.registry.get(name)
            self.say(f"{name}: {decision.reason}; relaunching")

    def _machines(self, name: str, spec: Spec, status: Status, turn: int) -> int | None:
        """How many machines the next attempt runs on: all of them, or what the capacity simulation
        finds at this ``turn``. Too few (under ``--min-nodes``, or under all of them without it):
        None, after a note and a pause, and the experiment waits where it is (queued or pending)."""
        found = spec.num_nodes
        if spec.simulate_capacity:
            capacity = spec.simulate_capacity
            found = capacity[turn - 1] if turn <= len(capacity) else spec.num_nodes  # it came back
        need = spec.min_nodes or spec.num_nodes
        if found >= need:
            if found < spec.num_nodes:
                self.registry.note(
                    name,
                    f"capacity: {found} of {spec.num_nodes} machines; going on short-handed (--min-nodes {need})",
                )
            return found
        self.registry.note(
            name,
            f"capacity: {found} of {spec.num_nodes} machines, at least {need} needed: waiting ({status.value})",
        )
        self.say(f"{name}: {found} of {spec.num_nodes} machines available; waiting for capacity")
        time.sleep(1.0)
        return None

    def _notice_cleared(self, name: str, spec: Spec, signals: LauncherSignals, poll_s: float = 2.0) -> bool:
        """One notice is one preemption: while this machine's own interruption notice stands, a
        relaunch here would only be interrupted again (a restart storm that spends the budget in
        seconds). Wait in ``pending`` until the notice is withdrawn — or the machine goes, and
        this launcher with it. Returns False if told to stop while waiting."""
        announced = False
        while True:
            standing = next((n for n in (s.poll() for s in cloud_notices(spec.cloud)) if n), None)
            if standing is None:
                if announced:
                    self.registry.note(name, "the interruption notice was withdrawn: relaunching here")
                return True
            if not announced:
                announced = True
                self.registry.note(
                    name, f"{standing.source}'s interruption notice still stands: waiting for it to clear"
                )
                self.say(f"{name}: this machine's interruption notice still stands; waiting (pending)")
            deadline = time.monotonic() + poll_s
            while time.monotonic() < deadline:
                if signals.received is not None or self.registry.stop_requested(name):
                    return False
                time.sleep(0.1)

    def _last_checkpoint_step(self, name: str) -> int | None:
        steps = [a.checkpoint_step for a in self.registry.attempts(name) if a.checkpoint_step is not None]
        return max(steps) if steps else None

    def _last_sync_s(self, name: str) -> float:
        """How long the last execution-directory sync took, from the story (it outlives launchers)."""
        synced = [e for e in self.registry.events(name) if e.kind == Kind.SYNCED.value]
        return float(synced[-1].data.get("seconds") or 0.0) if synced else 0.0

    def _finish_stop(self, row: ExperimentRow) -> None:
        if not row.status.is_terminal():
            self.registry.transition(row.name, Status.STOPPED, "stopped by the user")

    # -- stop --------------------------------------------------------------------------------------
    def stop(self, name: str) -> ExperimentRow:
        validate_name(name)
        row = self.registry.get(name)
        if row.status.is_terminal():
            return row
        if row.spec.backend == "slurm":
            return slurm.stop(self, name)
        self.registry.request_stop(name)
        try:
            with self._lock(name):
                # No launcher holds it: nobody else will act on the request. A script its killed
                # launcher left running is ended here, not left burning money.
                self._end_orphan(name, wait=False)
                self._finish_stop(self.registry.get(name))
        except UsageError:
            deadline = time.monotonic() + row.spec.grace_period + 30
            while time.monotonic() < deadline and not self.registry.get(name).status.is_terminal():
                time.sleep(0.2)
        return self.registry.get(name)


def _remove_quietly(url: str) -> None:
    with contextlib.suppress(Exception):
        fs, path = fsspec.core.url_to_fs(url)
        fs.rm(path, recursive=True)


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _check_url(url: str) -> None:
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    try:
        fsspec.get_filesystem_class(protocol)
    except (ValueError, ImportError) as exc:
        raise UsageError(
            f"unknown or unavailable scheme {protocol!r} in --artifacts {url!r}: {exc}"
        ) from None


def _check_torchrun_python(python: str) -> None:
    """A run of several processes starts torchrun, and the rendezvous store, with ``--python``: one
    that cannot import torch's launcher is the user's to fix, so it is refused now, in one line,
    rather than found by every attempt (each would go pending, asking to be resumed)."""
    try:
        proc = subprocess.run(
            [python, "-c", "import torch.distributed.run"], capture_output=True, text=True, timeout=300
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UsageError(f"--python {python}: cannot run it ({exc})") from None
    if proc.returncode != 0:
        said = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        raise UsageError(
            f"--python {python}: cannot import torch.distributed, which a run of several processes"
            f" needs ({said[-1] if said else f'exit {proc.returncode}'})"
        )


def _local_rendezvous(spec: Spec, name: str, number: int) -> Rendezvous | None:
    """Every node on this machine: torchrun agents meeting on the loopback interface (c10d, its
    store hosted by the attempt on a port it binds: see launcher.rendezvous_store). None for a
    single process, which runs without torchrun."""
    if not spec.distributed:
        return None
    return Rendezvous(
        endpoint="127.0.0.1:0",
        run_id=f"{name}-{number}",
        num_nodes=spec.num_nodes,
        nproc_per_node=spec.nproc_per_node,
        min_nodes=spec.min_nodes,
    )
