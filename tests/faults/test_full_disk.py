"""A full or read-only checkpoint folder, on real filesystems, under real training subprocesses.

The folder is a small tmpfs (``small_tmpfs``): the kernel itself answers ENOSPC, part-way through
a write, as a full volume does. ``ballast`` takes the space a test wants gone, so exactly one
checkpoint of the test model (~266 kB) fits and the next one does not.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_grid.checkpoints import PREEMPTED_MARKER, CheckpointStore
from tests.faults.conftest import MountTmpfs, fill
from tests.helpers import assert_bit_identical, run_fsdp, run_train

#: Free bytes left on the tmpfs: one checkpoint of the default test model (~266 kB) and its small
#: files fit, a second one does not.
ROOM_FOR_ONE = 400_000
TRAIN = ["--epochs", "1", "--every-n-steps", "3", "--logger", "none"]


def _temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _only_committed_step(folder: Path) -> int:
    store = CheckpointStore(str(folder))
    found = store.latest_valid()
    assert found is not None, "no valid committed checkpoint left"
    assert [r.step for r in store.committed()] == [found[0].step]
    return found[0].step


def test_full_disk_during_periodic_save_warns_and_training_continues(
    small_tmpfs: MountTmpfs, mnist_dir: Path, tmp_path: Path
) -> None:
    disk = small_tmpfs(size="2m")
    fill(disk, leave=ROOM_FOR_ONE)
    ckpts = disk / "ck"
    out = tmp_path / "weights.pt"
    run = run_train(mnist_dir, tmp_path / "root", out, [*TRAIN, "--ckpt-dir", str(ckpts), "--announce"])
    # Before: exit 1 at step 6 with "unexpected pos 162112 vs 162000" from torch's zip writer.
    steps = [int(line.split()[1]) for line in run.output.splitlines() if line.startswith("STEP ")]
    assert steps == list(range(15)), f"training stopped after step {steps[-1:]}:\n{run.output[-3000:]}"
    warnings = [line for line in run.output.splitlines() if "periodic checkpoint at step" in line]
    # Steps 6, 9 and 12 were due and each was tried (and failed) again. A save due while the
    # previous write is still in flight moves to the next step (a loaded machine): one fewer fits.
    assert 2 <= len(warnings) <= 3, run.output[-3000:]
    assert all("ENOSPC" in line and str(ckpts) in line for line in warnings), warnings
    assert not any("unexpected pos" in line for line in warnings)
    assert _temp_files(ckpts) == []
    store = CheckpointStore(str(ckpts))
    periodic = [r for r in store.committed() if r.reason == "periodic"]
    assert len(periodic) == 1 and 3 <= periodic[0].step <= 5, periodic  # the one that fitted stays ...
    assert store.read_verified(periodic[0])  # ... and valid
    # The final save at step 15 fails on the same full disk. Training is over: the script goes on
    # past fit() and saves its weights elsewhere. (Before: a traceback and exit 1 there.)
    assert run.returncode == 0 and out.exists(), run.output[-3000:]
    final = [line for line in run.output.splitlines() if "the final checkpoint at step 15" in line]
    assert len(final) == 1 and "ENOSPC" in final[0], run.output[-3000:]
    assert f"resume from the checkpoint at step {periodic[0].step}" in final[0], final
    assert "Traceback" not in run.output, run.output[-3000:]


def test_full_disk_at_preemption_exits_0_and_marks_the_older_checkpoint(
    small_tmpfs: MountTmpfs, mnist_dir: Path, tmp_path: Path
) -> None:
    disk = small_tmpfs(size="2m")
    fill(disk, leave=ROOM_FOR_ONE)
    ckpts = disk / "ck"
    out = tmp_path / "weights.pt"
    # SIGTERM at the start of the batch taken at global step 8: the cut (and the failed save) is at 9.
    args = [*TRAIN, "--ckpt-dir", str(ckpts), "--kill", "train:8"]
    run = run_train(mnist_dir, tmp_path / "root", out, args)
    assert run.returncode == 0, run.output[-3000:]
    assert not out.exists(), "the script went on after the SIGTERM"
    assert _temp_files(ckpts) == []
    assert _only_committed_step(ckpts) == 3
    store = CheckpointStore(str(ckpts))
    marker = store.read_marker(PREEMPTED_MARKER)
    assert marker is not None, run.output[-3000:]
    assert marker["step"] == 3 and marker["left_at"] == 9, marker
    assert marker["checkpoint"] == store.committed()[0].name
    assert "ENOSPC" in marker["save_error"]
    said = [line for line in run.output.splitlines() if "stays the resume point" in line]
    assert len(said) == 1 and "ENOSPC" in said[0] and "6 steps to redo" in said[0], run.output[-3000:]


def test_full_disk_at_preemption_without_room_for_the_marker_says_so_in_one_line(
    small_tmpfs: MountTmpfs, mnist_dir: Path, tmp_path: Path
) -> None:
    # Three inodes: the folder itself, then one checkpoint and its commit record. Any further file,
    # the marker included, is refused with ENOSPC however many bytes are free.
    disk = small_tmpfs(size="8m", inodes=3)
    out = tmp_path / "weights.pt"
    args = [*TRAIN, "--ckpt-dir", str(disk), "--kill", "train:8"]
    run = run_train(mnist_dir, tmp_path / "root", out, args)
    assert run.returncode == 1, run.output[-3000:]
    last = run.output.strip().splitlines()[-1]
    assert last.startswith("lightning_grid: SIGTERM received at step 9"), run.output[-3000:]
    assert "ENOSPC" in last and "marker" in last and str(disk) in last, last
    assert "Traceback" not in run.output, run.output[-3000:]
    assert _only_committed_step(disk) == 3  # still the resume point for a relaunch
    assert CheckpointStore(str(disk)).read_marker(PREEMPTED_MARKER) is None


def test_read_only_checkpoint_folder_fails_at_setup_naming_path_and_cause(
    read_only_dir: Path, mnist_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "weights.pt"
    run = run_train(
        mnist_dir, tmp_path / "root", out, [*TRAIN, "--ckpt-dir", str(read_only_dir), "--announce"]
    )
    assert run.returncode != 0
    assert "STEP " not in run.output, "training started before the folder was checked"
    last = run.output.strip().splitlines()[-1]
    assert last.startswith("lightning_grid.errors.StoreUnwritableError: "), run.output[-3000:]
    assert str(read_only_dir) in last and "read-only file system (EROFS)" in last, last


@pytest.mark.slow
def test_full_disk_under_sharded_background_saves_keeps_training_and_the_older_folder(
    small_tmpfs: MountTmpfs, tmp_path: Path
) -> None:
    """FSDP, two ranks under torchrun: periodic folder saves written by DCP in the background, on a
    disk with room for one folder (~1.2 MB). The first fits; the later ones fail part-way through
    a shard (ENOSPC in DCP's thread, a ``BaseException`` there), and so does the preemption save.
    Training goes on, each failed folder is removed at once, the run leaves with status 0 and a
    marker naming the folder that fitted, and a relaunch from it on the still full disk trains
    to the end (its final save failing too) with the weights of an uninterrupted run."""
    disk = small_tmpfs(size="8m")
    fill(disk, leave=1_800_000)
    ckpts, out = disk / "ck", tmp_path / "w.pt"
    args = ["--hidden", "8000", "--every-n-steps", "4", "--sigterm-at", "18:1"]
    first = run_fsdp(ckpts, out, *args)
    warnings = [line for line in first.splitlines() if "periodic checkpoint at step" in line]
    assert warnings, first[-4000:]
    assert all("no space left on device (ENOSPC)" in line for line in warnings), warnings
    assert "CheckpointException" not in first and "Traceback" not in first, first[-4000:]
    store = CheckpointStore(str(ckpts))
    records = store.committed()
    assert [r.reason for r in records] == ["periodic"] and records[0].step == 4, records
    valid = store.latest_valid()  # every file of the folder verifies
    assert valid is not None and valid[0].name == records[0].name
    assert sorted(p.name for p in ckpts.iterdir() if p.suffix == ".dcp") == [records[0].name]
    marker = store.read_marker(PREEMPTED_MARKER)
    assert marker is not None and marker["step"] == 4 and marker["checkpoint"] == records[0].name, marker
    assert "ENOSPC" in marker["save_error"], marker
    assert not out.exists(), "the script went on after the SIGTERM"

    # Again on the same full disk, to the end: it resumes from step 4, every save fails (the final
    # one too), and the script goes on past fit() with the weights of an uninterrupted run.
    second = run_fsdp(ckpts, out, *args[:4], attempt="2")
    assert f"resuming from {ckpts / records[0].name} (step 4, periodic)" in second, second[-4000:]
    assert "done at step 24" in second and "the final checkpoint at step 24 could not be saved" in second
    assert [r.step for r in store.committed()] == [4]
    reference = tmp_path / "plain.pt"
    run_fsdp(tmp_path / "unused", reference, "--plain", "--hidden", "8000")
    assert_bit_identical(reference, out)
