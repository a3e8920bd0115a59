"""Persistent state of experiments, attempts and events, in SQLite (WAL) under LIGHTNING_GRID_HOME.

Every status change goes through :meth:`Registry.transition`, which checks the transition table and
writes the event row in the same transaction: the story ``status`` tells cannot disagree with the
status itself. The schema moves forward through ordered migrations counted by ``PRAGMA
user_version``: opening an older registry upgrades it in place.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from lightning_grid.errors import LightningGridError, RegistryError, UsageError
from lightning_grid.launcher.events import Kind
from lightning_grid.launcher.experiment import Status, can_transition
from lightning_grid.launcher.layout import StoreLayout, new_id
from lightning_grid.launcher.spec import Spec

__all__ = ["Registry", "ExperimentRow", "AttemptRow", "EventRow"]

#: Version 1: the schema the first releases wrote (their registries have user_version 0).
_V1 = """
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
#: Columns added to version 1 while it was current: a registry of that age may lack them.
_V1_ADDED = (
    ("experiments", "cloud", "TEXT NOT NULL DEFAULT 'none'"),
    ("attempts", "steps_redone", "INTEGER"),
    ("experiments", "every_n_train_steps", "INTEGER"),
    ("experiments", "every_n_seconds", "REAL"),
)


def _migrate_to_1(db: sqlite3.Connection) -> None:
    for statement in _V1.split(";"):  # not executescript(): it would commit the migration's transaction
        if statement.strip():
            db.execute(statement)
    for table, column, kind in _V1_ADDED:
        if column not in {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


def _migrate_to_2(db: sqlite3.Connection) -> None:
    """One spec column instead of one column per option (a new option needs no migration), an id
    that binds the experiment to its store folder, the crash retry's time, structured events."""
    db.execute(
        """CREATE TABLE experiments_v2 (
            name TEXT PRIMARY KEY,
            id TEXT NOT NULL,
            status TEXT NOT NULL,
            spec TEXT NOT NULL,
            source_dir TEXT NOT NULL,
            artifacts TEXT NOT NULL,
            restarts INTEGER NOT NULL DEFAULT 0,
            failures INTEGER NOT NULL DEFAULT 0,
            reason TEXT NOT NULL DEFAULT '',
            stop_requested INTEGER NOT NULL DEFAULT 0,
            retry_at REAL,
            created REAL NOT NULL,
            updated REAL NOT NULL
        )"""
    )
    for r in db.execute("SELECT * FROM experiments").fetchall():
        base = r["artifacts"]
        suffix = "/" + r["name"]
        spec = Spec(
            script=r["script"], args=tuple(json.loads(r["args"])), name=r["name"],
            resumable=bool(r["resumable"]), use_spot=bool(r["use_spot"]), instance_type=r["instance_type"],
            max_restarts=r["max_restarts"], retries=r["retries"], retry_delay=0.0,
            artifacts=base[: -len(suffix)] if base.endswith(suffix) else base,
            simulate_preemptions=tuple(json.loads(r["simulate"])), grace_period=r["grace_period"],
            cloud=r["cloud"], every_n_train_steps=r["every_n_train_steps"], every_n_seconds=r["every_n_seconds"],
        )  # fmt: skip
        db.execute(
            "INSERT INTO experiments_v2 (name, id, status, spec, source_dir, artifacts, restarts, failures,"
            " reason, stop_requested, created, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                r["name"], new_id(), r["status"], spec.to_json(), r["source_dir"], base, r["restarts"],
                r["failures"], r["reason"], r["stop_requested"], r["created"], r["updated"],
            ),
        )  # fmt: skip
    db.execute("DROP TABLE experiments")
    db.execute("ALTER TABLE experiments_v2 RENAME TO experiments")
    db.execute("ALTER TABLE events ADD COLUMN kind TEXT NOT NULL DEFAULT 'note'")
    db.execute("ALTER TABLE events ADD COLUMN attempt INTEGER")
    db.execute("ALTER TABLE events ADD COLUMN data TEXT NOT NULL DEFAULT '{}'")
    db.execute("UPDATE events SET kind='transition' WHERE to_status IS NOT NULL")
    db.execute("UPDATE events SET kind='submitted' WHERE to_status='queued' AND from_status IS NULL")
    db.execute("CREATE INDEX IF NOT EXISTS events_by_name ON events (name, id)")


