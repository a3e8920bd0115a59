"""Pure pieces of the launcher: the lifecycle table, the decision function, artifacts, catalogue."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lightning_grid.errors import StoreError, UsageError
from lightning_grid.launcher import artifacts, instances
from lightning_grid.launcher.experiment import TRANSITIONS, Outcome, Status, can_transition, classify


def test_terminal_statuses_have_no_way_out_and_every_live_one_can_stop() -> None:
    for status in Status:
        if status is Status.FAILED:  # only run --resume, the user's explicit word, leaves it
            assert TRANSITIONS[status] == frozenset({Status.PENDING})
        elif status.is_terminal():
            assert TRANSITIONS[status] == frozenset()
        else:
            assert can_transition(status, Status.STOPPED)
    assert can_transition(Status.INTERRUPTING, Status.PENDING)
    assert not can_transition(Status.PENDING, Status.RUNNING)  # always through restoring


@pytest.mark.parametrize(
    "exit_code,noticed,killed,resumable,stopped,expected",
    [
        (0, False, False, True, False, Outcome.SUCCEEDED),
        (1, False, False, True, False, Outcome.FAILED),
        (0, True, False, True, False, Outcome.PREEMPTED),
        (-15, True, False, True, False, Outcome.PREEMPTED),
        (-9, True, True, True, False, Outcome.KILLED),
        (1, True, False, True, False, Outcome.FAILED),
        (0, True, False, False, False, Outcome.INTERRUPTED_NOT_RESUMABLE),
        (-15, False, False, True, True, Outcome.STOPPED),
    ],
)
def test_classify(exit_code, noticed, killed, resumable, stopped, expected) -> None:
    assert classify(exit_code, noticed, killed, resumable, stopped) is expected


def test_sync_is_incremental_and_restore_round_trips(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "b.bin").write_bytes(os.urandom(1000))
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "x.pyc").write_bytes(b"skip me")
    url = str(tmp_path / "store")
    first = artifacts.upload(str(src), url)
    assert (first.files, first.transferred) == (2, 2)
    second = artifacts.upload(str(src), url)
    assert second.transferred == 0 and second.skipped == 2
    dest = tmp_path / "dest"
    artifacts.restore(url, str(dest))
    assert (dest / "a.txt").read_text() == "alpha" and not (dest / "__pycache__").exists()
    # Restored files keep their recorded times: syncing them back transfers nothing.
    assert artifacts.upload(str(dest), url).transferred == 0
    (dest / "a.txt").write_text("changed")
    (dest / "sub" / "b.bin").unlink()
    third = artifacts.upload(str(dest), url)
    assert third.transferred == 1
    again = tmp_path / "again"
    artifacts.restore(url, str(again))
    assert (again / "a.txt").read_text() == "changed" and not (again / "sub" / "b.bin").exists()


def test_sync_to_memory_filesystem(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("x")
    artifacts.upload(str(tmp_path), "memory://lg-artifacts/exp")
    artifacts.restore("memory://lg-artifacts/exp", str(tmp_path / "out"))
    assert (tmp_path / "out" / "f.txt").read_text() == "x"


@pytest.mark.parametrize("evil", ["../outside.txt", "/etc/passwd", "a/../../outside.txt"])
def test_restore_rejects_entries_outside_the_execution_directory(tmp_path: Path, evil: str) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_text(json.dumps({"files": {evil: {"size": 1, "mtime_ns": 0}}}))
    with pytest.raises(StoreError, match="outside the execution directory"):
        artifacts.restore(str(store), str(tmp_path / "exec"))
    assert not (tmp_path / "outside.txt").exists()


def test_catalogue() -> None:
    p3 = instances.lookup("p3.2xlarge")
    assert (p3.gpus, p3.gpu, p3.gpu_memory_gb) == (1, "V100", 16) and p3.on_demand > p3.spot > 0
    assert instances.lookup("p3.8xlarge").gpus == 4 and instances.lookup("p4d.24xlarge").gpu == "A100"
    with pytest.raises(UsageError, match="valid types: .*g4dn.xlarge"):
        instances.lookup("p9.huge")
    assert instances.visible_devices(instances.lookup("cpu"), 2) == ""
    assert instances.visible_devices(instances.lookup("p3.8xlarge"), 8) == "0,1,2,3"
    assert instances.visible_devices(p3, 0) == ""  # simulated on the CPU
    # The launcher's own CUDA_VISIBLE_DEVICES: the run gets the first of the devices it was given.
    assert instances.visible_devices(p3, 2, allowed="3,5") == "3"
    assert (
        instances.visible_devices(instances.lookup("p3.8xlarge"), 4, allowed="GPU-a,GPU-b,GPU-c,GPU-d")
        == "GPU-a,GPU-b,GPU-c,GPU-d"
    )
    with pytest.raises(UsageError, match="needs 4 GPU"):
        instances.visible_devices(instances.lookup("p3.8xlarge"), 2)
