"""The SLURM bill without a live SLURM: sacct's ``-P -n`` lines (captured from the test cluster of
``.ci/slurm-up.sh``) parsed, and a cluster without accounting answered with our own measured times
and one line saying so (sacct's real message, from a stand-in ``sacct`` on PATH)."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from lightning_grid.cli import cli
from lightning_grid.launcher import slurm
from lightning_grid.launcher.events import Kind
from lightning_grid.launcher.experiment import Status
from lightning_grid.launcher.layout import new_id
from lightning_grid.launcher.registry import ExperimentRow, Registry
from lightning_grid.launcher.report import describe
from lightning_grid.launcher.spec import Spec

#: ``sacct -j 313 --duplicates -P -n --format=SACCT_FORMAT`` (here without ``--allocations``, so
#: with the steps' lines too) on the test cluster, slurm-wlm 22.05: a job preempted once by a
#: high-priority job (its first run ends REQUEUED), then run again to the end.
CAPTURED = """\
313|REQUEUED|2026-12-02T05:42:54|2026-12-02T05:43:16|00:00:22|22|1|1
313.batch|FAILED|2026-12-02T05:42:54|2026-12-02T05:43:16|00:00:22|22|1|1
313.0|CANCELLED|2026-12-02T05:42:55|2026-12-02T05:43:16|00:00:21|21|1|1
313|COMPLETED|2026-12-02T05:43:23|2026-12-02T05:43:50|00:00:27|27|1|1
313.batch|COMPLETED|2026-12-02T05:43:23|2026-12-02T05:43:50|00:00:27|27|1|1
313.0|COMPLETED|2026-12-02T05:43:23|2026-12-02T05:43:50|00:00:27|27|1|1
"""
EXPECTED = [("REQUEUED", 22, 1, 1), ("COMPLETED", 27, 1, 1)]
#: The same of a job still running (job 319): its run so far, End ``Unknown``.
RUNNING = """\
319|RUNNING|2026-12-02T05:45:16|Unknown|00:00:10|10|1|1
319.batch|RUNNING|2026-12-02T05:45:16|Unknown|00:00:10|10|1|1
319.0|RUNNING|2026-12-02T05:45:16|Unknown|00:00:10|10|1|1
"""
#: sacct 22.05's stderr (exit 1) with ``AccountingStorageType=accounting_storage/none``.
ACCOUNTING_OFF = "Slurm accounting storage is disabled"


def test_sacct_lines_of_a_requeued_job_are_its_runs() -> None:
    runs = slurm.parse_sacct(CAPTURED, "313")
    assert [(r.state, r.elapsed_s, r.nodes, r.cpus) for r in runs] == EXPECTED
    assert [(r.job, r.start, r.end) for r in runs] == [
        ("313", "2026-12-02T05:42:54", "2026-12-02T05:43:16"),
        ("313", "2026-12-02T05:43:23", "2026-12-02T05:43:50"),
    ]
    assert slurm.parse_sacct(CAPTURED, "31") == []  # another job's lines are not this one's
    (running,) = slurm.parse_sacct(RUNNING, "319")
    assert (running.state, running.elapsed_s, running.end) == ("RUNNING", 10, "Unknown")


def test_steps_other_jobs_unstarted_runs_and_odd_lines_are_no_runs() -> None:
    out = (
        "7|PREEMPTED|2026-12-02T03:00:00|2026-12-03T03:01:02|1-00:01:02||2|1\n"  # Elapsed only: D-HH:MM:SS
        "7.batch|COMPLETED|2026-12-02T03:00:00|2026-12-02T03:00:04|00:00:04|4|2|1\n"
        "\n"
        "17|COMPLETED|2026-12-02T03:00:00|2026-12-02T03:00:09|00:00:09|9|2|1\n"
        "7|PENDING|Unknown|Unknown|00:00:00|0|4|2\n"
        "7|CANCELLED by 0|2026-12-02T04:00:00|2026-12-02T04:01:02|01:02|62|4|2\n"
        "7|RUNNING|2026-12-02T04:00:00|Unknown|xx|yy|4|2\n"
        "7|garbage\n"
    )
    runs = slurm.parse_sacct(out, "7")
    assert [(r.state, r.elapsed_s, r.nodes, r.cpus) for r in runs] == [
        ("PREEMPTED", 86462, 1, 2),
        ("CANCELLED", 62, 2, 4),
    ]
    assert [(r.node_seconds, r.cpu_seconds) for r in runs] == [(86462, 172924), (124, 248)]


def _sacct_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sacct = bin_dir / "sacct"
    sacct.write_text("#!/bin/sh\n" + script)
    sacct.chmod(sacct.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def _slurm_experiment(home: Path) -> Registry:
    """A SLURM experiment of one job, preempted once and finished: two attempts (its two SLURM
    runs) of 30 s and 12.5 s by the agent's own clock."""
    registry = Registry(str(home))
    spec = Spec(script="t.py", name="billed", backend="slurm")
    registry.create(
        ExperimentRow(
            name="billed", id=new_id(), status=Status.QUEUED, spec=spec, source_dir="/", artifacts="/a"
        )
    )
    registry.record("billed", Kind.NOTE, "submitted to SLURM as job 313", slurm_job_id="313", script="/s")
    for number, (seconds, outcome) in enumerate([(30.0, "preempted"), (12.5, "succeeded")], start=1):
        registry.start_attempt("billed", number, 100 + number, "/log")
        started = time.time() - 100 + number * 50
        registry.update_attempt("billed", number, started=started, ended=started + seconds, outcome=outcome)
    return registry


