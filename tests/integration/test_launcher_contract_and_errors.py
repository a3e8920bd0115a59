"""Zero code change under the launcher (entry point + env), and clear errors for bad set-ups."""

from __future__ import annotations

import signal
from pathlib import Path

from lightning_grid.checkpoints import CheckpointStore
from lightning_grid.contract import ENV_CHECKPOINTS, ENV_RESUMABLE
from tests.helpers import assert_bit_identical, child_env, run_train, run_until_done

AUG = ["--aug", "--dropout", "0.2"]


def test_script_that_never_imports_us_resumes_exactly_via_entry_point(
    tmp_path: Path, mnist_dir: Path, reference
) -> None:
    expected = reference.get(AUG)
    ckpts = tmp_path / "store" / "checkpoints"
    env = child_env(**{ENV_RESUMABLE: "1", ENV_CHECKPOINTS: str(ckpts)})
    out = tmp_path / "w.pt"
    runs = run_until_done(
        mnist_dir,
        tmp_path / "run",
        out,
        ["--mode", "env", *AUG, "--kill", "train:5", "--kill", "train:21"],
        env=env,
    )
    assert len(runs) == 3
    assert_bit_identical(expected, out)
    assert CheckpointStore(str(ckpts)).committed(), "checkpoints go where the launcher said"


def test_entry_point_does_nothing_without_the_launcher(tmp_path: Path, mnist_dir: Path) -> None:
    out = tmp_path / "w.pt"
    run = run_train(mnist_dir, tmp_path / "run", out, ["--mode", "env", "--kill", "train:5"])
    # Plain Lightning handles the signal its own way (this release exits 0, newer ones 143).
    assert run.returncode in (0, 143, -signal.SIGTERM)
    assert not out.exists() and not (tmp_path / "run" / "resumable").exists()
    assert "lightning_grid" not in run.output


def test_explicit_callback_and_launcher_do_not_save_twice(tmp_path: Path, mnist_dir: Path, reference) -> None:
    expected = reference.get(AUG)
    ckpts = tmp_path / "ckpts"
    env = child_env(**{ENV_RESUMABLE: "1", ENV_CHECKPOINTS: str(ckpts)})
    out = tmp_path / "w.pt"
    runs = run_until_done(
        mnist_dir, tmp_path / "run", out, ["--mode", "callback", *AUG, "--kill", "train:5"], env=env
    )
    assert runs[0].output.count("checkpoint at step") == 1
    # One preemption checkpoint (not one per Resumable), then the final one when training ends.
    assert sorted(r.reason for r in CheckpointStore(str(ckpts)).committed()) == ["final", "preempted"]
    assert_bit_identical(expected, out)


def test_unwritable_location_fails_before_training(tmp_path: Path, mnist_dir: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    run = run_train(
        mnist_dir, tmp_path / "run", tmp_path / "w.pt", ["--ckpt-dir", str(blocker / "ckpts"), "--announce"]
    )
    assert run.returncode != 0
    assert "is not writable" in run.output and str(blocker / "ckpts") in run.output
    assert "STEP 0" not in run.output


def test_checkpoint_of_a_different_model_is_a_clear_error_and_is_kept(
    tmp_path: Path, mnist_dir: Path
) -> None:
    root, out = tmp_path / "run", tmp_path / "w.pt"
    first = run_train(mnist_dir, root, out, ["--kill", "train:3"])
    assert first.returncode == 0
    second = run_train(mnist_dir, root, out, ["--wide", "64"])
    assert second.returncode != 0
    assert "CheckpointMismatchError" in second.output and "different model" in second.output
    assert "different shapes" in second.output
    assert len(CheckpointStore(str(root / "resumable")).committed()) == 1
