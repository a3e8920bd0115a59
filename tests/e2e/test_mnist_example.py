"""The MNIST example: plain, and unmodified under the launcher with a preemption, ends identical."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO, assert_bit_identical, child_env

EXAMPLE = REPO / "examples" / "mnist" / "mnist.py"


def test_example_under_the_launcher_matches_a_plain_run(tmp_path: Path) -> None:
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    args = ["--synthetic", "--epochs", "3", "--accelerator", "cpu", "--weights-out", "w.pt"]
    plain = subprocess.run(
        [sys.executable, str(EXAMPLE), *args],
        cwd=plain_dir,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "test_acc=" in plain.stdout

    home = tmp_path / "home"
    env = child_env(LIGHTNING_GRID_HOME=str(home))
    run = [
        sys.executable,
        "-m",
        "lightning_grid.cli",
        "run",
        "--use_spot",
        "--resumable",
        "--instance_type",
        "p3.2xlarge",
    ]
    run += ["--name", "mnist", "--simulate-preemptions", "5", str(EXAMPLE), *args]
    launched = subprocess.run(run, env=env, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "test_acc=" in launched.stdout
    status = subprocess.run(
        [sys.executable, "-m", "lightning_grid.cli", "status", "mnist", "--json"],
        env=env,
        capture_output=True,
        text=True,
    )
    info = json.loads(status.stdout)
    assert info["status"] == "succeeded" and info["restarts"] == 1
    assert_bit_identical(plain_dir / "w.pt", home / "artifacts" / "mnist" / "execdir" / "files" / "w.pt")
