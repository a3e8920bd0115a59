"""One scenario table, two front ends: the local engine and the on-instance agent must reach the same
outcomes and decisions, because both are thin layers over one attempt runner and one ``decide``.

Real processes and real signals: ``tests/scripts/contract_script.py`` speaks the launcher's contract
as ``Resumable`` does (markers, the shutdown plan, the spool) without training, so the table stays
quick. The plans are steered the way the launcher itself chooses them: from the timings in the
store's commit records and the last execution-directory sync.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lightning_grid.checkpoints import CheckpointStore
from lightning_grid.launcher.agent import EX_PREEMPTED, AgentSpec, read_events, run_agent
from lightning_grid.launcher.engine import Engine
from lightning_grid.launcher.events import Event, Kind, StoreEventLog
from lightning_grid.launcher.layout import StoreLayout
from lightning_grid.launcher.spec import Spec
from tests.helpers import REPO

SCRIPT = REPO / "tests" / "scripts" / "contract_script.py"
SEEDED_STEP = 7
#: When the simulated notice comes: the script installs its handler first thing, and this leaves room for
#: a slow interpreter start on a loaded machine (a notice before it would kill the script with -15).
NOTICE_S = 1.5


@dataclass(frozen=True)
class Scenario:
    mode: str
    options: dict = field(default_factory=dict)
    seed: tuple[float, float] | None = None  # (write_s, upload_s) of a committed checkpoint before the run
    sync_s: float = 0.0  # the last execution-directory sync before the run
    # expected, per attempt: (outcome, plan, status decided, steps redone > 0)
    expected: tuple[tuple[str, str | None, str, bool], ...] = ()


SCENARIOS = {
    "preempted-full": Scenario(
        "preempt",
        {"simulate_preemptions": (NOTICE_S,)},
        expected=(("preempted", "full", "pending", False), ("succeeded", None, "succeeded", False)),
    ),
    "preempted-keep": Scenario(
        "preempt",
        {"simulate_preemptions": (NOTICE_S,), "grace_period": 20.0},
        seed=(100.0, 0.0),
        expected=(("preempted", "keep", "pending", True), ("succeeded", None, "succeeded", False)),
    ),
    "preempted-local": Scenario(
        "preempt",
        {"simulate_preemptions": (NOTICE_S,), "grace_period": 20.0},
        seed=(1.0, 10.0),
        sync_s=10.0,
        expected=(("preempted", "local", "pending", False), ("succeeded", None, "succeeded", False)),
    ),
    "killed": Scenario(
        "stubborn",
        {"simulate_preemptions": (NOTICE_S,), "grace_period": 1.0, "max_restarts": 0},
        expected=(("killed", "full", "failed", False),),
    ),
    "finished-as-the-notice-came": Scenario(
        "finish",
        {"simulate_preemptions": (NOTICE_S,)},
        expected=(("succeeded", "full", "succeeded", False),),
    ),
    "crash-with-a-retry": Scenario(
        "crash",
        {"retries": 1, "retry_delay": 0.0},
        expected=(("failed", None, "pending", False), ("failed", None, "failed", False)),
    ),
}


def _seed(layout: StoreLayout, scenario: Scenario) -> None:
    """A committed checkpoint whose record says its save took ``seed`` seconds."""
    if scenario.seed is None:
        return
    store = CheckpointStore(layout.checkpoints)
    record = store.save({"step": SEEDED_STEP}, SEEDED_STEP)
    path = Path(layout.checkpoints) / (record.name + ".commit.json")
    raw = json.loads(path.read_text())
    raw["meta"].update(write_s=scenario.seed[0], upload_s=scenario.seed[1])
    path.write_text(json.dumps(raw))


def _engine_story(tmp_path: Path, scenario: Scenario) -> list[tuple[str, str | None, str, bool]]:
    home = tmp_path / "home"
    source = tmp_path / "src"
    source.mkdir(parents=True)
    shutil.copy(SCRIPT, source / "s.py")
    engine = Engine(str(home), echo=False)
    spec = Spec(script=str(source / "s.py"), args=(scenario.mode,), name="exp", resumable=True, use_spot=True)
    row = engine.submit(spec.with_(**scenario.options))
    _seed(row.layout, scenario)
    if scenario.sync_s:
        engine.registry.record("exp", Kind.SYNCED, "seeded", seconds=scenario.sync_s)
    engine.run("exp")
    events = engine.registry.events("exp")
    story = []
    for attempt in engine.registry.attempts("exp"):
        plan = next(
            (e.data["plan"] for e in events if e.kind == "plan" and e.attempt == attempt.number), None
        )
        decided = next(
            e.to_status for e in reversed(events) if e.kind == "transition" and e.attempt == attempt.number
        )
        story.append((str(attempt.outcome), plan, str(decided), bool(attempt.steps_redone)))
    return story


def _agent_story(tmp_path: Path, scenario: Scenario, monkeypatch) -> list[tuple[str, str | None, str, bool]]:
    store = str(tmp_path / "store")
    layout = StoreLayout.of(store, "exp")
    machine = tmp_path / "machine-1"
    machine.mkdir(parents=True)
    shutil.copy(SCRIPT, machine / "s.py")
    _seed(layout, scenario)
    if scenario.sync_s:
        StoreEventLog(layout).emit(Event(Kind.SYNCED.value, "seeded", data={"seconds": scenario.sync_s}))
    spec = Spec(cloud="none").with_(**scenario.options)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    codes = []
    for number in range(1, 4):
        workdir = tmp_path / f"machine-{number}"  # each attempt on a new machine, as a provisioner does
        code = run_agent(AgentSpec([sys.executable, "s.py", scenario.mode], store, "exp", str(workdir), spec))
        codes.append(code)
        if code != EX_PREEMPTED:
            break
    events = read_events(store, "exp")
    story = []
    for ended in (e for e in events if e.kind == "attempt_ended"):
        decision = next(e for e in events if e.kind == "decision" and e.attempt == ended.attempt)
        story.append(
            (
                ended.data["outcome"],
                ended.data["plan"],
                decision.data["status"],
                bool(ended.data["steps_redone"]),
            )
        )
    final = story[-1][2]
    assert codes[-1] == {"succeeded": 0, "failed": 1}[final]
    assert all(c == EX_PREEMPTED for c in codes[:-1])
    return story


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SCENARIOS))
def test_both_front_ends_follow_the_same_table(tmp_path: Path, case: str, monkeypatch) -> None:
    scenario = SCENARIOS[case]
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    engine = _engine_story(tmp_path / "engine", scenario)
    agent = _agent_story(tmp_path / "agent", scenario, monkeypatch)
    assert engine == list(scenario.expected)
    assert agent == list(scenario.expected)