def test_without_accounting_the_bill_is_our_measured_times_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _sacct_on_path(tmp_path, monkeypatch, f"printf '%s\\n' '{ACCOUNTING_OFF}' >&2\nexit 1\n")
    home = tmp_path / "home"
    bill = describe(_slurm_experiment(home), "billed", accounting=True)["bill"]["slurm"]
    assert bill["source"] == "measured" and bill["jobs"] == ["313"] and bill["cpu_seconds"] is None
    assert [(r["attempt"], r["seconds"]) for r in bill["runs"]] == [(1, 30.0), (2, 12.5)]
    assert bill["seconds"] == 42.5
    assert bill["note"] == (
        "sacct unavailable (SLURM accounting is disabled on this cluster): these are our own measured times"
    )
    assert describe(Registry(str(home)), "billed")["bill"]["slurm"] is None  # not asked: no sacct run

    monkeypatch.setenv("LIGHTNING_GRID_HOME", str(home))
    result = CliRunner().invoke(cli, ["status", "billed"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("slurm:")]
    assert lines == [
        "slurm: 2 runs of job 313 · elapsed 0m42s · 0m42s of node time · sacct unavailable (SLURM accounting"
        " is disabled on this cluster): these are our own measured times"
    ]
    assert "est. cost" not in result.output  # no price for ``local``: SLURM's line replaces the $0


def test_another_sacct_failure_is_the_same_fallback_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = "sacct: error: Problem talking to the database: Connection refused"
    _sacct_on_path(tmp_path, monkeypatch, f"printf '%s\\n' '{message}' >&2\nexit 1\n")
    bill = describe(_slurm_experiment(tmp_path / "home"), "billed", accounting=True)["bill"]["slurm"]
    assert bill["source"] == "measured" and "Connection refused" in bill["note"]


def test_with_accounting_the_bill_is_sacct_s(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = CAPTURED.replace("'", "")
    _sacct_on_path(tmp_path, monkeypatch, f"cat <<'EOF'\n{lines}EOF\n")
    bill = describe(_slurm_experiment(tmp_path / "home"), "billed", accounting=True)["bill"]["slurm"]
    assert bill["source"] == "sacct" and bill["note"] is None
    assert [(r["state"], r["seconds"], r["nodes"], r["cpus"]) for r in bill["runs"]] == EXPECTED
    assert bill["seconds"] == sum(e[1] for e in EXPECTED)
    assert bill["node_seconds"] == sum(e[1] * e[2] for e in EXPECTED)
    assert bill["cpu_seconds"] == sum(e[1] * e[3] for e in EXPECTED)
