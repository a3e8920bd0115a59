"""``lightning-grid run`` end to end: real launcher processes, real scripts, real signals."""

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

from lightning_grid import Experiment, Status
from lightning_grid.cli import main
from tests.helpers import TRAIN, assert_bit_identical, child_env, grid, grid_status
from tests.helpers import write_script as _script

# A non-Lightning script made resumable through the env contract: its progress lives in the
# execution directory, which the launcher saves and restores.
COUNTER = textwrap.dedent(
    """
    import os, signal, sys, time
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    total = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    done = int(open("progress.txt").read()) if os.path.exists("progress.txt") else 0
    print(f"attempt {os.environ.get('LIGHTNING_GRID_ATTEMPT')} starts at {done}", flush=True)
    while done < total:
        time.sleep(0.1)
        done += 1
        open("progress.txt", "w").write(str(done))
        if stop:
            print(f"saved at {done}", flush=True)
            sys.exit(0)
    print("finished", done, flush=True)
    """
)
STUBBORN = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)\n"
CRASH = "import sys\nprint('boom', flush=True)\nsys.exit(3)\n"


def _launch(home: Path, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return grid(home, *argv, timeout=timeout)


def _background_run(home: Path, *argv: str, started: str | None = "starts at") -> subprocess.Popen[str]:
    """``lightning-grid run`` in the background; returns once the script printed ``started``."""
    env = child_env(LIGHTNING_GRID_HOME=str(home))
    runner = subprocess.Popen(
        [sys.executable, "-m", "lightning_grid.cli", "run", *argv],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    if started is not None:
        assert runner.stdout is not None
        for line in runner.stdout:
            if started in line:
                break
    return runner


def _status(home: Path, name: str) -> dict:
    return grid_status(home, name)


@pytest.mark.slow  # over 25 s on 2 cores: CI runs it, the default run does not
def test_three_preemptions_of_an_unmodified_lightning_script_end_bit_identical(
    tmp_path: Path, home: Path, mnist_dir: Path, reference
) -> None:
    # Six epochs of 15 steps at 0.4 s, notices at 12 s: on a loaded machine Python may spend most of
    # those 12 s importing torch, and each attempt still trains a few steps before its notice.
    options = ["--aug", "--dropout", "0.2", "--step-sleep", "0.4", "--epochs", "6"]
    expected = reference.get(options)
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text(TRAIN.read_text())
    args = ["--mode", "env", "--data-dir", str(mnist_dir), "--root", "run", "--out", "weights.pt", *options]
    proc = _launch(
        home,
        "run",
        "--use_spot",
        "--resumable",
        "--name",
        "mnist",
        "--simulate-preemptions",
        "12,12,12",
        str(project / "train.py"),
        *args,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = _status(home, "mnist")
    assert info["status"] == "succeeded" and info["restarts"] == 3
    assert [a["outcome"] for a in info["attempts"]] == ["preempted", "preempted", "preempted", "succeeded"]
    # A notice that lands while Python is still importing torch finds no handler yet: the process
    # dies of the SIGTERM (-15) and the next attempt resumes from the previous checkpoint. Every
    # other notice ends in an orderly exit 0 with a committed checkpoint.
    preempted = info["attempts"][:3]
    assert all(a["exit_code"] in (0, -15) for a in preempted) and info["attempts"][3]["exit_code"] == 0
    assert all(a["checkpoint_step"] for a in preempted if a["exit_code"] == 0)
    assert any(a["exit_code"] == 0 for a in preempted)
    final = home / "artifacts" / "mnist" / "execdir" / "files" / "weights.pt"
    assert_bit_identical(expected, final)
    # One continuous log, carried across the "machines" in the execution directory.
    assert sorted(p.name for p in (home / "runs" / "mnist" / "attempt-4" / "run" / "logs").iterdir()) == [
        "version_0"
    ]
    statuses = [e["to"] for e in info["events"] if e["to"]]
    assert statuses[:6] == ["queued", "running", "interrupting", "pending", "restoring", "running"]


def test_resumable_plain_script_and_the_report(tmp_path: Path, home: Path) -> None:
    script = _script(tmp_path / "proj", "counter.py", COUNTER)
    proc = _launch(
        home,
        "run",
        "--use-spot",
        "--resumable",
        "--name",
        "count",
        "--simulate-preemptions",
        "1.5,1.5",
        str(script),
        "40",
    )
    assert proc.returncode == 0, proc.stderr
    assert "finished 40" in proc.stdout
    info = _status(home, "count")
    assert info["status"] == "succeeded" and info["restarts"] == 2
    assert [a["outcome"] for a in info["attempts"]] == ["preempted", "preempted", "succeeded"]
    assert info["bill"]["attempts"] == 3 and info["bill"]["seconds_running"] > 0
    logs = _launch(home, "logs", "count").stdout
    assert logs.count("──── attempt") >= 3 and "attempt 2 starts at" in logs and "attempt 3 starts at" in logs
    starts = [int(line.rsplit(" ", 1)[1]) for line in logs.splitlines() if " starts at " in line]
    assert starts[0] == 0 and starts[1] > 0 and starts[2] > starts[1]  # each attempt continued the last
    listed = json.loads(_launch(home, "list", "--json").stdout)
    assert [e["name"] for e in listed] == ["count"]
    human = _launch(home, "status", "count").stdout
    assert "succeeded" in human and "bill" in human


def test_not_resumable_spot_run_fails_when_interrupted(tmp_path: Path, home: Path) -> None:
    script = _script(tmp_path / "p", "counter.py", COUNTER)
    proc = _launch(
        home, "run", "--use_spot", "--name", "nr", "--simulate-preemptions", "0.5", str(script), "50"
    )
    assert proc.returncode == 1
    info = _status(home, "nr")
    assert info["status"] == "failed" and info["reason"] == "interrupted (not resumable)"
    assert info["restarts"] == 0


@pytest.mark.parametrize("retries,attempts", [(0, 1), (2, 3)])
def test_crashes_use_their_own_budget(tmp_path: Path, home: Path, retries: int, attempts: int) -> None:
    script = _script(tmp_path / "p", "crash.py", CRASH)
    proc = _launch(
        home, "run", "--resumable", "--use_spot", "--retries", str(retries), "--retry-delay", "0", "--name", "c",
        str(script),
    )  # fmt: skip
    assert proc.returncode == 1
    info = _status(home, "c")
    assert info["status"] == "failed" and len(info["attempts"]) == attempts and info["restarts"] == 0
    assert {a["exit_code"] for a in info["attempts"]} == {3}


def test_crash_retries_back_off_and_status_says_when(tmp_path: Path, home: Path) -> None:
    """A crash waits ``--retry-delay`` before its retry (doubling each time): pending in between,
    with the retry's time in ``status --json``."""
    script = _script(tmp_path / "p", "crash.py", CRASH)
    proc = _launch(home, "run", "--retries", "2", "--retry-delay", "1", "--name", "b", str(script))
    assert proc.returncode == 1
    info = _status(home, "b")
    attempts = info["attempts"]
    assert [a["outcome"] for a in attempts] == ["failed"] * 3
    assert "boom" in attempts[0]["reason"]  # the script's own last line names the cause
    assert attempts[1]["started"] - attempts[0]["ended"] >= 1.0
    assert attempts[2]["started"] - attempts[1]["ended"] >= 2.0
    reasons = [e["reason"] for e in info["events"] if e["to"] == "pending"]
    assert reasons == ["failed; retry 1 of 2 in 1s", "failed; retry 2 of 2 in 2s"]
    retry_at = [e["data"]["retry_at"] for e in info["events"] if e["to"] == "pending"]
    assert all(r is not None for r in retry_at)
    assert info["status"] == "failed" and info["reason"] == "failed; retries=2 used"


def test_no_exit_within_grace_period_is_killed_then_resumed(tmp_path: Path, home: Path) -> None:
    folder = tmp_path / "p"
    _script(folder, "stubborn.py", STUBBORN + "")
    # Attempt 1 ignores SIGTERM; a marker file makes attempt 2 (restored execution dir) finish at once.
    script = _script(
        folder,
        "main.py",
        "import os, runpy\nif os.path.exists('ran-once'):\n    print('second attempt done')\nelse:\n"
        "    open('ran-once', 'w').close()\n    runpy.run_path('stubborn.py')\n",
    )
    start = time.monotonic()
    proc = _launch(
        home,
        "run",
        "--use_spot",
        "--resumable",
        "--grace-period",
        "1",
        "--simulate-preemptions",
        "1",
        "--name",
        "g",
        str(script),
    )
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 50  # not the 60 s the script would sleep
    info = _status(home, "g")
    assert [a["outcome"] for a in info["attempts"]] == ["killed", "succeeded"]
    assert info["attempts"][0]["exit_code"] == -signal.SIGKILL
    assert "the notice allowed" in info["attempts"][0]["reason"] and info["bill"]["steps_redone"] is None


@pytest.mark.parametrize(
    "argv,message",
    [
        (["run", "nosuchscript.py"], "script not found: nosuchscript.py"),
        (["run", "."], "is a directory"),
        (["run", "--instance_type", "p9.huge", "{script}"], "unknown instance type 'p9.huge'; valid types:"),
        (["run", "--max_restarts", "-1", "{script}"], "--max-restarts must be >= 0, got -1"),
        (
            ["run", "--artifacts", "nosuchscheme://x", "{script}"],
            "unknown or unavailable scheme 'nosuchscheme'",
        ),
        (["run", "--simulate-preemptions", "5,abc", "{script}"], "--simulate-preemptions must be seconds"),
        (["status", "ghost"], "no experiment named 'ghost'"),
        (["logs", "ghost"], "no experiment named 'ghost'"),
        (["stop", "ghost"], "no experiment named 'ghost'"),
        (["run", "--max-restarts", "many", "{script}"], "'many' is not a valid integer"),
        (["run", "--every-n-train-steps", "0", "{script}"], "--every-n-train-steps must be >= 1, got 0"),
        (["run", "--every-n-seconds", "-1", "{script}"], "--every-n-seconds must be > 0, got -1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, home: Path, capsys, argv: list[str], message: str
) -> None:
    script = _script(tmp_path / "p", "ok.py", "print('ok')\n")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code = main([a.replace("{script}", str(script)) for a in argv])
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err


def test_stop_a_running_experiment(tmp_path: Path, home: Path) -> None:
    script = _script(tmp_path / "p", "counter.py", COUNTER)
    env = child_env(LIGHTNING_GRID_HOME=str(home))
    runner = subprocess.Popen(
        [sys.executable, "-m", "lightning_grid.cli", "run", "--resumable", "--name", "s", str(script), "600"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (
            (home / "registry.db").exists()
            and _launch(home, "status", "s", "--json").returncode == 0
            and _status(home, "s")["status"] == "running"
        ):
            break
        time.sleep(0.2)
    stopped = _launch(home, "stop", "s")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    runner.wait(timeout=60)
    assert runner.returncode == 1
    info = _status(home, "s")
    assert info["status"] == "stopped" and info["attempts"][0]["outcome"] == "stopped"


def test_launcher_sigterm_leaves_pending_and_resume_continues(tmp_path: Path, home: Path) -> None:
    script = _script(tmp_path / "p", "counter.py", COUNTER)
    runner = _background_run(home, "--resumable", "--name", "r", str(script), "40")
    time.sleep(0.5)
    runner.send_signal(signal.SIGTERM)
    out, err = runner.communicate(timeout=60)
    assert runner.returncode == 1, err
    assert "run --resume r" in err
    assert _status(home, "r")["status"] == "pending"
    resumed = _launch(home, "run", "--resume", "r")
    assert resumed.returncode == 0, resumed.stderr
    assert "finished 40" in resumed.stdout
    info = _status(home, "r")
    assert info["status"] == "succeeded" and len(info["attempts"]) == 2


def test_sigkilled_launcher_leaves_no_orphan_and_resume_never_overlaps(tmp_path: Path, home: Path) -> None:
    script = _script(tmp_path / "p", "counter.py", COUNTER)
    # 10 s of counting: the script must still be running after the status call below, under load too.
    runner = _background_run(home, "--resumable", "--name", "k", str(script), "100")
    child_pid = _status(home, "k")["attempts"][0]["pid"]
    runner.kill()
    runner.wait(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the script outlived its SIGKILLed launcher")
    resumed = _launch(home, "run", "--resume", "k")
    assert resumed.returncode == 0, resumed.stderr
    info = _status(home, "k")
    assert info["status"] == "succeeded"
    first, second = info["attempts"]
    assert first["ended"] <= second["started"] and first["outcome"] == "killed"
    assert [e["to"] for e in info["events"] if e["to"]][1:] == [
        "running",
        "interrupting",
        "pending",
        "restoring",
        "running",
        "succeeded",
    ]


def test_sdk_runs_on_the_same_engine(tmp_path: Path, home: Path) -> None:
    script = _script(tmp_path / "p", "counter.py", COUNTER)
    experiment = Experiment(
        str(script),
        args=["12"],
        resumable=True,
        use_spot=True,
        simulate_preemptions=[0.6],
        name="sdk",
        echo=False,
    )
    assert experiment.run() is Status.SUCCEEDED
    assert experiment.status is Status.SUCCEEDED
    info = experiment.describe()
    assert info["restarts"] == 1 and [a["outcome"] for a in info["attempts"]] == ["preempted", "succeeded"]
    assert _status(home, "sdk")["status"] == "succeeded"


def test_two_experiments_side_by_side(tmp_path: Path, home: Path) -> None:
    script = _script(tmp_path / "p", "counter.py", COUNTER)
    env = child_env(LIGHTNING_GRID_HOME=str(home))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "lightning_grid.cli", "run", "--name", f"x{i}", str(script), "10"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert {_status(home, f"x{i}")["status"] for i in range(2)} == {"succeeded"}


def test_failure_during_an_interruption_uses_the_failure_budget(tmp_path: Path, home: Path) -> None:
    script = _script(
        tmp_path / "p",
        "bad_exit.py",
        "import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *_: sys.exit(1))\nprint('up', flush=True)\ntime.sleep(30)\n",
    )
    proc = _launch(
        home,
        "run",
        "--use_spot",
        "--resumable",
        "--retries",
        "1",
        "--retry-delay",
        "0",
        "--simulate-preemptions",
        "2.5,2.5",
        "--name",
        "bx",
        str(script),
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    info = _status(home, "bx")
    assert info["status"] == "failed" and info["failures"] == 1 and info["restarts"] == 0
    assert [a["outcome"] for a in info["attempts"]] == ["failed", "failed"]


def test_training_that_finishes_before_acting_on_the_notice_succeeds(tmp_path: Path, home: Path) -> None:
    """A notice in the last steps: the script completes training (Resumable then leaves its
    COMPLETED marker) and exits 0 before it would have saved for the SIGTERM: a success, not a crash
    of the launcher on the interrupting → succeeded transition."""
    finishing = textwrap.dedent(
        """
        import json, os, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # busy with the last steps
        print("up", flush=True)
        time.sleep(2.0)
        folder = os.environ["LIGHTNING_GRID_CHECKPOINTS"]
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "COMPLETED.json"), "w") as handle:
            json.dump({"step": 30, "time": time.time()}, handle)
        print("finished", flush=True)
        """
    )
    script = _script(tmp_path / "p", "finishing.py", finishing)
    proc = _launch(
        home,
        "run",
        "--use_spot",
        "--resumable",
        "--simulate-preemptions",
        "0.5",
        "--name",
        "fin",
        str(script),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = _status(home, "fin")
    assert info["status"] == "succeeded" and info["restarts"] == 0
    assert [a["outcome"] for a in info["attempts"]] == ["succeeded"]
    assert [e["to"] for e in info["events"] if e["to"]][-2:] == ["interrupting", "succeeded"]


def test_periodic_saves_for_a_script_that_never_imports_us(
    tmp_path: Path, home: Path, mnist_dir: Path, reference
) -> None:
    """``--every-n-train-steps`` reaches the Resumable the launcher adds: a script killed with
    SIGKILL (no notice, no chance to save) resumes from a periodic checkpoint, bit-identically."""
    from lightning_grid.checkpoints import CheckpointStore

    options = ["--aug", "--dropout", "0.2"]
    expected = reference.get(options)
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text(TRAIN.read_text())
    args = ["--mode", "env", "--data-dir", str(mnist_dir), "--root", "run", "--out", "weights.pt", *options]
    args += ["--kill", "train:10:SIGKILL", "--kill-settle"]  # the marker lives in the execution directory
    proc = _launch(
        home, "run", "--resumable", "--retries", "1", "--retry-delay", "0", "--every-n-train-steps", "4", "--name", "hard",
        str(project / "train.py"), *args,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = _status(home, "hard")
    assert [a["exit_code"] for a in info["attempts"]] == [-9, 0]
    log = (home / "runs" / "hard" / "attempt-2.log").read_text()
    resumed = re.search(r"resuming from .* \(step ([4-9]), periodic\)", log)
    assert resumed, log[-2000:]
    # The bill counts what the SIGKILL cost: the steps past the periodic checkpoint resumed from
    # (Resumable's progress note says how far attempt 1 got: the kill came at step 10).
    redone = info["attempts"][0]["steps_redone"]
    assert redone is not None and int(resumed.group(1)) + redone == 10, (resumed.group(0), redone)
    assert info["bill"]["steps_redone"] == redone
    reasons = {
        r.reason for r in CheckpointStore(str(home / "artifacts" / "hard" / "checkpoints")).committed()
    }
    assert reasons == {"periodic", "final"}  # periodic saves, then the final one when training ended
    assert_bit_identical(expected, home / "artifacts" / "hard" / "execdir" / "files" / "weights.pt")


def test_python_option_chooses_the_interpreter(tmp_path: Path, home: Path) -> None:
    """``--python`` runs the script with another interpreter (a conda env's, say); one that does not
    exist is refused at submit, in one line, with nothing written."""
    wrapper = tmp_path / "bin" / "mypython"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\necho "wrapped interpreter"\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    script = _script(tmp_path / "p", "hello.py", "import sys\nprint('hello from', sys.argv[1:])\n")
    proc = _launch(home, "run", "--python", str(wrapper), "--name", "py", str(script), "a", "b")
    assert proc.returncode == 0, proc.stderr
    assert "wrapped interpreter" in proc.stdout and "hello from ['a', 'b']" in proc.stdout
    assert _status(home, "py")["spec"]["python"] == str(wrapper)
    bad = _launch(home, "run", "--python", str(tmp_path / "nope"), "--name", "py2", str(script))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: --python {tmp_path / 'nope'}: no such interpreter on this machine"
    ]


def test_a_python_without_torch_is_refused_for_a_run_of_several_processes(tmp_path: Path, home: Path) -> None:
    """Several processes go through torchrun (and a rendezvous store) started with ``--python``: an
    interpreter without torch is the user's to fix, refused at submit in one line, nothing written,
    rather than found by each attempt and left pending."""
    bare = tmp_path / "bin" / "bare-python"
    bare.parent.mkdir()
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -I -S "$@"\n')  # no site-packages: no torch
    bare.chmod(0o755)
    script = _script(tmp_path / "p", "hello.py", "print('hello')\n")
    proc = _launch(home, "run", "--python", str(bare), "--num_nodes", "2", "--name", "bare", str(script))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert (
        lines[0].startswith(f"error: --python {bare}: cannot import torch.distributed")
        and "torch" in lines[0]
    )
    assert not (home / "registry.db").exists() and not (home / "runs").exists()
    one = _launch(
        home, "run", "--python", str(bare), "--name", "bare1", str(script)
    )  # one process: no torchrun
    assert one.returncode == 0 and "hello" in one.stdout, one.stderr
