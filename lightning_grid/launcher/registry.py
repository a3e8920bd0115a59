"""Persistent state of experiments, attempts and events, in SQLite (WAL) under LIGHTNING_GRID_HOME.

Every status change goes through :meth:`Registry.transition`, which checks the transition table and
writes the event row in the same transaction: the story ``status`` tells cannot disagree with the
status itself.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from lightning_grid.errors import LightningGridError, UsageError
from lightning_grid.launcher.experiment import Status, can_transition

__all__ = ["Registry", "ExperimentRow", "AttemptRow", "EventRow"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS experiments (
    name TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    script TEXT NOT NULL,
    args TEXT NOT NULL,
    source_dir TEXT NOT NULL,
    artifacts TEXT NOT NULL,
    resumable INTEGER NOT NULL,
    use_spot INTEGER NOT NULL,
    instance_type TEXT NOT NULL,
    max_restarts INTEGER NOT NULL,
    retries INTEGER NOT NULL,
    grace_period REAL NOT NULL,
    simulate TEXT NOT NULL,
    cloud TEXT NOT NULL DEFAULT 'none',
    every_n_train_steps INTEGER,
    every_n_seconds REAL,
    restarts INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    stop_requested INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS attempts (
    name TEXT NOT NULL,
    number INTEGER NOT NULL,
    pid INTEGER,
    started REAL NOT NULL,
    ended REAL,
    exit_code INTEGER,
    outcome TEXT,
    reason TEXT NOT NULL DEFAULT '',
    notice_at REAL,
    checkpoint_step INTEGER,
    log_path TEXT NOT NULL,
    steps_redone INTEGER,
    PRIMARY KEY (name, number)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    time REAL NOT NULL,
    from_status TEXT,
    to_status TEXT,
    reason TEXT NOT NULL
);
"""


_ADDED_COLUMNS = (
    ("attempts", "steps_redone", "INTEGER"),
    ("experiments", "every_n_train_steps", "INTEGER"),
    ("experiments", "every_n_seconds", "REAL"),
)


@dataclass
class ExperimentRow:
    name: str
    status: Status
    script: str
    args: list[str]
    source_dir: str
    artifacts: str
    resumable: bool
    use_spot: bool
    instance_type: str
    max_restarts: int
    retries: int
    grace_period: float
    simulate: list[float]
    cloud: str
    restarts: int
    failures: int
    reason: str
    stop_requested: bool
    created: float
    updated: float
    every_n_train_steps: int | None = None  # periodic saves of the Resumable the launcher adds
    every_n_seconds: float | None = None


@dataclass
class AttemptRow:
    name: str
    number: int
    pid: int | None
    started: float
    ended: float | None
    exit_code: int | None
    outcome: str | None
    reason: str
    notice_at: float | None
    checkpoint_step: int | None
    log_path: str
    steps_redone: int | None = None  # steps after the checkpoint resumed from; None: unknown


@dataclass
class EventRow:
    time: float
    from_status: str | None
    to_status: str | None
    reason: str
    extra: dict[str, Any] = field(default_factory=dict)


