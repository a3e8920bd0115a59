"""``lightning-grid agent``: the launcher's job on the spot VM itself, for provisioners that start it.

A cloud's autoscaling group, a SkyPilot managed job or a Kubernetes Job starts a machine and runs
``lightning-grid agent --artifacts URL --name NAME -- python train.py``. The agent restores the
execution directory (and so the checkpoints' location) from the artifact store, runs the command
with the environment contract, watches the cloud's metadata service (and its own SIGTERM, e.g. a
pod evicted on node drain), stops the script in order, syncs, and exits with a status the
provisioner understands: 0 done, 75 (EX_TEMPFAIL) "preempted, run me again", 1 failed.

There is no local registry on such machines: the story of the experiment is appended as JSON
lines to ``<URL>/<NAME>/events.jsonl``, which ``lightning-grid status NAME --artifacts URL`` reads
from anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from lightning_grid._io import atomic_write_bytes
from lightning_grid.checkpoints import CheckpointStore
from lightning_grid.contract import Contract
from lightning_grid.errors import StoreError, UsageError
from lightning_grid.launcher import artifacts
from lightning_grid.launcher.experiment import Outcome, classify
from lightning_grid.launcher.notices import (
    LauncherSignals,
    Notice,
    NoticeSource,
    SimulatedPreemption,
    cloud_notices,
)
from lightning_grid.launcher.supervisor import attempt_env, run_attempt
from lightning_grid.launcher.window import ShutdownWindow

__all__ = ["AgentSpec", "run_agent", "read_events", "summarize", "EX_PREEMPTED"]

log = logging.getLogger("lightning_grid")

EX_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"


@dataclass
class AgentSpec:
    command: list[str]
    artifacts: str
    name: str
    workdir: str = "."
    cloud: str = "auto"
    grace_period: float = 120.0
    simulate_preemption: float | None = None


class EventLog:
    """Append-only JSON lines in the artifact store (rewritten whole: object stores cannot append)."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self.fs, self.path = fsspec.core.url_to_fs(url)
        except (ValueError, ImportError) as exc:
            raise UsageError(f"cannot use artifact store {url!r}: {exc}") from exc

    def read(self) -> list[dict[str, Any]]:
        try:
            text = self.fs.cat_file(self.path).decode(errors="replace")
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreError(f"cannot read {self.url}: {exc}") from exc
        events = []
        for line in text.splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                log.warning("lightning-grid: skipping an unreadable line in %s", self.url)
        return events

    def append(self, kind: str, **fields: Any) -> None:
        events = self.read()
        events.append({"time": time.time(), "event": kind, **fields})
        data = "".join(json.dumps(e, sort_keys=True) + "\n" for e in events).encode()
        if isinstance(self.fs, LocalFileSystem):
            atomic_write_bytes(self.path, data)
        else:
            self.fs.pipe_file(self.path, data)


def _base(artifacts_url: str, name: str) -> str:
    return f"{artifacts_url.rstrip('/')}/{name}"


def read_events(artifacts_url: str, name: str) -> list[dict[str, Any]]:
    return EventLog(f"{_base(artifacts_url, name)}/events.jsonl").read()


