"""The launcher's core, piece by piece: the decision table, the spec, the registry's migrations,
the store layout's ownership and the store's one-object-per-event log."""

from __future__ import annotations

import inspect
import itertools
import json
import math
import sqlite3
import threading
from dataclasses import fields
from pathlib import Path

import pytest

from lightning_grid.errors import RegistryError, StoreError, UsageError
from lightning_grid.launcher.agent import _replay, summarize
from lightning_grid.launcher.events import Event, Kind, StoreEventLog
from lightning_grid.launcher.experiment import (
    TRANSITIONS,
    Budgets,
    Outcome,
    Status,
    can_transition,
    decide,
    retry_delay,
)
from lightning_grid.launcher.layout import StoreLayout, new_id
from lightning_grid.launcher.registry import MIGRATIONS, Registry
from lightning_grid.launcher.spec import MAX_RETRY_DELAY_S, Spec, options, parse_simulation, validate_name
from lightning_grid.sdk import Experiment

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

# -- the decision ------------------------------------------------------------------------------------
# (outcome, restarts, max_restarts, failures, retries) → (status, relaunch, restarts', failures', delay)
# with retry_delay = 5 s.
DECISIONS = [
    (Outcome.SUCCEEDED, 0, 20, 0, 0, Status.SUCCEEDED, False, 0, 0, 0.0),
    (Outcome.SUCCEEDED, 3, 3, 2, 2, Status.SUCCEEDED, False, 3, 2, 0.0),
    (Outcome.STOPPED, 0, 20, 0, 5, Status.STOPPED, False, 0, 0, 0.0),
    (Outcome.INTERRUPTED_NOT_RESUMABLE, 0, 20, 0, 3, Status.FAILED, False, 0, 0, 0.0),
    (Outcome.PREEMPTED, 0, 20, 0, 0, Status.PENDING, True, 1, 0, 0.0),
    (Outcome.PREEMPTED, 19, 20, 1, 0, Status.PENDING, True, 20, 1, 0.0),
    (Outcome.PREEMPTED, 20, 20, 0, 0, Status.FAILED, False, 20, 0, 0.0),
    (Outcome.PREEMPTED, 0, 0, 0, 9, Status.FAILED, False, 0, 0, 0.0),
    (Outcome.KILLED, 1, 20, 0, 0, Status.PENDING, True, 2, 0, 0.0),
    (Outcome.KILLED, 20, 20, 0, 0, Status.FAILED, False, 20, 0, 0.0),
    (Outcome.FAILED, 0, 20, 0, 0, Status.FAILED, False, 0, 0, 0.0),
    (Outcome.FAILED, 5, 20, 0, 1, Status.PENDING, True, 5, 1, 5.0),
    (Outcome.FAILED, 0, 20, 1, 3, Status.PENDING, True, 0, 2, 10.0),
    (Outcome.FAILED, 0, 20, 2, 3, Status.PENDING, True, 0, 3, 20.0),
    (Outcome.FAILED, 0, 20, 1, 1, Status.FAILED, False, 0, 1, 0.0),
    (Outcome.FAILED, 0, 20, 3, 3, Status.FAILED, False, 0, 3, 0.0),
]


@pytest.mark.parametrize("row", DECISIONS, ids=lambda r: f"{r[0].value}-{r[1]}/{r[2]}-{r[3]}/{r[4]}")
def test_decision_table(row) -> None:
    outcome, restarts, max_restarts, failures, retries, status, relaunch, r2, f2, delay = row
    d = decide(outcome, Budgets(restarts, max_restarts, failures, retries, retry_delay=5.0))
    assert (d.status, d.relaunch, d.restarts, d.failures, d.delay_s) == (status, relaunch, r2, f2, delay)


def test_every_decision_is_a_legal_transition_and_budgets_never_shrink() -> None:
    """Exhaustively over small budgets: the decision names a status the table allows from where an
    attempt ends (running, or interrupting after a notice), relaunches exactly into pending, and a
    relaunch always spends exactly one unit of one budget."""
    for outcome, restarts, max_r, failures, retries in itertools.product(
        Outcome, range(3), range(3), range(3), range(3)
    ):
        d = decide(outcome, Budgets(restarts, max_r, failures, retries, retry_delay=1.0))
        assert any(can_transition(s, d.status) for s in (Status.RUNNING, Status.INTERRUPTING))
        assert d.relaunch == (d.status is Status.PENDING)
        assert d.restarts >= restarts and d.failures >= failures
        if d.relaunch:
            assert (d.restarts - restarts) + (d.failures - failures) == 1
            assert d.restarts <= max(max_r, restarts) and d.failures <= max(retries, failures)
        else:
            assert (d.restarts, d.failures) == (restarts, failures)
        assert d.delay_s == 0.0 or outcome is Outcome.FAILED