class Registry:
    def __init__(self, home: str) -> None:
        self.home = home
        os.makedirs(home, exist_ok=True)
        self.path = os.path.join(home, "registry.db")
        with self._connect() as db:
            db.executescript(_SCHEMA)
            # A registry from before these columns existed gains them, empty.
            for table, column, kind in _ADDED_COLUMNS:
                if column not in {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except sqlite3.Error as exc:
            raise LightningGridError(f"cannot open the registry {self.path}: {exc}") from exc
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.row_factory = sqlite3.Row
            yield db
        finally:
            db.close()

    # -- experiments -------------------------------------------------------------------------------
    def create(self, row: ExperimentRow) -> None:
        with self._connect() as db:
            try:
                db.execute("BEGIN IMMEDIATE")
                db.execute(
                    "INSERT INTO experiments (name, status, script, args, source_dir, artifacts, resumable, use_spot,"
                    " instance_type, max_restarts, retries, grace_period, simulate, cloud, created, updated,"
                    " every_n_train_steps, every_n_seconds) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        row.name, row.status.value, row.script, json.dumps(row.args), row.source_dir, row.artifacts,
                        int(row.resumable), int(row.use_spot), row.instance_type, row.max_restarts, row.retries,
                        row.grace_period, json.dumps(row.simulate), row.cloud, row.created, row.updated,
                        row.every_n_train_steps, row.every_n_seconds,
                    ),
                )  # fmt: skip
                db.execute(
                    "INSERT INTO events (name, time, from_status, to_status, reason) VALUES (?,?,?,?,?)",
                    (row.name, row.created, None, row.status.value, "submitted"),
                )
                db.execute("COMMIT")
            except sqlite3.IntegrityError as exc:
                db.execute("ROLLBACK")
                raise UsageError(f"an experiment named {row.name!r} already exists") from exc

    def exists(self, name: str) -> bool:
        with self._connect() as db:
            return db.execute("SELECT 1 FROM experiments WHERE name=?", (name,)).fetchone() is not None

    def get(self, name: str) -> ExperimentRow:
        with self._connect() as db:
            r = db.execute("SELECT * FROM experiments WHERE name=?", (name,)).fetchone()
        if r is None:
            raise UsageError(f"no experiment named {name!r} (see: lightning-grid list)")
        return _experiment(r)

    def all(self) -> list[ExperimentRow]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM experiments ORDER BY created DESC").fetchall()
        return [_experiment(r) for r in rows]

    def transition(self, name: str, target: Status, reason: str, **counters: int) -> Status:
        """Move ``name`` to ``target`` if the table allows it; returns the status it left."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            r = db.execute("SELECT status FROM experiments WHERE name=?", (name,)).fetchone()
            if r is None:
                db.execute("ROLLBACK")
                raise UsageError(f"no experiment named {name!r}")
            current = Status(r["status"])
            if not can_transition(current, target):
                db.execute("ROLLBACK")
                raise LightningGridError(
                    f"experiment {name!r} cannot go from {current.value} to {target.value}"
                )
            now = time.time()
            sets = ", ".join(f"{k}=?" for k in counters)
            db.execute(
                f"UPDATE experiments SET status=?, reason=?, updated=?{', ' + sets if sets else ''} WHERE name=?",
                (target.value, reason, now, *counters.values(), name),
            )
            db.execute(
                "INSERT INTO events (name, time, from_status, to_status, reason) VALUES (?,?,?,?,?)",
                (name, now, current.value, target.value, reason),
            )
            db.execute("COMMIT")
            return current

    def note(self, name: str, reason: str) -> None:
        """An event that changes no status (a notice, a sync, a warning)."""
        with self._connect() as db:
            db.execute(
                "INSERT INTO events (name, time, from_status, to_status, reason) VALUES (?,?,?,?,?)",
                (name, time.time(), None, None, reason),
            )

    def request_stop(self, name: str) -> None:
        with self._connect() as db:
            db.execute("UPDATE experiments SET stop_requested=1 WHERE name=?", (name,))

    def clear_stop(self, name: str) -> None:
        with self._connect() as db:
            db.execute("UPDATE experiments SET stop_requested=0 WHERE name=?", (name,))

    def stop_requested(self, name: str) -> bool:
        with self._connect() as db:
            r = db.execute("SELECT stop_requested FROM experiments WHERE name=?", (name,)).fetchone()
        return bool(r and r["stop_requested"])

    # -- attempts ----------------------------------------------------------------------------------
    def start_attempt(self, name: str, number: int, pid: int, log_path: str) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT INTO attempts (name, number, pid, started, log_path) VALUES (?,?,?,?,?)",
                (name, number, pid, time.time(), log_path),
            )

    def update_attempt(self, name: str, number: int, **fields: Any) -> None:
        sets = ", ".join(f"{k}=?" for k in fields)
        with self._connect() as db:
            db.execute(
                f"UPDATE attempts SET {sets} WHERE name=? AND number=?", (*fields.values(), name, number)
            )

    def attempts(self, name: str) -> list[AttemptRow]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM attempts WHERE name=? ORDER BY number", (name,)).fetchall()
        return [AttemptRow(**dict(r)) for r in rows]

    def events(self, name: str) -> list[EventRow]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT time, from_status, to_status, reason FROM events WHERE name=? ORDER BY id", (name,)
            ).fetchall()
        return [EventRow(r["time"], r["from_status"], r["to_status"], r["reason"]) for r in rows]


def _experiment(r: sqlite3.Row) -> ExperimentRow:
    return ExperimentRow(
        name=r["name"],
        status=Status(r["status"]),
        script=r["script"],
        args=json.loads(r["args"]),
        source_dir=r["source_dir"],
        artifacts=r["artifacts"],
        resumable=bool(r["resumable"]),
        use_spot=bool(r["use_spot"]),
        instance_type=r["instance_type"],
        max_restarts=r["max_restarts"],
        retries=r["retries"],
        grace_period=r["grace_period"],
        simulate=json.loads(r["simulate"]),
        cloud=r["cloud"],
        restarts=r["restarts"],
        failures=r["failures"],
        reason=r["reason"],
        stop_requested=bool(r["stop_requested"]),
        created=r["created"],
        updated=r["updated"],
        every_n_train_steps=r["every_n_train_steps"],
        every_n_seconds=r["every_n_seconds"],
    )