def _migrate_to_3(db: sqlite3.Connection) -> None:
    """A counter every write moves: pollers (the dashboard) ask "anything new?" for one row."""
    db.execute("CREATE TABLE changes (n INTEGER NOT NULL)")
    db.execute("INSERT INTO changes (n) VALUES (0)")


#: Ordered: ``PRAGMA user_version`` says how many have been applied. Append, never edit.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_migrate_to_1, _migrate_to_2, _migrate_to_3)


@dataclass
class ExperimentRow:
    name: str
    id: str  # binds the experiment to its store folder (see layout.StoreLayout.claim)
    status: Status
    spec: Spec
    source_dir: str
    artifacts: str  # the experiment's folder in the store: <artifacts>/<name>
    restarts: int = 0
    failures: int = 0
    reason: str = ""
    stop_requested: bool = False
    retry_at: float | None = None  # a crash retry waits until then
    created: float = 0.0
    updated: float = 0.0

    @property
    def layout(self) -> StoreLayout:
        return StoreLayout(self.artifacts)


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
    kind: str = Kind.NOTE.value
    attempt: int | None = None
    data: dict[str, Any] = field(default_factory=dict)


class Registry:
    def __init__(self, home: str) -> None:
        self.home = home
        _private_folder(home)
        self.path = os.path.join(home, "registry.db")
        self._migrate()

    def _migrate(self) -> None:
        """Bring the file to the newest schema, one ordered step at a time, each in a transaction
        that rereads the version (two launchers may open an old registry at once)."""
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")  # stored in the file: once is enough
            for target in range(1, len(MIGRATIONS) + 1):
                if db.execute("PRAGMA user_version").fetchone()[0] >= target:
                    continue
                db.execute("BEGIN IMMEDIATE")
                try:
                    if db.execute("PRAGMA user_version").fetchone()[0] < target:
                        MIGRATIONS[target - 1](db)
                        db.execute(f"PRAGMA user_version={target}")
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot open the registry {self.path}: {exc}") from exc
        try:
            db.execute("PRAGMA synchronous=NORMAL")
            db.row_factory = sqlite3.Row
            yield db
        except sqlite3.OperationalError as exc:
            if "disk" in str(exc) or "full" in str(exc):
                raise RegistryError(
                    f"cannot write the registry {self.path}: {exc}{_space(self.home)}"
                ) from None
            if "malformed" in str(exc) or "not a database" in str(exc):
                raise RegistryError(_corrupt(self.path)) from None
            raise RegistryError(f"registry {self.path}: {exc}") from None
        except sqlite3.IntegrityError:
            raise  # a constraint (a duplicate name): the caller's to explain, not a damaged file
        except sqlite3.DatabaseError:
            raise RegistryError(_corrupt(self.path)) from None
        finally:
            db.close()

    # -- experiments -------------------------------------------------------------------------------
    def create(self, row: ExperimentRow) -> None:
        with self._connect() as db:
            try:
                db.execute("BEGIN IMMEDIATE")
                db.execute(
                    "INSERT INTO experiments (name, id, status, spec, source_dir, artifacts, created, updated)"
                    " VALUES (?,?,?,?,?,?,?,?)",
                    (
                        row.name, row.id, row.status.value, row.spec.to_json(), row.source_dir, row.artifacts,
                        row.created, row.updated,
                    ),
                )  # fmt: skip
                _insert_event(
                    db, row.name, row.created, Kind.SUBMITTED, "submitted", None, None, row.status.value
                )
                _changed(db)
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

    def transition(
        self, name: str, target: Status, reason: str, attempt: int | None = None, **counters: Any
    ) -> Status:
        """Move ``name`` to ``target`` if the table allows it; returns the status it left.

        ``counters`` are experiment columns updated in the same transaction (restarts, failures,
        retry_at), so the story and the state cannot disagree."""
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
            sets = "".join(f", {k}=?" for k in counters)
            db.execute(
                f"UPDATE experiments SET status=?, reason=?, updated=?{sets} WHERE name=?",
                (target.value, reason, now, *counters.values(), name),
            )
            _insert_event(
                db, name, now, Kind.TRANSITION, reason, attempt, current.value, target.value, counters
            )
            _changed(db)
            db.execute("COMMIT")
            return current

    def record(self, name: str, kind: Kind, message: str, attempt: int | None = None, **data: Any) -> None:
        """An event that changes no status (a notice, a plan, a sync, a warning)."""
        with self._connect() as db:
            _insert_event(db, name, time.time(), kind, message, attempt, None, None, data)
            _changed(db)

    def note(self, name: str, message: str) -> None:
        self.record(name, Kind.NOTE, message)

    def update_spec(self, name: str, spec: Spec, message: str) -> None:
        """A resumed experiment's new capacity (nodes, processes), with the event that says so."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "UPDATE experiments SET spec=?, updated=? WHERE name=?", (spec.to_json(), time.time(), name)
            )
            _insert_event(db, name, time.time(), Kind.NOTE, message, None, None, None, {})
            _changed(db)
            db.execute("COMMIT")

    def request_stop(self, name: str) -> None:
        with self._connect() as db:
            db.execute("UPDATE experiments SET stop_requested=1 WHERE name=?", (name,))
            _changed(db)

    def clear_stop(self, name: str) -> None:
        with self._connect() as db:
            db.execute("UPDATE experiments SET stop_requested=0 WHERE name=?", (name,))
            _changed(db)

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
            _changed(db)

    def update_attempt(self, name: str, number: int, **fields: Any) -> None:
        sets = ", ".join(f"{k}=?" for k in fields)
        with self._connect() as db:
            db.execute(
                f"UPDATE attempts SET {sets} WHERE name=? AND number=?", (*fields.values(), name, number)
            )
            _changed(db)

    def attempts(self, name: str) -> list[AttemptRow]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM attempts WHERE name=? ORDER BY number", (name,)).fetchall()
        return [AttemptRow(**dict(r)) for r in rows]

    def events(self, name: str) -> list[EventRow]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT time, from_status, to_status, reason, kind, attempt, data FROM events WHERE name=?"
                " ORDER BY id",
                (name,),
            ).fetchall()
        return [
            EventRow(
                r["time"],
                r["from_status"],
                r["to_status"],
                r["reason"],
                r["kind"],
                r["attempt"],
                _data(r["data"]),
            )
            for r in rows
        ]

    def change_counter(self) -> int:
        """Grows with every write: a cheap "has anything changed?" for pollers (the dashboard)."""
        with self._connect() as db:
            r = db.execute("SELECT n FROM changes").fetchone()
        return int(r[0])


def _insert_event(
    db: sqlite3.Connection,
    name: str,
    when: float,
    kind: Kind,
    message: str,
    attempt: int | None,
    from_status: str | None,
    to_status: str | None,
    data: dict[str, Any] | None = None,
) -> None:
    db.execute(
        "INSERT INTO events (name, time, from_status, to_status, reason, kind, attempt, data)"
        " VALUES (?,?,?,?,?,?,?,?)",
        (
            name,
            when,
            from_status,
            to_status,
            message,
            kind.value,
            attempt,
            json.dumps(data or {}, default=str),
        ),
    )


def _space(folder: str) -> str:
    """SQLite reports a full disk as "disk I/O error" when its shared memory cannot grow: say so."""
    try:
        stat = os.statvfs(folder)
    except OSError:
        return ""
    free = stat.f_bavail * stat.f_frsize
    return f" (no space left on device: {free} bytes free)" if free < (1 << 20) else ""


def _changed(db: sqlite3.Connection) -> None:
    db.execute("UPDATE changes SET n = n + 1")


def _data(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _private_folder(home: str) -> None:
    """The home holds script arguments (the registry) and logs: only its owner may read it. A home
    an older version made with the default umask is tightened too, if it is ours."""
    os.makedirs(home, mode=0o700, exist_ok=True)
    info = os.stat(home)
    if info.st_uid == os.getuid() and info.st_mode & 0o077:
        os.chmod(home, 0o700)


def _corrupt(path: str) -> str:
    return (
        f"registry corrupt: {path} — move it aside (mv {path} {path}.bad); checkpoints and execution"
        " directories in the artifact store are untouched"
    )


def _experiment(r: sqlite3.Row) -> ExperimentRow:
    return ExperimentRow(
        name=r["name"],
        id=r["id"],
        status=Status(r["status"]),
        spec=Spec.from_json(r["spec"]),
        source_dir=r["source_dir"],
        artifacts=r["artifacts"],
        restarts=r["restarts"],
        failures=r["failures"],
        reason=r["reason"],
        stop_requested=bool(r["stop_requested"]),
        retry_at=r["retry_at"],
        created=r["created"],
        updated=r["updated"],
    )