def test_crash_backoff_doubles_and_is_capped() -> None:
    assert [retry_delay(5.0, n) for n in (1, 2, 3, 4)] == [5.0, 10.0, 20.0, 40.0]
    assert retry_delay(5.0, 30) == MAX_RETRY_DELAY_S
    assert retry_delay(0.0, 3) == 0.0


def test_transition_table_reaches_every_status_and_pending_only_through_restoring() -> None:
    reachable = {Status.QUEUED}
    for _ in Status:
        reachable |= {t for s in reachable for t in TRANSITIONS[s]}
    assert reachable == set(Status)
    assert can_transition(Status.INTERRUPTING, Status.SUCCEEDED)
    assert can_transition(Status.RUNNING, Status.PENDING)  # a crash waiting for its retry
    assert not can_transition(Status.PENDING, Status.RUNNING)


# -- the spec ----------------------------------------------------------------------------------------
def test_spec_round_trips_and_tolerates_other_versions() -> None:
    spec = Spec(script="t.py", args=("--lr", "0.1"), name="x", use_spot=True, simulate_preemptions=(1.5, 3.0))
    assert Spec.from_json(spec.to_json()) == spec
    newer = json.loads(spec.to_json()) | {"an_option_from_the_future": 1}
    older = {k: v for k, v in json.loads(spec.to_json()).items() if k != "retry_delay"}
    assert Spec.from_mapping(newer) == spec
    assert Spec.from_mapping(older).retry_delay == Spec().retry_delay


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"max_restarts": -1}, "--max-restarts must be >= 0, got -1"),
        ({"max_restarts": 10**20}, "--max-restarts is out of range"),
        ({"retries": -2}, "--retries must be >= 0"),
        ({"grace_period": math.nan}, "--grace-period must be a finite number"),
        ({"grace_period": math.inf}, "--grace-period must be a finite number"),
        ({"grace_period": 0.0}, "--grace-period must be > 0"),
        ({"retry_delay": -1.0}, "--retry-delay must be >= 0"),
        ({"every_n_train_steps": 0}, "--every-n-train-steps must be >= 1, got 0"),
        ({"every_n_seconds": -1.0}, "--every-n-seconds must be > 0, got -1"),
        ({"every_n_seconds": math.nan}, "--every-n-seconds must be a finite number"),
        ({"cloud": "moon"}, "unknown --cloud 'moon'"),
        ({"simulate_preemptions": (1.0, -2.0)}, "--simulate-preemptions must be >= 0"),
        ({"simulate_preemptions": (math.inf,)}, "--simulate-preemptions must be a finite number"),
        ({"name": "abc\n"}, "invalid experiment name"),
        ({"name": "../x"}, "invalid experiment name"),
        ({"name": "a/b"}, "invalid experiment name"),
        ({"name": ".hidden"}, "invalid experiment name"),
        ({"instance_type": "p3\x00"}, "must not contain a NUL"),
        # the SDK passes Python values: a wrong type is named, not a TypeError later
        ({"max_restarts": "3"}, "--max-restarts must be int, got '3'"),
        ({"args": "--lr 1"}, "args must be a list of strings"),
        ({"use_spot": 1}, "--use-spot must be bool"),
        ({"grace_period": True}, "--grace-period must be float"),
        ({"simulate_preemptions": ("soon",)}, "--simulate-preemptions must be a list of numbers"),
    ],
)
def test_spec_validation_names_the_option(changes, message) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace("[", r"\[")):
        Spec(script="t.py", **changes).validated()


def test_parse_simulation() -> None:
    assert parse_simulation("8, 20") == ((8.0, 20.0), ()) and parse_simulation(None) == ((), ())
    for bad in ("5,abc", ",", "nan", "-1"):
        with pytest.raises(UsageError, match="--simulate-preemptions"):
            parse_simulation(bad)


