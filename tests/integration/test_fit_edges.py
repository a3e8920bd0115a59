"""Interruptions at the edges of ``fit()`` (issue 14), each with real subprocesses and real SIGTERMs.

A notice anywhere before the process is gone is an interruption: it leaves a ``PREEMPTED`` marker
and the process exits 0; ``COMPLETED`` means the script finished with no notice. A relaunch after
``fit()`` restores the final state, trains nothing, and runs the code after ``fit()`` on it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import REPO, assert_bit_identical, child_env

EDGES = REPO / "tests" / "scripts" / "edges.py"
CLI = REPO / "tests" / "scripts" / "cli_train.py"
FINAL_STEP = 24  # 2 epochs of 96 samples in batches of 8


def _edges(root: Path, out: Path, *args: str, mode: str = "callback") -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(EDGES), "--mode", mode, "--root", str(root), "--out", str(out), *args]
    return subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)


def _output(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def _marker(root: Path, name: str) -> dict[str, Any] | None:
    path = root / "resumable" / name
    return json.loads(path.read_text()) if path.exists() else None


def _steps(proc: subprocess.CompletedProcess[str]) -> int:
    return sum(line.startswith("STEP ") for line in proc.stdout.splitlines())


def _reference(tmp_path: Path, *args: str) -> tuple[Path, dict[str, Any]]:
    out = tmp_path / "reference.pt"
    proc = _edges(tmp_path / "reference", out, *args, mode="plain")
    assert proc.returncode == 0, _output(proc)[-3000:]
    return out, json.loads(Path(str(out) + ".json").read_text())


def _assert_preempted_after_fit(root: Path, proc: subprocess.CompletedProcess[str], out: Path) -> None:
    """Exit 0, the script's last lines never ran, and the launcher would count a preemption with 0
    steps redone (its marker names the final checkpoint)."""
    assert proc.returncode == 0, _output(proc)[-3000:]
    assert "SCRIPT DONE" not in proc.stdout and not out.exists()
    marker = _marker(root, "PREEMPTED.json")
    assert marker is not None, _output(proc)[-3000:]
    assert marker["step"] == marker["left_at"] == FINAL_STEP
    assert (root / "resumable" / marker["checkpoint"]).exists()


def _assert_finished_without_training(
    root: Path, proc: subprocess.CompletedProcess[str], out: Path, reference: Path, expected: dict[str, Any]
) -> None:
    assert proc.returncode == 0, _output(proc)[-3000:]
    assert _steps(proc) == 0, "a finished fit must not train again"
    assert "no training is redone" in _output(proc)
    assert_bit_identical(reference, out)
    assert json.loads(Path(str(out) + ".json").read_text()) == expected  # test metrics, RNG draw
    assert _marker(root, "PREEMPTED.json") is None
    assert _marker(root, "COMPLETED.json") == {
        "step": FINAL_STEP,
        "time": pytest.approx(time.time(), abs=600),
    }


@pytest.mark.slow
def test_stateful_iterable_dataset_resumes_at_the_last_trained_batch(tmp_path: Path) -> None:
    """Issue 14.1: Lightning's fetcher has prefetched a batch when the checkpoint is cut; the saved
    loader position must be the last batch trained, or the resumed run skips one."""
    reference, expected = _reference(tmp_path, "--data", "iterable")
    root, out = tmp_path / "run", tmp_path / "w.pt"
    first = _edges(root, out, "--data", "iterable", "--kill", "train:5")
    assert first.returncode == 0 and not out.exists(), _output(first)[-3000:]
    assert _marker(root, "PREEMPTED.json")["step"] == 6
    second = _edges(root, out, "--data", "iterable")
    assert second.returncode == 0, _output(second)[-3000:]
    assert _steps(second) == FINAL_STEP - 6
    assert json.loads(Path(str(out) + ".json").read_text())["global_step"] == expected["global_step"]
    assert_bit_identical(reference, out)


def test_sigterms_until_the_process_is_gone_change_nothing(tmp_path: Path) -> None:
    """Issue 14.2: a machine going down signals again and again; from the first SIGTERM until the
    process is gone (interpreter shutdown included) the others change nothing, and it exits 0."""
    root, out = tmp_path / "run", tmp_path / "w.pt"
    cmd = [
        sys.executable,
        str(EDGES),
        "--root",
        str(root),
        "--out",
        str(out),
        "--sleep",
        "0.05",
        "--epochs",
        "3",
    ]
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("STEP 4"):
            break
    else:
        raise AssertionError("".join(seen[-40:]))
    sent = 0
    while proc.poll() is None:  # one every ~20 ms, until the process is gone
        try:
            os.kill(proc.pid, signal.SIGTERM)
            sent += 1
        except ProcessLookupError:
            break
        time.sleep(0.02)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, f"exit {proc.returncode} after {sent} SIGTERMs:\n{rest[-3000:]}"
    assert sent >= 2
    marker = _marker(root, "PREEMPTED.json")
    assert marker is not None and marker["step"] == marker["left_at"]
    assert _marker(root, "COMPLETED.json") is None


@pytest.mark.slow
def test_notice_during_test_after_fit_is_a_preemption_and_the_relaunch_only_tests(tmp_path: Path) -> None:
    """Issue 14.3: ``trainer.test()`` after ``fit()`` (Lightning's bug_report_model.py) interrupted:
    not a success; the relaunch restores the trained state, trains nothing and tests it."""
    reference, expected = _reference(tmp_path, "--after", "test")
    root, out = tmp_path / "run", tmp_path / "w.pt"
    first = _edges(root, out, "--after", "test", "--kill", "test:1")
    _assert_preempted_after_fit(root, first, out)
    assert _marker(root, "COMPLETED.json") is None
    second = _edges(root, out, "--after", "test")
    _assert_finished_without_training(root, second, out, reference, expected)


@pytest.mark.slow
def test_notice_in_the_scripts_own_code_after_fit_is_a_preemption(tmp_path: Path) -> None:
    """Issue 14.4: after fit(), the script's post-processing gets the notice: exit 0 with the final
    checkpoint named (0 steps redone), and the relaunch runs the post-processing on the final weights."""
    reference, expected = _reference(tmp_path, "--after", "both")
    root, out = tmp_path / "run", tmp_path / "w.pt"
    first = _edges(root, out, "--after", "both", "--kill", "post:2")
    _assert_preempted_after_fit(root, first, out)
    second = _edges(root, out, "--after", "both")
    _assert_finished_without_training(root, second, out, reference, expected)


@pytest.mark.parametrize(
    "kill",
    [
        "train:5",
        pytest.param("train:23", marks=pytest.mark.slow),
        pytest.param("post:2", marks=pytest.mark.slow),
    ],
)
def test_a_preempted_process_skips_c_exit_handlers_and_keeps_status_0(tmp_path: Path, kill: str) -> None:
    """Leaving after the checkpoint (in fit, and in the script's code after it) ends the process at
    C's exit: a C handler registered earlier (standing for libtorch's static destructors) aborts
    the process if it ever runs. Without the fast exit it does, so the check can fail."""
    out = tmp_path / "w.pt"
    runs, probes = {}, {}
    for name, extra in (("fast", ()), ("slow", ("--no-fast-exit",))):
        probes[name] = tmp_path / f"{name}-probes"
        probes[name].mkdir()
        runs[name] = _edges(
            tmp_path / name, out, "--after", "post", "--kill", kill, "--c-exit-abort", *extra,
            "--exit-probes", str(probes[name]),
        )  # fmt: skip
        assert _marker(tmp_path / name, "PREEMPTED.json") is not None  # durable before the exit
        assert (probes[name] / "global-file").read_text() == "a line still in the buffer\n"
    assert runs["fast"].returncode == 0, _output(runs["fast"])[-3000:]
    assert "exiting with status 0" in _output(runs["fast"])
    # Preempted reached the top of the script: the process ended before module teardown (no
    # __del__ of the global), after flushing the script's open global file.
    assert not (probes["fast"] / "teardown").exists()
    # The usual exit: teardown, then C's handlers (the abort).
    assert runs["slow"].returncode == -signal.SIGABRT, _output(runs["slow"])[-3000:]
    assert (probes["slow"] / "teardown").read_text() == "ran"


@pytest.mark.slow
def test_running_a_finished_command_again_trains_nothing(tmp_path: Path) -> None:
    """Issue 14.5: the same command after it finished restores the final state and says so."""
    reference, expected = _reference(tmp_path, "--after", "test")
    root, out = tmp_path / "run", tmp_path / "w.pt"
    first = _edges(root, out, "--after", "test")
    assert first.returncode == 0 and _steps(first) == FINAL_STEP, _output(first)[-3000:]
    assert _marker(root, "COMPLETED.json")["step"] == FINAL_STEP
    assert _marker(root, "PREEMPTED.json") is None
    out.unlink()
    again = _edges(root, out, "--after", "test")
    _assert_finished_without_training(root, again, out, reference, expected)


def _cli(folder: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The LightningCLI script as the launcher runs it: in its (restored) execution directory, with
    the contract variables set and no lightning_grid import in the script."""
    variables = child_env(
        LIGHTNING_GRID_RESUMABLE="1", LIGHTNING_GRID_CHECKPOINTS=str(folder / "checkpoints"), **env
    )
    cmd = [
        sys.executable,
        str(CLI),
        "fit",
        "--trainer.max_epochs",
        "2",
        "--trainer.enable_progress_bar",
        "false",
    ]
    return subprocess.run(
        [*cmd, *args], cwd=folder, env=variables, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
@pytest.mark.parametrize("logger", ["false", "true"])
def test_lightning_cli_script_resumes_and_a_changed_config_is_still_refused(
    tmp_path: Path, logger: str
) -> None:
    """Issue 14.6: LightningCLI's SaveConfigCallback finds the first attempt's config.yaml in the
    directory the relaunch continues; the same config is the same run, not a previous one."""
    folder = tmp_path / "exec"
    folder.mkdir()
    args = ["--trainer.logger", logger]
    plain = tmp_path / "plain"
    plain.mkdir()
    reference = _cli(plain, *args, EDGES_OUT=str(tmp_path / "reference.pt"))
    assert reference.returncode == 0, _output(reference)[-3000:]
    first = _cli(folder, *args, EDGES_KILL_AT_STEP="5", EDGES_KILL_MARKER=str(tmp_path / "killed"))
    assert first.returncode == 0 and "SCRIPT DONE" not in first.stdout, _output(first)[-3000:]
    assert json.loads((folder / "checkpoints" / "PREEMPTED.json").read_text())["step"] == 6
    second = _cli(folder, *args, EDGES_OUT=str(tmp_path / "w.pt"))
    assert second.returncode == 0, _output(second)[-3000:]
    assert _steps(second) == FINAL_STEP - 6
    assert_bit_identical(tmp_path / "reference.pt", tmp_path / "w.pt")
    if logger == "false":
        # A different config in the same directory is another run: LightningCLI's refusal stands.
        changed = _cli(folder, *args, "--model.lr", "0.2")
        assert changed.returncode != 0
        assert "SaveConfigCallback expected" in _output(changed)
        assert torch.load(tmp_path / "w.pt").keys()  # the finished run's outputs are untouched