def summarize(name: str, events: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The ``status --json`` shape, from the events an agent left in the store."""
    if not events:
        raise UsageError(f"no experiment named {name!r} in that artifact store")
    attempts = [e for e in events if e["event"] == "attempt_ended"]
    last = attempts[-1]["outcome"] if attempts else "running"
    status = {"succeeded": "succeeded", "preempted": "pending", "killed": "pending"}.get(last, last)
    return {
        "name": name,
        "status": status if attempts else "running",
        "restarts": sum(a["outcome"] in ("preempted", "killed") for a in attempts),
        "attempts": [
            {
                k: a.get(k)
                for k in (
                    "attempt",
                    "host",
                    "exit_code",
                    "outcome",
                    "notice",
                    "seconds_to_sigterm",
                    "seconds_to_exit",
                    "seconds_to_synced",
                )
            }
            for a in attempts
        ],
        "events": list(events),
    }


def run_agent(spec: AgentSpec) -> int:
    if not spec.command:
        raise UsageError(
            "give the command to run after --, e.g.: lightning-grid agent ... -- python train.py"
        )
    if shutil.which(spec.command[0]) is None and not os.path.exists(spec.command[0]):
        raise UsageError(f"command not found: {spec.command[0]}")
    base = _base(spec.artifacts, spec.name)
    workdir = os.path.abspath(spec.workdir)
    os.makedirs(workdir, exist_ok=True)
    execdir_url, ckpt_url = f"{base}/execdir", f"{base}/checkpoints"
    log = EventLog(f"{base}/events.jsonl")
    history = log.read()
    attempt = sum(e["event"] == "attempt_started" for e in history) + 1
    host = socket.gethostname()
    if artifacts.has_snapshot(execdir_url):
        stats = artifacts.restore(execdir_url, workdir)
        log.append("restored", attempt=attempt, host=host, detail=stats.describe())
    else:
        stats = artifacts.upload(workdir, execdir_url)
        log.append("captured", attempt=attempt, host=host, detail=stats.describe())

    # Our own files live in the workdir's .lightning_grid folder, which is never synced.
    private = os.path.join(workdir, ".lightning_grid")
    previous_sync = [e.get("sync_s") for e in history if e["event"] == "attempt_ended"]
    window = ShutdownWindow(
        CheckpointStore(ckpt_url),
        notice_path=os.path.join(private, f"notice-{attempt}.json"),
        spool_dir=os.path.join(private, f"spool-{attempt}"),
        sync_s=float(previous_sync[-1] or 0.0) if previous_sync else 0.0,
    )
    contract = Contract(
        resumable=True,
        checkpoints=ckpt_url,
        experiment=spec.name,
        attempt=attempt,
        notice_file=window.notice_path,
    )
    env = attempt_env(contract)
    signals = LauncherSignals()
    signals.install()
    sources: list[NoticeSource] = [
        signals,
        *cloud_notices(spec.cloud),
        SimulatedPreemption(spec.simulate_preemption),
    ]
    log_path = os.path.join(workdir, f".lightning_grid-attempt-{attempt}.log")
    log.append("attempt_started", attempt=attempt, host=host, command=spec.command)

    def on_notice(notice: Notice, window_s: float) -> None:
        plan = window.plan(window_s)
        log.append(
            "notice",
            attempt=attempt,
            source=notice.source,
            reason=notice.reason,
            window_s=window_s,
            plan=plan.plan.value,
            plan_reason=plan.reason,
        )
        print(f"lightning-grid agent: {notice.reason}; sending SIGTERM", file=sys.stderr, flush=True)

    try:
        result = run_attempt(
            spec.command,
            cwd=workdir,
            env=env,
            log_path=log_path,
            notices=sources,
            grace_period=spec.grace_period,
            stop_requested=lambda: False,
            on_start=lambda pid: None,
            on_notice=on_notice,
        )
    finally:
        signals.uninstall()
    sync_started = time.monotonic()
    published = window.publish()
    if published is not None:
        log.append("checkpoint_published", attempt=attempt, host=host, detail=published)
    sync = artifacts.upload(workdir, execdir_url)
    synced_after = (result.exit_after_sigterm_s or 0) + (time.monotonic() - sync_started)
    outcome = classify(result.exit_code, result.notice is not None, result.killed_after_grace, True, False)
    log.append(
        "attempt_ended",
        attempt=attempt,
        host=host,
        exit_code=result.exit_code,
        outcome=outcome.value,
        notice=result.notice.reason if result.notice else None,
        seconds_to_sigterm=result.sigterm_after_notice_s,
        seconds_to_exit=result.exit_after_sigterm_s,
        seconds_to_synced=synced_after if result.notice else None,
        sync=sync.describe(),
        sync_s=round(sync.seconds, 3),
    )
    if outcome is Outcome.SUCCEEDED:
        return 0
    if outcome in (Outcome.PREEMPTED, Outcome.KILLED):
        return EX_PREEMPTED
    return 1
