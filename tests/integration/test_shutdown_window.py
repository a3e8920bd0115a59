"""The script follows the launcher's shutdown plan: keep the last periodic checkpoint, or save to the
local spool for the launcher to publish; either way the run resumes bit-identically."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest

from lightning_grid.checkpoints import CheckpointStore
from lightning_grid.launcher.window import ShutdownWindow
from lightning_grid.shutdown import Plan, ShutdownNotice, write_notice
from tests.helpers import assert_bit_identical, child_env, run_train, run_until_done

AUG = ["--aug", "--dropout", "0.2"]


def _notice(tmp_path: Path, plan: Plan, seconds_left: float = 60.0) -> tuple[Path, ShutdownNotice]:
    path = tmp_path / "notice.json"
    spool = str(tmp_path / "spool") if plan is Plan.LOCAL else None
    notice = ShutdownNotice(plan, deadline=time.time() + seconds_left, window_s=seconds_left, spool=spool)
    write_notice(str(path), notice)
    return path, notice


def test_keep_plan_exits_without_saving_and_resumes_from_the_periodic_checkpoint(
    tmp_path: Path, mnist_dir: Path, reference
) -> None:
    expected = reference.get(AUG)
    root, out = tmp_path / "run", tmp_path / "w.pt"
    notice_path, _ = _notice(tmp_path, Plan.KEEP)
    args = AUG + ["--every-n-steps", "4", "--kill", "train:10", "--kill-settle"]
    first = run_train(mnist_dir, root, out, args, env=child_env(LIGHTNING_GRID_NOTICE=str(notice_path)))
    assert first.returncode == 0, first.output[-3000:]
    assert "nothing new saved" in first.output
    store = CheckpointStore(str(root / "resumable"))
    newest = store.committed()[0]
    assert newest.reason == "periodic" and newest.step <= 10
    marker = store.read_marker()
    assert marker is not None and (marker["plan"], marker["step"], marker["checkpoint"]) == (
        "keep",
        newest.step,
        newest.name,
    )
    rest = run_until_done(mnist_dir, root, out, AUG + ["--every-n-steps", "4"])
    assert f"step {newest.step}, periodic" in rest[0].output
    assert_bit_identical(expected, out)


@pytest.mark.parametrize("in_time", [True, False], ids=["published", "deadline_passed"])
def test_local_plan_spools_the_checkpoint_and_the_launcher_publishes_it_in_time(
    in_time: bool, tmp_path: Path, mnist_dir: Path, reference
) -> None:
    expected = reference.get(AUG)
    root, out = tmp_path / "run", tmp_path / "w.pt"
    notice_path, notice = _notice(tmp_path, Plan.LOCAL)
    args = AUG + ["--every-n-steps", "4"]
    env = child_env(LIGHTNING_GRID_NOTICE=str(notice_path))
    first = run_train(mnist_dir, root, out, args + ["--kill", "train:10"], env=env)
    assert first.returncode == 0, first.output[-3000:]
    store = CheckpointStore(str(root / "resumable"))
    periodic = store.committed()[0]
    # The preemption checkpoint went to the spool only; the store has the periodic ones.
    assert periodic.reason == "periodic" and store.read_marker() is None
    spooled = CheckpointStore(str(tmp_path / "spool")).committed()
    assert [(r.step, r.reason) for r in spooled] == [(11, "preempted")]  # the step in flight completes
    assert json.loads((tmp_path / "spool" / "PREEMPTED.json").read_text())["plan"] == "local"

    window = ShutdownWindow(store, str(notice_path), str(tmp_path / "spool"))
    # The window is measured from now (the training run above may have taken a while on a loaded machine).
    window.notice = replace(notice, deadline=time.time() + (60 if in_time else -1))
    said = window.publish()
    assert said is not None
    if in_time:
        assert "step 11 uploaded" in said
        resume = (11, "preempted")
    else:
        assert f"step {periodic.step} stays" in said  # an upload that did not finish never counts
        resume = (periodic.step, "periodic")
    marker = store.read_marker()
    assert store.committed()[0].step == resume[0] and marker is not None and marker["step"] == resume[0]

    rest = run_until_done(mnist_dir, root, out, args)
    assert f"step {resume[0]}, {resume[1]}" in rest[0].output
    assert_bit_identical(expected, out)
