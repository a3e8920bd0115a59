"""What the dashboard's pages show, computed from the registry and the stores as plain data.

No web framework here: the pages and the JSON API render the same dictionaries, and the tests can
call these functions directly. Every value is raw (names, reasons, log lines exactly as stored);
escaping is the templates' job (Jinja2 with autoescape on), never done twice or forgotten here.
Reads only: the registry in WAL mode lets launchers write while these run.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from lightning_grid.checkpoints import CheckpointStore
from lightning_grid.launcher import artifacts, instances
from lightning_grid.launcher.experiment import Status
from lightning_grid.launcher.registry import AttemptRow, ExperimentRow, Registry
from lightning_grid.launcher.report import describe
from lightning_grid.ui.timeline import Timeline, build_timeline, format_seconds

__all__ = [
    "STATUSES",
    "experiment_rows",
    "experiment_detail",
    "checkpoints",
    "artifact_files",
    "log_tail",
    "format_duration",
    "format_time",
    "format_bytes",
]

STATUSES = [s.value for s in Status]
#: How much of each attempt's log the page shows: enough to see why it ended, small enough to poll.
LOG_TAIL_BYTES = 32 * 1024
LOG_TAIL_LINES = 120
#: Listings are capped: a page of 10 000 files helps nobody and slows every poll.
MAX_LISTED = 200


def format_time(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def format_duration(seconds: float | None) -> str:
    return "-" if seconds is None else format_seconds(max(0.0, seconds))


def format_bytes(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"  # pragma: no cover


def _duration(row: ExperimentRow, now: float) -> float:
    """Wall time from submission to the end (or to now while the experiment is live)."""
    return (row.updated if row.status.is_terminal() else now) - row.created


def _bill(row: ExperimentRow, attempts: list[AttemptRow]) -> dict[str, Any]:
    """The list's share of ``describe``'s bill: attempts, and the cost of the time they ran."""
    hours = sum(a.ended - a.started for a in attempts if a.ended) / 3600
    instance = instances.lookup(row.spec.instance_type)
    return {
        "attempts": len(attempts),
        "cost_spot_usd": round(hours * instance.spot, 4),
        "cost_on_demand_usd": round(hours * instance.on_demand, 4),
    }


def experiment_rows(registry: Registry, status: str | None = None) -> list[dict[str, Any]]:
    """The list page: every experiment, newest first, optionally only those in ``status``.

    Nothing here depends on the time of the request, so a poll can be answered from the registry's
    change counter alone (see app.py): a live experiment's duration is ``None``; the page counts it
    up from ``created`` itself. Two reads per experiment (its row, its attempts), never a describe.
    """
    rows = []
    for row in registry.all():
        if status and row.status.value != status:
            continue
        live = not row.status.is_terminal()
        seconds = None if live else round(row.updated - row.created, 3)
        rows.append(
            {
                "name": row.name,
                "status": row.status.value,
                "reason": row.reason,
                "instance_type": row.spec.instance_type,
                "use_spot": row.spec.use_spot,
                **_bill(row, registry.attempts(row.name)),
                "restarts": row.restarts,
                "created": row.created,
                "created_text": format_time(row.created),
                "ended": None if live else row.updated,
                "seconds": seconds,  # None while live: until now, which the reader knows better
                "duration_text": None if live else format_duration(seconds),
                "live": live,
            }
        )
    return rows


@dataclass
class Listing:
    """Files found in a store, or why they could not be read (a store may be remote and down)."""

    entries: list[dict[str, Any]]
    more: int = 0
    error: str | None = None


def checkpoints(url: str) -> Listing:
    """Committed checkpoints (newest written first) and payloads that have no commit record yet."""
    try:
        store = CheckpointStore(url, retries=0)
        committed = store.committed()
        try:
            entries = store.fs.ls(store.root, detail=True)
        except FileNotFoundError:
            entries = []
    except Exception as exc:  # any backend error: show it on the page instead of failing the page
        return Listing([], error=f"cannot read {url}: {exc}")
    names = {r.name for r in committed}
    items: list[dict[str, Any]] = [
        {"name": r.name, "step": r.step, "size": r.size, "size_text": format_bytes(r.size), "committed": True,
         "time": r.time, "time_text": format_time(r.time), "reason": r.reason}
        for r in committed
    ]  # fmt: skip
    for entry in entries:
        name = str(entry["name"]).rsplit("/", 1)[-1]
        if not name.endswith(".ckpt") or name in names or not name.startswith("ckpt-"):
            continue
        try:
            step: int | None = int(name.split("-")[1])
        except (IndexError, ValueError):
            step = None
        size = entry.get("size")
        items.append(
            {"name": name, "step": step, "size": size, "size_text": format_bytes(size), "committed": False,
             "time": None, "time_text": "-", "reason": "no commit record (being written, or abandoned)"}
        )  # fmt: skip
    return Listing(items[:MAX_LISTED], more=max(0, len(items) - MAX_LISTED))


def artifact_files(row: ExperimentRow) -> Listing:
    """The execution directory as the artifact store's manifest records it (what a relaunch restores)."""
    url = row.layout.execdir
    try:
        manifest = artifacts.manifest(url)
    except Exception as exc:  # a remote store that is down, an unreadable manifest
        return Listing([], error=f"cannot read {url}: {exc}")
    items = [
        {"path": rel, "size": int(e["size"]), "size_text": format_bytes(int(e["size"])),
         "modified_text": format_time(int(e["mtime_ns"]) / 1e9)}
        for rel, e in sorted(manifest.items())
    ]  # fmt: skip
    return Listing(items[:MAX_LISTED], more=max(0, len(items) - MAX_LISTED))