def test_every_option_has_help_and_both_spellings() -> None:
    infos = options()
    # simulate_nodes is written inside --simulate-preemptions (N@S)
    assert {i.name for i in infos} == {f.name for f in fields(Spec)} - {"script", "args", "simulate_nodes"}
    for info in infos:
        assert info.help and not info.help.endswith(" ")
        assert "--" + info.name.replace("_", "-") in info.flags
        if "_" in info.name:
            assert "--" + info.name in info.flags
    assert {i.name for i in options(for_agent=True)} < {i.name for i in infos}


def test_sdk_takes_exactly_the_spec_options(tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text("print(1)\n")
    parameters = set(inspect.signature(Experiment).parameters)
    assert parameters == {"script", "args", "home", "echo", "options"}
    every = {i.name: i.default for i in options()}
    every["simulate_preemptions"] = ()
    Experiment(str(script), home=str(tmp_path / "h"), **every)  # each one is accepted
    with pytest.raises(UsageError, match="unknown Experiment option.*grace_periods"):
        Experiment(str(script), home=str(tmp_path / "h"), grace_periods=3)
    with pytest.raises(UsageError, match="--max-restarts must be >= 0"):
        Experiment(str(script), home=str(tmp_path / "h"), max_restarts=-1)


def test_names_are_never_paths() -> None:
    for good in ("a", "mnist-1", "A.b_c-9", "x" * 64):
        assert validate_name(good) == good
    for bad in ("", "../x", "a/b", "a\\b", "x" * 65, "abc\n", "-a", " a", "a b", "é"):
        with pytest.raises(UsageError):
            validate_name(bad)


# -- the registry ------------------------------------------------------------------------------------
def test_a_registry_written_by_the_first_schema_is_upgraded_in_place(tmp_path: Path) -> None:
    """registry_v0.sql is the dump of a registry the previous release wrote (user_version 0): one
    experiment preempted once with periodic saves, then succeeded."""
    home = tmp_path / "home"
    home.mkdir()
    db = sqlite3.connect(home / "registry.db")
    db.executescript((FIXTURES / "registry_v0.sql").read_text())
    db.close()
    registry = Registry(str(home))
    row = registry.get("old-one")
    assert row.status is Status.SUCCEEDED and row.restarts == 1 and len(row.id) == 32
    assert row.spec.every_n_train_steps == 5 and row.spec.simulate_preemptions == (0.8,)
    assert row.spec.use_spot and row.spec.resumable and row.spec.script == "count.py"
    assert row.artifacts.endswith("/old-one") and row.spec.artifacts == row.artifacts[: -len("/old-one")]
    assert [a.outcome for a in registry.attempts("old-one")] == ["preempted", "succeeded"]
    events = registry.events("old-one")
    assert events[0].kind == "submitted" and events[-1].kind == "transition"
    assert {e.kind for e in events if e.to_status is None} == {"note"}
    with sqlite3.connect(home / "registry.db") as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    # Reopening changes nothing; the upgraded registry takes new experiments.
    assert Registry(str(home)).get("old-one") == row
    registry.record("old-one", Kind.WARNING, "hello", attempt=2, x=1)
    assert registry.events("old-one")[-1].data == {"x": 1}


def test_a_registry_from_before_the_cloud_column_is_upgraded_too(tmp_path: Path) -> None:
    """The very first registries had no ``cloud`` column: the upgrade adds it before converting."""
    home = tmp_path / "home"
    home.mkdir()
    db = sqlite3.connect(home / "registry.db")
    db.executescript((FIXTURES / "registry_v0.sql").read_text())
    db.execute("ALTER TABLE experiments DROP COLUMN cloud")
    db.commit()
    db.close()
    row = Registry(str(home)).get("old-one")
    assert row.spec.cloud == "none" and row.status is Status.SUCCEEDED


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bad_page"])
def test_a_corrupt_registry_is_one_clear_error(tmp_path: Path, damage: str) -> None:
    home = tmp_path / "home"
    registry = Registry(str(home))
    spec = Spec(script="t.py", name="x")
    from lightning_grid.launcher.registry import ExperimentRow

    for i in range(30):
        registry.create(
            ExperimentRow(
                name=f"x{i}", id=new_id(), status=Status.QUEUED, spec=spec, source_dir="/", artifacts="/a"
            )
        )
    path = home / "registry.db"
    for extra in ("-wal", "-shm"):
        (home / f"registry.db{extra}").unlink(missing_ok=True)
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"this is not a database" * 100)
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 3])
    else:
        page = 4096  # every b-tree page after the schema's gets a broken header
        damaged = bytearray(data)
        for start in range(page, len(data), page):
            damaged[start : start + 16] = b"\xff" * 16
        path.write_bytes(bytes(damaged))
    with pytest.raises(RegistryError, match=r"registry corrupt: .*registry\.db — move it aside"):
        reopened = Registry(str(home))
        [reopened.get(f"x{i}") for i in range(30)]


