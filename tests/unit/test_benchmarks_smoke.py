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
    assert {row["figure"] for row in rows} == FIGURES
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
    body = [line for line in table if line.startswith("| ") and not line.startswith("| figure")]
    assert len(body) == len(rows)
    assert all(line.count("|") == 9 for line in body)

    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} >= {
        "sigterm_to_exit.png",
        "resume_overhead.png",
        "throughput.png",
        "wall_time.png",
    }
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
