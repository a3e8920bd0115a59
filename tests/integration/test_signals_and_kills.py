"""Real signals from outside the process: SIGTERM → exit 0 with a committed checkpoint and a marker;
SIGKILL → resume from the newest periodic checkpoint; a kill in the middle of a write changes nothing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lightning_grid.checkpoints import CheckpointStore
from tests.helpers import TRAIN, assert_bit_identical, child_env, run_train, run_until_done

AUG = ["--aug", "--dropout", "0.2"]


def _start(
    mnist_dir: Path, root: Path, out: Path, args: list[str], new_session: bool = False
) -> subprocess.Popen:
    cmd = [sys.executable, str(TRAIN), "--data-dir", str(mnist_dir), "--root", str(root), "--out", str(out)]
    return subprocess.Popen(
        [*cmd, "--announce", *args],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=new_session,
    )


def _wait_for_step(proc: subprocess.Popen, step: int) -> list[str]:
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("STEP ") and int(line.split()[1]) >= step:
            return lines
    raise AssertionError(f"process ended before step {step}:\n" + "".join(lines[-40:]))


def test_external_sigterm_exits_zero_with_marker_then_resumes_exactly(
    tmp_path: Path, mnist_dir: Path, reference
) -> None:
    options = AUG + ["--step-sleep", "0.02"]
    expected = reference.get(options)
    root, out = tmp_path / "run", tmp_path / "w.pt"
    proc = _start(mnist_dir, root, out, options)
    _wait_for_step(proc, 4)
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    elapsed = time.monotonic() - sent
    assert proc.returncode == 0, output[-3000:]
    assert not out.exists(), "the script must stop where it was, not run the code after fit()"
    marker = json.loads((root / "resumable" / "PREEMPTED.json").read_text())
    store = CheckpointStore(str(root / "resumable"))
    newest = store.committed()[0]
    assert marker["step"] == newest.step >= 5 and marker["checkpoint"] == newest.name
    print(f"SIGTERM → exit: {elapsed:.2f}s")
    run_until_done(mnist_dir, root, out, options)
    assert_bit_identical(expected, out)
    assert not (root / "resumable" / "PREEMPTED.json").exists(), "a finished run leaves no preemption marker"
    assert json.loads((root / "resumable" / "COMPLETED.json").read_text())["step"] == 30


def test_second_sigterm_while_saving_changes_nothing(tmp_path: Path, mnist_dir: Path, reference) -> None:
    options = AUG + ["--wide", "2048", "--step-sleep", "0.02"]  # ~6 MB of weights + momentum
    expected = reference.get(options)
    root, out = tmp_path / "run", tmp_path / "w.pt"
    proc = _start(mnist_dir, root, out, options)
    _wait_for_step(proc, 3)
    for _ in range(5):
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.01)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    run_until_done(mnist_dir, root, out, options)
    assert_bit_identical(expected, out)


def test_sigusr1_when_configured(tmp_path: Path, mnist_dir: Path, reference) -> None:
    options = AUG + ["--signals", "SIGTERM,SIGUSR1"]
    expected = reference.get(AUG)
    root, out = tmp_path / "run", tmp_path / "w.pt"
    runs = run_until_done(mnist_dir, root, out, options + ["--kill", "train:6:SIGUSR1"])
    assert len(runs) == 2 and "SIGUSR1 received" in runs[0].output
    assert_bit_identical(expected, out)


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_resumes_from_newest_periodic_checkpoint(
    workers: int, tmp_path: Path, mnist_dir: Path, reference
) -> None:
    options = AUG + ["--workers", str(workers)]
    expected = reference.get(options)
    root, out = tmp_path / "run", tmp_path / "w.pt"
    args = options + [
        "--every-n-steps",
        "4",
        "--keep",
        "2",
        "--kill",
        "train:10:SIGKILL",
        "--kill",
        "train:23:SIGKILL",
        "--kill-settle",
    ]
    runs = run_until_done(mnist_dir, root, out, args)
    assert [r.returncode for r in runs] == [-signal.SIGKILL, -signal.SIGKILL, 0]
    # The second attempt resumed from the newest periodic checkpoint before the kill at step 10: step
    # 8 on an idle machine, a later batch when that save fell due while the previous write still ran.
    resumed = re.search(r"\(step (\d+), periodic\)", runs[1].output)
    assert resumed is not None and 4 <= int(resumed.group(1)) < 10
    assert_bit_identical(expected, out)
    assert len(CheckpointStore(str(root / "resumable")).committed()) == 2  # keep=2


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path: Path, mnist_dir: Path, reference) -> None:
    expected = reference.get(AUG)
    root, out = tmp_path / "run", tmp_path / "w.pt"
    kills = AUG + ["--kill", "train:5", "--kill", "train:10"]
    assert [run_train(mnist_dir, root, out, kills).returncode for _ in range(2)] == [0, 0]
    store = CheckpointStore(str(root / "resumable"))
    newest, previous = store.committed()[:2]
    assert (previous.step, newest.step) == (6, 11)  # each signal lets the step in flight complete
    payload = root / "resumable" / newest.name
    payload.write_bytes(payload.read_bytes()[:1000])  # truncated, as by a full disk
    runs = run_until_done(mnist_dir, root, out, AUG)
    assert newest.name in runs[0].output and previous.name in runs[0].output  # the warning names both
    assert "step 6, preempted" in runs[0].output
    assert_bit_identical(expected, out)


def test_sigkill_in_the_middle_of_a_write_keeps_previous_checkpoint(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    store = CheckpointStore(url)
    first = store.save({"step": 1}, step=1)
    writer = textwrap.dedent(
        f"""
        import torch
        from lightning_grid.checkpoints import CheckpointStore
        print("writing", flush=True)
        CheckpointStore({url!r}).save({{"big": torch.ones(300_000_000, dtype=torch.uint8)}}, step=2)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", writer], env=child_env(), stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    deadline = time.monotonic() + 60
    while not any(
        p.name.endswith(".tmp") and p.stat().st_size > 1_000_000 for p in (tmp_path / "store").iterdir()
    ):
        assert time.monotonic() < deadline and proc.poll() is None, "the writer never got going"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    found = CheckpointStore(url).latest_valid()
    assert found is not None and found[0] == first
    CheckpointStore(url).remove_uncommitted(older_than_s=0)
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == sorted(
        [first.name, first.name + ".commit.json"]
    )


def test_sigterm_to_the_whole_process_group_spares_dataloader_workers(
    tmp_path: Path, mnist_dir: Path, reference
) -> None:
    """A machine shutting down signals every process; workers must not die under the main process."""
    options = AUG + ["--workers", "2", "--persistent", "--step-sleep", "0.02"]
    expected = reference.get(options)
    root, out = tmp_path / "run", tmp_path / "w.pt"
    proc = _start(mnist_dir, root, out, options, new_session=True)
    _wait_for_step(proc, 4)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    assert "exiting with status 0" in output
    run_until_done(mnist_dir, root, out, options)
    assert_bit_identical(expected, out)