def log_tail(path: str, max_bytes: int = LOG_TAIL_BYTES, max_lines: int = LOG_TAIL_LINES) -> dict[str, Any]:
    """The last lines of a log file, decoded leniently (a script may print any bytes)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            data = handle.read()
    except FileNotFoundError:
        return {"path": path, "lines": [], "truncated": False, "missing": True, "size": 0}
    except OSError as exc:
        return {
            "path": path,
            "lines": [f"(cannot read the log: {exc})"],
            "truncated": False,
            "missing": True,
            "size": 0,
        }
    lines = data.decode(errors="replace").splitlines()
    cut = size > max_bytes
    if cut and lines:
        lines = lines[1:]  # the first line read is probably partial
    truncated = cut or len(lines) > max_lines
    return {"path": path, "lines": lines[-max_lines:], "truncated": truncated, "missing": False, "size": size}


def timeline_dict(timeline: Timeline) -> dict[str, Any]:
    data = asdict(timeline)
    data["seconds"] = timeline.seconds
    return data


def experiment_detail(registry: Registry, name: str, now: float | None = None) -> dict[str, Any]:
    """Everything the experiment page shows. Raises ``UsageError`` for an unknown name."""
    now = time.time() if now is None else now
    row = registry.get(name)
    info = describe(registry, name)
    attempts = registry.attempts(name)
    timeline = build_timeline(row.created, row.status, attempts, registry.events(name), now)
    bill = info["bill"]
    instance = instances.lookup(row.spec.instance_type)
    charged = instance.spot if row.spec.use_spot else instance.on_demand
    lost = bill["seconds_saving_after_notice"] + bill["seconds_pending"] + bill["seconds_restoring"]
    for a in info["attempts"]:
        a["started_text"] = format_time(a["started"])
        end = a["ended"] if a["ended"] is not None else (None if row.status.is_terminal() else now)
        a["duration_text"] = format_duration(None if end is None else end - a["started"])
    return {
        **info,
        "live": not row.status.is_terminal(),
        "stop_requested": row.stop_requested,
        "created_text": format_time(row.created),
        "seconds": round(_duration(row, now), 3),
        "duration_text": format_duration(_duration(row, now)),
        "price": {"spot": instance.spot, "on_demand": instance.on_demand, "charged": charged},
        "lost": {
            "seconds": round(lost, 3),
            "text": format_duration(lost),
            "saving_text": format_duration(bill["seconds_saving_after_notice"]),
            "pending_text": format_duration(bill["seconds_pending"]),
            "restoring_text": format_duration(bill["seconds_restoring"]),
            "running_text": format_duration(bill["seconds_running"]),
            # What the interruptions cost: machine time spent saving and restoring instead of training,
            # at the price being paid (pending is waiting for capacity: no machine, no bill).
            "cost_usd": round(
                (bill["seconds_saving_after_notice"] + bill["seconds_restoring"]) / 3600 * charged, 4
            ),
        },
        "timeline": timeline_dict(timeline),
        "checkpoints": asdict(checkpoints(row.layout.checkpoints)),
        "artifact_files": asdict(artifact_files(row)),
        "logs": [{"number": a.number, **log_tail(a.log_path)} for a in attempts],
    }
