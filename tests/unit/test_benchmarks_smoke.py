"""The benchmark suite runs end to end at tiny sizes and writes a well-formed report.

No timing is asserted: the numbers of a tiny run on a busy test machine mean nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, child_env

FIGURES = {
    "SIGTERM → process exit",
    "SIGTERM → exit, stage by stage",
    "steps lost per SIGTERM",
    "steps lost per SIGKILL",
    "resume overhead (relaunch → first new step)",
    "steady-state throughput",
    "launcher footprint",
    "total wall time with k simulated preemptions",
    "artifact sync",
}


@pytest.mark.slow  # over 25 s on 2 cores: CI runs it, the default run does not
def test_benchmark_suite_tiny(tmp_path: Path) -> None:
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "benchmarks", "--preset", "tiny", "--out", str(out), "--work", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads((out / "results.json").read_text())
    assert {"machine", "settings", "seconds", "rows", "extra"} <= set(report)
    assert report["settings"]["name"] == "tiny"
    assert report["machine"]["cpus"] >= 1
    rows = report["rows"]
    broken = [row for row in rows if row["case"] == "the figure could not be measured"]
    assert not broken, [(row["figure"], row["notes"]) for row in broken]
    # The GPU figure joins where CUDA is there to measure it.
    assert {row["figure"] for row in rows} - {"SIGTERM → process exit, state on the GPU"} == FIGURES
    for row in rows:
        assert {"figure", "case", "unit", "value", "baseline", "ratio", "target", "met"} <= set(row)
        assert {"median", "min", "max", "n"} <= set(row["value"])
        assert row["value"]["n"] >= 1
        assert row["value"]["min"] <= row["value"]["median"] <= row["value"]["max"]
        assert row["met"] in (True, False)
    # The figures that cannot depend on timing hold even at tiny sizes.
    lost = next(r for r in rows if r["figure"] == "steps lost per SIGTERM")
    assert lost["value"]["max"] == 0

    table = (out / "results.md").read_text().splitlines()
    start = next(i for i, line in enumerate(table) if line.startswith("| figure"))
    end = next(i for i in range(start, len(table)) if not table[i].startswith("|"))
    body = table[start + 2 : end]  # the main table (the exit breakdown follows as its own table)
    assert len(body) == len(rows)
    assert all(line.count("|") == 9 for line in body)
    assert any(line.startswith("| teardown |") for line in table[end:])

    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} >= {
        "sigterm_to_exit.png",
        "resume_overhead.png",
        "throughput.png",
        "wall_time.png",
    }
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_exit_breakdown_accounts_for_every_stage() -> None:
    """The stage-by-stage figure: stages come from the trace's time stamps and add up to the whole."""
    from benchmarks.exit_profile import STAGES, breakdown

    def span(label: str, start: float, end: float) -> list[str]:
        return [f"TRACE {label}:start {start}", f"TRACE {label}:end {end}"]

    lines = [
        *span("save_on_training_thread", 1.0, 1.1),
        *span("store.save", 1.1, 3.0),
        *span("layout", 1.1, 1.2),
        *span("write", 1.2, 2.0),
        *span("writeback", 2.0, 2.1),
        *span("stream_close", 2.1, 2.6),
        *span("write", 2.1, 2.3),
        *span("fsync", 2.6, 2.8),
        *span("rename", 2.8, 2.81),
        *span("fsync_dir", 2.81, 2.82),
        *span("copy", 2.82, 2.86),  # (in a real trace, between the writes)
        *span("write_small", 2.9, 3.0),
        *span("fsync", 2.92, 2.95),
        *span("prune", 3.0, 3.05),
        *span("write_small", 3.1, 3.2),
        *span("finish_preemption", 1.2, 3.3),
        "TRACE write:start garbled-by-another-thread",
    ]
    stages = breakdown(lines, sent=0.5, exited=3.8)
    assert set(stages) == set(STAGES)
    assert abs(sum(stages.values()) - 3.3) < 1e-9
    expected = {
        "step in flight": 0.5, "dump": 0.1, "serialize": 0.1, "copy": 0.04, "write": 1.1, "hash": 0.3, "fsync": 0.2,
        "rename": 0.02, "commit": 0.1, "prune": 0.05, "marker": 0.25, "teardown": 0.5,
    }  # fmt: skip
    for stage, seconds in expected.items():
        assert abs(stages[stage] - seconds) < 1e-9, (stage, stages[stage])
    assert abs(stages["other"] - 0.04) < 1e-9


def test_exit_breakdown_counts_overlapped_copies_and_writes_once() -> None:
    """Direct writes run on their own thread while the next buffer is copied: the stages still add
    up to the whole, a write counts only where no copy overlaps it, and close() waiting for the
    write in flight is the write's time, not the hash's."""
    from benchmarks.exit_profile import breakdown

    def span(label: str, start: float, end: float) -> list[str]:
        return [f"TRACE {label}:start {start}", f"TRACE {label}:end {end}"]

    lines = [
        *span("save_on_training_thread", 1.0, 1.1),
        *span("store.save", 1.1, 3.0),
        *span("layout", 1.1, 1.2),
        *span("copy", 1.2, 1.4),
        *span("write", 1.4, 1.9),  # the first buffer, on the write thread
        *span("copy", 1.4, 1.6),  # the next one meanwhile
        *span("write", 1.9, 2.3),  # still in flight when close() starts
        *span("copy", 1.9, 2.0),
        *span("stream_close", 2.1, 2.5),
        *span("write", 2.3, 2.4),  # the tail, on the caller's thread
        *span("fsync", 2.5, 2.8),
        *span("rename", 2.8, 2.9),
        *span("write_small", 2.9, 3.0),
        *span("finish_preemption", 1.2, 3.3),
    ]
    stages = breakdown(lines, sent=0.5, exited=3.8)
    assert abs(sum(stages.values()) - 3.3) < 1e-9
    assert abs(stages["copy"] - 0.5) < 1e-9
    assert abs(stages["write"] - 0.7) < 1e-9  # 1.0 s of writes, 0.3 s of it under copies
    assert abs(stages["hash"] - 0.1) < 1e-9  # close(): 0.4 s, of which writes 0.3 s
    assert abs(stages["other"]) < 1e-9  # this timeline has no gaps