# -- the store: ownership and events ---------------------------------------------------------------
def test_a_store_folder_belongs_to_one_experiment(tmp_path: Path) -> None:
    layout = StoreLayout.of(str(tmp_path / "store"), "exp")
    assert layout.owner() is None
    first, second = new_id(), new_id()
    layout.claim(first, "exp")
    layout.claim(first, "exp")  # idempotent for its owner
    layout.check_owner(first)
    with pytest.raises(UsageError, match="already holds another experiment named 'exp'"):
        layout.claim(second, "exp")
    with pytest.raises(StoreError, match="belongs to another experiment"):
        layout.check_owner(second)


def test_two_agents_writing_events_at_once_lose_nothing(tmp_path: Path) -> None:
    layout = StoreLayout.of(str(tmp_path / "store"), "exp")

    def write(host: str) -> None:
        log = StoreEventLog(layout)
        log.host = host
        for i in range(50):
            log.emit(Event(Kind.NOTE.value, f"{host} {i}", attempt=1))

    threads = [threading.Thread(target=write, args=(h,)) for h in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    messages = [e.message for e in StoreEventLog(layout).read()]
    assert sorted(messages) == sorted(f"{h} {i}" for h in "ab" for i in range(50))


def test_the_agents_old_json_lines_are_still_read(tmp_path: Path) -> None:
    layout = StoreLayout.of(str(tmp_path / "store"), "exp")
    Path(layout.legacy_events).parent.mkdir(parents=True)
    lines = [
        {"time": 1.0, "event": "attempt_started", "attempt": 1, "host": "m1"},
        {"time": 2.0, "event": "attempt_ended", "attempt": 1, "outcome": "preempted", "exit_code": 0},
    ]
    Path(layout.legacy_events).write_text("".join(json.dumps(x) + "\n" for x in lines) + "not json\n")
    events = StoreEventLog(layout).read()
    assert [e.kind for e in events] == ["attempt_started", "attempt_ended"]
    summary = summarize("exp", events)
    assert summary["status"] == "pending" and summary["restarts"] == 1
    assert summary["attempts"][0]["outcome"] == "preempted"


def test_the_agent_replays_its_budgets_from_decisions() -> None:
    events = [
        Event(Kind.STARTED.value, "", time=1, attempt=1),
        Event(Kind.SYNCED.value, "", time=2, attempt=1, data={"seconds": 0.5}),
        Event(
            Kind.DECISION.value,
            "",
            time=3,
            attempt=1,
            data={"status": "pending", "restarts": 1, "failures": 0},
        ),
        Event(Kind.STARTED.value, "", time=4, attempt=2),
        Event(
            Kind.DECISION.value,
            "",
            time=5,
            attempt=2,
            data={"status": "pending", "restarts": 1, "failures": 1, "retry_at": 99.0},
        ),
    ]
    story = _replay(events)
    assert (story.attempts, story.restarts, story.failures, story.retry_at, story.sync_s) == (
        2,
        1,
        1,
        99.0,
        0.5,
    )


def test_every_write_moves_the_change_counter(tmp_path: Path) -> None:
    from lightning_grid.launcher.registry import ExperimentRow

    registry = Registry(str(tmp_path / "home"))
    seen = [registry.change_counter()]

    def moved() -> None:
        now = registry.change_counter()
        assert now > seen[-1]
        seen.append(now)

    spec = Spec(script="t.py", name="x")
    registry.create(
        ExperimentRow(name="x", id=new_id(), status=Status.QUEUED, spec=spec, source_dir="/", artifacts="/a")
    )
    moved()
    registry.start_attempt("x", 1, 123, "/log")
    moved()
    registry.transition("x", Status.RUNNING, "started", attempt=1)
    moved()
    registry.update_attempt("x", 1, exit_code=0)
    moved()
    registry.record("x", Kind.NOTE, "hi")
    moved()
    registry.request_stop("x")
    moved()
    registry.clear_stop("x")
    moved()
    registry.get("x"), registry.events("x"), registry.attempts("x")
    assert registry.change_counter() == seen[-1]  # reads move nothing
