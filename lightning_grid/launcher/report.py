"""What ``status`` shows: the experiment, its attempts, its events, and the bill of its interruptions."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from lightning_grid.errors import LightningGridError
from lightning_grid.launcher import instances, slurm
from lightning_grid.launcher.events import Kind
from lightning_grid.launcher.registry import Registry

__all__ = ["describe"]


def _spans(events: list[Any], start_status: str, end_statuses: set[str]) -> float:
    """Seconds spent in ``start_status``; a span still open (waiting right now) counts up to now."""
    total, opened = 0.0, None
    for event in events:
        if event.to_status == start_status:
            opened = event.time
        elif opened is not None and event.to_status in end_statuses:
            total += event.time - opened
            opened = None
    if opened is not None:
        total += max(0.0, time.time() - opened)
    return total


def _slurm_bill(
    events: list[Any], attempts: list[Any], machines: dict[int, int], since: float
) -> dict[str, Any]:
    """The bill of a SLURM experiment as the cluster accounted it: every run of every job it
    submitted (a requeue keeps the job id and adds a run, ``run --resume`` submits a new job), from
    ``sacct --duplicates``, with each run's elapsed seconds, node-seconds and CPU-seconds.

    Where sacct cannot answer (no accounting on the cluster, slurmdbd down, no sacct), the runs are
    our own measured attempts (one per SLURM run, from the agent's start to its end, without CPU
    counts) and ``note`` says why. Never raises: the rest of ``status`` stands either way.
    """
    jobs = list(dict.fromkeys(str(e.data["slurm_job_id"]) for e in events if e.data.get("slurm_job_id")))
    runs: list[slurm.SacctRun] = []
    note = None
    try:
        for job in jobs:
            runs.extend(slurm.elapsed_runs(job, since=since))
    except (LightningGridError, OSError) as exc:
        why = "SLURM accounting is disabled on this cluster" if slurm.accounting_off(str(exc)) else str(exc)
        note = f"sacct unavailable ({why}): these are our own measured times"
    if note is None and jobs:
        return {
            "source": "sacct",
            "jobs": jobs,
            "runs": [
                {
                    "job": r.job,
                    "state": r.state,
                    "start": r.start,
                    "end": r.end,
                    "seconds": r.elapsed_s,
                    "nodes": r.nodes,
                    "cpus": r.cpus,
                    "node_seconds": r.node_seconds,
                    "cpu_seconds": r.cpu_seconds,
                }
                for r in runs
            ],
            "seconds": sum(r.elapsed_s for r in runs),
            "node_seconds": sum(r.node_seconds for r in runs),
            "cpu_seconds": sum(r.cpu_seconds for r in runs),
            "note": None,
        }
    measured = [
        {"attempt": a.number, "seconds": round(a.ended - a.started, 3), "nodes": machines[a.number]}
        for a in attempts
        if a.ended
    ]
    return {
        "source": "measured",
        "jobs": jobs,
        "runs": measured,
        "seconds": round(sum(r["seconds"] for r in measured), 3),
        "node_seconds": round(sum(r["seconds"] * r["nodes"] for r in measured), 3),
        "cpu_seconds": None,
        "note": note or "no SLURM job submitted yet",
    }


def describe(registry: Registry, name: str, accounting: bool = False) -> dict[str, Any]:
    """Everything ``status`` shows. ``accounting``: for a SLURM experiment, also ask SLURM's
    accounting for its bill (``bill.slurm``: one ``sacct`` per job, so only where it is shown)."""
    row = registry.get(name)
    attempts = registry.attempts(name)
    events = registry.events(name)
    running = sum((a.ended or a.started) - a.started for a in attempts if a.ended)
    ended = {e.attempt: e.data for e in events if e.kind == Kind.ENDED.value and e.attempt is not None}
    machines = {a.number: max(1, len(ended.get(a.number, {}).get("nodes") or ())) for a in attempts}
    # Each machine of a multi-node attempt is billed for the attempt's whole duration.
    node_running = sum(((a.ended or a.started) - a.started) * machines[a.number] for a in attempts if a.ended)
    saving = sum((a.ended - a.notice_at) for a in attempts if a.ended and a.notice_at)
    pending = _spans(events, "pending", {"restoring", "failed", "stopped"})
    restoring = _spans(events, "restoring", {"running", "failed", "stopped"})
    spec = row.spec
    instance = instances.lookup(spec.instance_type)
    hours = node_running / 3600
    price = instance.spot if spec.use_spot else instance.on_demand
    return {
        "name": row.name,
        "status": row.status.value,
        "reason": row.reason,
        "id": row.id,
        "script": spec.script,
        "args": list(spec.args),
        "instance_type": spec.instance_type,
        "use_spot": spec.use_spot,
        "resumable": spec.resumable,
        "artifacts": row.artifacts,
        "spec": asdict(spec),
        "restarts": row.restarts,
        "failures": row.failures,
        # A crash retry waiting out its backoff: when the next attempt starts.
        "retry_at": row.retry_at if row.status.value == "pending" else None,
        "created": row.created,
        "attempts": [
            {
                "number": a.number,
                "pid": a.pid,
                "started": a.started,
                "ended": a.ended,
                "seconds": (a.ended - a.started) if a.ended else None,
                "exit_code": a.exit_code,
                "outcome": a.outcome,
                "reason": a.reason,
                "notice_at": a.notice_at,
                "checkpoint_step": a.checkpoint_step,
                "steps_redone": a.steps_redone,
                "nodes": [_node_row(n) for n in ended.get(a.number, {}).get("nodes") or ()],
                "notice_node": ended.get(a.number, {}).get("notice_node"),
            }
            for a in attempts
        ],
        "events": [
            {
                "time": e.time,
                "kind": e.kind,
                "attempt": e.attempt,
                "from": e.from_status,
                "to": e.to_status,
                "reason": e.reason,
                "data": e.data,
            }
            for e in events
        ],
        "bill": {
            "attempts": len(attempts),
            "seconds_running": round(running, 3),
            "node_seconds_running": round(node_running, 3),
            "seconds_pending": round(pending, 3),
            "seconds_saving_after_notice": round(saving, 3),
            "seconds_restoring": round(restoring, 3),
            # An orderly preemption checkpoints the step in flight: nothing is redone, unless no save
            # fitted the notice's window. After a SIGKILL, Resumable's progress note says how far
            # the script got past its newest checkpoint; without one (no Resumable): unknown.
            "steps_redone": None
            if any(a.outcome == "killed" and a.steps_redone is None for a in attempts)
            else sum(a.steps_redone or 0 for a in attempts),
            "cost_usd": round(hours * price, 4),
            "cost_on_demand_usd": round(hours * instance.on_demand, 4),
            "cost_spot_usd": round(hours * instance.spot, 4),
            # Whether the costs mean anything: a type without a price (``local``, a SLURM
            # cluster's own nodes) costs $0 by construction.
            "priced": bool(instance.on_demand or instance.spot),
            # What SLURM accounted (sacct), else our own measured times, for a SLURM experiment.
            "slurm": _slurm_bill(events, attempts, machines, row.created)
            if accounting and spec.backend == "slurm"
            else None,
        },
    }


def _node_row(node: dict[str, Any]) -> dict[str, Any]:
    """One machine of an attempt: its process, how it ended, and whether the notice reached it."""
    code = node.get("exit_code")
    if node.get("lost"):
        outcome = "lost (no notice)"
    elif node.get("noticed"):
        outcome = "noticed"
    elif node.get("stopped"):
        outcome = "stopped (a peer could not go on)"
    else:
        outcome = "ok" if code == 0 else "stopped" if code is not None and code < 0 else "failed"
    return {"node": node.get("node"), "pid": node.get("pid"), "exit_code": code, "outcome": outcome}
