"""The MNIST example: plain, and unmodified under the launcher with a preemption, ends identical."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import EXAMPLE, assert_bit_identical, grid, grid_status, run_example


def test_example_under_the_launcher_matches_a_plain_run(tmp_path: Path) -> None:
    plain_dir = tmp_path / "plain"
    args = ["--synthetic", "--epochs", "3", "--accelerator", "cpu", "--weights-out", "w.pt"]
    plain = run_example(plain_dir, args, timeout=600)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "test_acc=" in plain.stdout

    home = tmp_path / "home"
    run = ["run", "--use_spot", "--resumable", "--instance_type", "p3.2xlarge", "--name", "mnist"]
    launched = grid(home, *run, "--simulate-preemptions", "5", str(EXAMPLE), *args)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "test_acc=" in launched.stdout
    info = grid_status(home, "mnist")
    assert info["status"] == "succeeded" and info["restarts"] == 1
    assert_bit_identical(plain_dir / "w.pt", home / "artifacts" / "mnist" / "execdir" / "files" / "w.pt")
