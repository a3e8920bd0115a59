"""Structured events: one schema for the registry and for the agent's artifact store.

Each event has a kind, the attempt it belongs to, a human sentence and data fields (notice source
and window, plan, exit code, seconds). Readers — ``status``, the bill, the dashboard's timeline —
use the fields, never parse the sentence.

In the store, each event is its own object (``events/<time_ns>-<host>-<pid>-<seq>.json``): object
stores cannot append, and rewriting a growing file loses the updates of a second agent that
overlaps the first (a replacement machine that starts before the old one is gone).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from lightning_grid._io import atomic_write_bytes
from lightning_grid.errors import StoreError, UsageError
from lightning_grid.launcher.layout import StoreLayout

__all__ = ["Kind", "Event", "StoreEventLog"]

log = logging.getLogger("lightning_grid")


class Kind(str, Enum):
    SUBMITTED = "submitted"  # the experiment exists
    TRANSITION = "transition"  # a status change (from/to set)
    CAPTURED = "captured"  # the execution directory was first copied into the store
    RESTORED = "restored"  # … and restored for an attempt
    STARTED = "attempt_started"  # data: pid, host, command
    NOTICE = "notice"  # data: source, window_s
    PLAN = "plan"  # data: plan, window_s
    PUBLISHED = "published"  # a spooled checkpoint after the exit: data: committed
    EXITED = "exit_timing"  # data: sigterm_after_notice_s, exit_after_sigterm_s, window_s
    SYNCED = "synced"  # execution directory saved: data: seconds, files, transferred
    SYNC_FAILED = "sync_failed"
    ENDED = "attempt_ended"  # data: outcome, exit_code, checkpoint_step, steps_redone, …
    DECISION = "decision"  # data: status, relaunch, restarts, failures, delay_s
    WARNING = "warning"
    NOTE = "note"
    STOP_REQUESTED = "stop_requested"  # ``lightning-grid stop`` for an agent that reads the store (SLURM)


@dataclass(frozen=True)
class Event:
    kind: str
    message: str
    time: float = field(default_factory=time.time)
    attempt: int | None = None
    from_status: str | None = None
    to_status: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, default=str).encode()

    @classmethod
    def from_mapping(cls, raw: dict[str, Any]) -> Event:
        if "kind" in raw:
            return cls(
                kind=str(raw["kind"]),
                message=str(raw.get("message", "")),
                time=float(raw.get("time", 0.0)),
                attempt=raw.get("attempt"),
                from_status=raw.get("from_status"),
                to_status=raw.get("to_status"),
                data=dict(raw.get("data") or {}),
            )
        # The agent's JSON lines before one object per event: {"time", "event", **fields}.
        fields_ = {k: v for k, v in raw.items() if k not in ("time", "event", "attempt")}
        return cls(
            kind=str(raw.get("event", Kind.NOTE.value)),
            message=str(raw.get("detail") or raw.get("reason") or raw.get("event", "")),
            time=float(raw.get("time", 0.0)),
            attempt=raw.get("attempt"),
            data=fields_,
        )


class StoreEventLog:
    """The events of one experiment in its artifact store folder."""

    _seq = itertools.count()

    def __init__(self, layout: StoreLayout) -> None:
        self.layout = layout
        try:
            self.fs, self.root = fsspec.core.url_to_fs(layout.events)
            _, self.legacy = fsspec.core.url_to_fs(layout.legacy_events)
        except (ValueError, ImportError) as exc:
            raise UsageError(f"cannot use artifact store {layout.base!r}: {exc}") from exc
        self.host = socket.gethostname()

    def emit(self, event: Event) -> None:
        key = f"{time.time_ns():020d}-{_safe(self.host)}-{os.getpid()}-{next(self._seq):06d}.json"
        path = f"{self.root}/{key}"
        try:
            if isinstance(self.fs, LocalFileSystem):
                atomic_write_bytes(path, event.to_json())
            else:
                self.fs.pipe_file(path, event.to_json())
        except Exception as exc:  # any backend's failure (botocore's are not OSErrors)
            raise StoreError(f"cannot write an event to {self.layout.events}: {exc}") from exc

    def read(self) -> list[Event]:
        events: list[Event] = []
        try:
            text = self.fs.cat_file(self.legacy).decode(errors="replace")
        except FileNotFoundError:
            text = ""
        except Exception as exc:  # any backend's failure
            raise StoreError(f"store unreachable: {self.layout.legacy_events}: {exc}") from exc
        for line in text.splitlines():
            try:
                events.append(Event.from_mapping(json.loads(line)))
            except (ValueError, TypeError, AttributeError):
                log.warning("lightning-grid: skipping an unreadable line in %s", self.layout.legacy_events)
        try:
            names = sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))
        except FileNotFoundError:
            names = []
        except Exception as exc:  # any backend's failure
            raise StoreError(f"store unreachable: {self.layout.events}: {exc}") from exc
        for key in names:
            if not key.endswith(".json"):
                continue  # a temp file of a write in flight
            try:
                events.append(Event.from_mapping(json.loads(self.fs.cat_file(f"{self.root}/{key}"))))
            except FileNotFoundError:
                continue
            except (ValueError, TypeError, AttributeError):
                log.warning("lightning-grid: skipping an unreadable event %s/%s", self.layout.events, key)
        events.sort(key=lambda e: e.time)
        return events


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._" else "_" for c in text)[:64] or "host"
