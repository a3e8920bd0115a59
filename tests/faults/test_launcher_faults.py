"""The launcher under the faults spot machines really have: a notice that stands, a launcher killed
with SIGKILL, children that outlive their script, a store shared by two registries, checkpoints
deleted behind its back, a store that fails before a script starts, a corrupt registry.

Real processes, real signals, a real metadata server on 127.0.0.1; the engine runs in-process
where that is enough (it is the same code the CLI calls), the CLI in a subprocess where the
launcher itself must die."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from lightning_grid.errors import UsageError
from lightning_grid.launcher import artifacts
from lightning_grid.launcher.engine import Engine
from lightning_grid.launcher.experiment import Status
from lightning_grid.launcher.registry import Registry
from lightning_grid.launcher.spec import Spec
from tests.faults.conftest import MountTmpfs  # noqa: F401
from tests.helpers import REPO, child_env
from tests.helpers import write_script as _script
from tests.integration.test_cloud_notices import Metadata, metadata  # noqa: F401 - the fixture

CONTRACT_SCRIPT = REPO / "tests" / "scripts" / "contract_script.py"


def _wait_for(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_one_cloud_notice_is_one_preemption(tmp_path: Path, metadata: Metadata, monkeypatch) -> None:  # noqa: F811
    """The machine's notice stands for a few seconds after the first attempt saved: the launcher
    waits in pending instead of relaunching into the same notice (before: 21 attempts in 3 s,
    max_restarts reached, failed)."""
    monkeypatch.setenv("LIGHTNING_GRID_AWS_METADATA_URL", metadata.url)
    script = _script(
        tmp_path / "src",
        "job.py",
        """
        import os, signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        if os.environ["LIGHTNING_GRID_ATTEMPT"] == "1":
            time.sleep(60)
        print("done", flush=True)
        """,
    )
    metadata.preempt = True
    threading.Timer(5.0, lambda: setattr(metadata, "preempt", False)).start()
    engine = Engine(str(tmp_path / "home"), echo=False)
    engine.submit(Spec(script=str(script), name="aws", use_spot=True, resumable=True, cloud="aws"))
    row = engine.run("aws")
    assert row.status is Status.SUCCEEDED, row.reason
    assert row.restarts == 1
    assert [a.outcome for a in engine.registry.attempts("aws")] == ["preempted", "succeeded"]
    notes = [e.reason for e in engine.registry.events("aws")]
    assert any("interruption notice still stands" in n for n in notes)
    assert any("withdrawn" in n for n in notes)


def _launcher(home: Path, *argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "lightning_grid.cli", "run", *argv],
        env=child_env(LIGHTNING_GRID_HOME=str(home)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _attempt_pid(home: Path, name: str, number: int = 1) -> int:
    registry = Registry(str(home))

    def started() -> bool:
        try:
            attempts = registry.attempts(name)
        except Exception:
            return False
        return len(attempts) >= number and attempts[number - 1].pid is not None

    _wait_for(started, what=f"attempt {number} of {name}")
    pid = registry.attempts(name)[number - 1].pid
    assert pid is not None
    return pid


@pytest.mark.slow
def test_stop_ends_the_script_of_a_killed_launcher(tmp_path: Path) -> None:
    """Before: ``stop`` said "stopped" and the script (which ignores SIGTERM) ran on with ppid 1."""
    home = tmp_path / "home"
    script = _script(
        tmp_path / "src",
        "stubborn.py",
        """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open("started", "w").close()
        time.sleep(120)
        """,
    )
    launcher = _launcher(home, "--name", "k", "--grace-period", "2", str(script))
    pid = _attempt_pid(home, "k")
    _wait_for(lambda: (home / "runs" / "k" / "attempt-1" / "started").exists(), what="the script")
    launcher.kill()
    launcher.wait(timeout=30)
    assert not _gone(pid), "the script ignores SIGTERM: it must still be running here"
    row = Engine(str(home), echo=False).stop("k")
    assert row.status is Status.STOPPED
    _wait_for(lambda: _gone(pid), timeout=30, what="the orphaned script to end")


def test_children_that_leave_the_process_group_are_killed_when_the_attempt_ends(tmp_path: Path) -> None:
    """Before: a child that called setsid() survived a normal end of its experiment."""
    script = _script(
        tmp_path / "src",
        "daemon.py",
        """
        import subprocess, sys
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True
        )
        open("child.pid", "w").write(str(child.pid))
        print("leaving a daemon behind", flush=True)
        """,
    )
    engine = Engine(str(tmp_path / "home"), echo=False)
    engine.submit(Spec(script=str(script), name="d"))
    assert engine.run("d").status is Status.SUCCEEDED
    child = int((tmp_path / "home" / "runs" / "d" / "attempt-1" / "child.pid").read_text())
    _wait_for(lambda: _gone(child), timeout=10, what="the daemonised child to be killed")
    assert any("outlived it" in e.reason for e in engine.registry.events("d"))


@pytest.mark.slow
def test_resume_after_a_launcher_death_ends_children_that_ignore_sigterm(tmp_path: Path) -> None:
    """Before: only the attempt's own pid was waited for; a child ignoring SIGTERM ran on beside
    the resumed attempt."""
    home = tmp_path / "home"
    script = _script(
        tmp_path / "src",
        "parent.py",
        """
        import os, signal, subprocess, sys, time
        if os.environ["LIGHTNING_GRID_ATTEMPT"] != "1":
            sys.exit(0)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"])
        open("child.pid", "w").write(str(child.pid))
        time.sleep(120)
        """,
    )
    launcher = _launcher(home, "--name", "c", "--resumable", "--grace-period", "5", str(script))
    _attempt_pid(home, "c")
    pid_file = home / "runs" / "c" / "attempt-1" / "child.pid"
    _wait_for(lambda: pid_file.exists() and pid_file.read_text(), what="the child")
    child = int(pid_file.read_text())
    launcher.kill()
    launcher.wait(timeout=30)
    time.sleep(0.5)
    assert not _gone(child), "the child ignores SIGTERM: it must still be running here"
    row = Engine(str(home), echo=False).run("c")
    assert row.status is Status.SUCCEEDED, row.reason
    assert _gone(child)


def test_two_registries_cannot_share_one_experiment_folder(tmp_path: Path) -> None:
    """Before: the second experiment of the same name silently resumed from the first one's
    checkpoints and overwrote its execution directory at submit."""
    store = tmp_path / "store"
    first_src = _script(tmp_path / "a", "train.py", "print('first')\n")
    second_src = _script(tmp_path / "b", "train.py", "print('second')\n")
    Engine(str(tmp_path / "home1"), echo=False).submit(
        Spec(script=str(first_src), name="exp", artifacts=str(store))
    )
    manifest = (store / "exp" / "execdir" / "manifest.json").read_bytes()
    second = Engine(str(tmp_path / "home2"), echo=False)
    with pytest.raises(UsageError, match="already holds another experiment named 'exp'"):
        second.submit(Spec(script=str(second_src), name="exp", artifacts=str(store)))
    assert (store / "exp" / "execdir" / "manifest.json").read_bytes() == manifest
    artifacts.restore(str(store / "exp" / "execdir"), str(tmp_path / "restored"))
    assert (tmp_path / "restored" / "train.py").read_text() == "print('first')\n"
    assert not second.registry.exists("exp")
    assert not (tmp_path / "home2" / "locks" / "exp.lock").exists()


def test_checkpoints_deleted_between_attempts_are_counted_and_a_failed_run_can_be_resumed(
    tmp_path: Path, monkeypatch
) -> None:
    """Attempt 1 is preempted with a checkpoint and fails on its budget (max_restarts=0); the user
    deletes the checkpoint folder, then resumes the failed experiment (before: refused). The
    relaunch starts from zero, says why, and the bill counts the lost steps (before: 0 redone)."""
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(CONTRACT_SCRIPT, source / "s.py")
    engine = Engine(str(tmp_path / "home"), echo=False)
    row = engine.submit(
        Spec(
            script=str(source / "s.py"),
            args=("preempt",),
            name="gone",
            resumable=True,
            use_spot=True,
            simulate_preemptions=(1.5,),
            max_restarts=0,
        )  # fmt: skip
    )
    failed = engine.run("gone")
    assert failed.status is Status.FAILED and "max_restarts=0" in failed.reason
    step = engine.registry.attempts("gone")[0].checkpoint_step
    assert step is not None and step > 0
    shutil.rmtree(row.layout.checkpoints)
    resumed = engine.run("gone")
    assert resumed.status is Status.SUCCEEDED, resumed.reason
    attempts = engine.registry.attempts("gone")
    assert attempts[1].steps_redone == step
    assert any(f"checkpoint at step {step} is gone" in e.reason for e in engine.registry.events("gone"))


def test_a_store_that_fails_before_the_script_starts_leaves_the_experiment_pending(tmp_path: Path) -> None:
    """Before: a traceback and an experiment stuck in a live status. Now: pending with a one-line
    reason naming the store; once it is repaired, ``run --resume`` continues."""
    script = _script(tmp_path / "src", "ok.py", "print('ran')\n")
    engine = Engine(str(tmp_path / "home"), echo=False)
    row = engine.submit(Spec(script=str(script), name="s"))
    manifest = Path(row.layout.execdir) / "manifest.json"
    saved = manifest.read_bytes()
    manifest.unlink()
    manifest.mkdir()  # unreadable as a manifest: the restore fails before anything starts
    pending = engine.run("s")
    assert pending.status is Status.PENDING
    assert "store unreachable or unwritable" in pending.reason and row.layout.base in pending.reason
    assert engine.registry.attempts("s") == []
    manifest.rmdir()
    manifest.write_bytes(saved)
    assert engine.run("s").status is Status.SUCCEEDED


@pytest.mark.parametrize("verb", [["list"], ["status", "x"], ["logs", "x"], ["stop", "x"]])
def test_a_corrupt_registry_is_one_line_from_every_verb(tmp_path: Path, verb: list[str]) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "registry.db").write_bytes(b"not a database at all" * 200)
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_grid.cli", *verb],
        env=child_env(LIGHTNING_GRID_HOME=str(home)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "registry corrupt" in lines[0] and "Traceback" not in proc.stderr


def test_an_unreachable_object_store_at_submit_is_one_line(tmp_path: Path) -> None:
    """Before: a 150-line botocore traceback. Now: one line naming the store, exit 2, nothing kept."""
    pytest.importorskip("s3fs")
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = _script(tmp_path / "src", "ok.py", "print('ran')\n")
    home = tmp_path / "home"
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_grid.cli", "run", "--name", "s3", "--artifacts", "s3://lg-bucket/grid",
         str(script)],
        env=child_env(
            LIGHTNING_GRID_HOME=str(home), AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
            AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
            AWS_MAX_ATTEMPTS="1",
        ),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot use the artifact store s3://lg-bucket/grid" in lines[0], proc.stderr
    assert not Registry(str(home)).exists("s3")
    assert not (home / "locks" / "s3.lock").exists()


def test_the_launchers_log_follower_copies_in_bounded_chunks(tmp_path: Path) -> None:
    """Before: everything a script wrote since the last poll was read in one piece (231 MB of RSS
    while a script wrote 200 MB quickly). Now the copy holds at most a few MiB at once."""
    import io
    import tracemalloc

    from lightning_grid.launcher.supervisor import _Follower

    log = tmp_path / "attempt.log"
    with open(log, "wb") as handle:
        for _ in range(64):
            handle.write(os.urandom(1 << 20))
    sink = io.RawIOBase()
    written = []
    sink.write = lambda data: written.append(len(data)) or len(data)  # type: ignore[method-assign]
    follower = _Follower(str(log), 0, sink)  # type: ignore[arg-type]
    tracemalloc.start()
    follower._drain()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert sum(written) == 64 << 20 and follower.offset == 64 << 20
    assert peak < 8 << 20, f"peak {peak / 1e6:.0f} MB"


def test_a_crashed_experiment_continues_from_what_it_saved_when_the_user_resumes_it(tmp_path: Path) -> None:
    """Before: ``run --resume`` refused a failed experiment, so the work it had saved (periodic
    checkpoints, its execution directory) could never be continued."""
    home = tmp_path / "home"
    script = _script(
        tmp_path / "src",
        "flaky.py",
        """
        import os, sys
        done = int(open("progress.txt").read()) if os.path.exists("progress.txt") else 0
        print(f"starts at {done}", flush=True)
        for step in range(done, 10):
            open("progress.txt", "w").write(str(step + 1))
            if step == 4 and not os.path.exists("fixed"):
                open("fixed", "w").close()
                sys.exit("a transient failure at step 5")
        print("finished", flush=True)
        """,
    )
    env = child_env(LIGHTNING_GRID_HOME=str(home))
    cli = [sys.executable, "-m", "lightning_grid.cli", "run"]
    first = subprocess.run(
        [*cli, "--name", "f", str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    assert first.returncode == 1
    row = Registry(str(home)).get("f")
    assert (
        row.status is Status.FAILED
        and "a transient failure at step 5" in Registry(str(home)).attempts("f")[0].reason
    )
    again = subprocess.run([*cli, "--resume", "f"], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "starts at 5" in again.stdout and "finished" in again.stdout
    assert Registry(str(home)).get("f").status is Status.SUCCEEDED


def test_the_home_is_private(tmp_path: Path) -> None:
    """Before: the home, the registry (which holds script arguments) and logs were world-readable
    under the default umask. Now the home is 0700, also one an older version left 0755."""
    fresh = tmp_path / "fresh"
    Registry(str(fresh))
    assert fresh.stat().st_mode & 0o777 == 0o700
    old = tmp_path / "old"
    old.mkdir(mode=0o755)
    old.chmod(0o755)
    Registry(str(old))
    assert old.stat().st_mode & 0o777 == 0o700


def test_the_registrys_disk_filling_up_is_one_line_and_resume_continues(tmp_path: Path, small_tmpfs) -> None:
    """The home (registry and logs) on a 6 MB filesystem that the script's own output fills. Before:
    a traceback and an experiment stuck ``running``. Now: one line naming the registry and the full
    disk, no process left, and once space is freed ``run --resume`` continues."""
    home = small_tmpfs(size="6m", name="home")
    script = _script(
        tmp_path / "src",
        "chatty.py",
        """
        import os, sys
        if os.environ["LIGHTNING_GRID_ATTEMPT"] == "1":
            line = "x" * 1023 + "\\n"
            try:
                for _ in range(20_000):  # 20 MB into a 6 MB filesystem
                    sys.stdout.write(line)
            except OSError:
                pass
            sys.exit(0)
        print("second attempt: done", flush=True)
        """,
    )
    env = child_env(LIGHTNING_GRID_HOME=str(home))
    cli = [sys.executable, "-m", "lightning_grid.cli", "run"]
    first = subprocess.run(
        [*cli, "--name", "full", "--resumable", str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [ln for ln in first.stderr.strip().splitlines() if ln.startswith("error:")]
    assert first.returncode == 1 and "Traceback" not in first.stderr, first.stderr[-2000:]
    assert len(lines) == 1 and "registry" in lines[0] and "no space left" in lines[0], first.stderr[-2000:]
    for log in (home / "runs" / "full").glob("attempt-*.log"):
        log.unlink()  # the user frees space
    again = subprocess.run([*cli, "--resume", "full"], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "second attempt: done" in again.stdout
    assert Registry(str(home)).get("full").status is Status.SUCCEEDED


@pytest.mark.slow
def test_a_read_only_checkpoint_folder_is_one_line_and_resume_continues(
    tmp_path: Path, mnist_dir: Path, monkeypatch
) -> None:
    """Before: a launcher traceback and an experiment stuck ``running`` with 0 attempts. Now the
    launcher finds it before starting the script (clearing the attempt's markers): ``pending``, the
    cause and the path in one line, nothing ran; once the folder is writable again, ``run --resume``
    trains. (A folder that goes read-only later fails the script at its set-up: see
    test_checkpoint_store_faults.)"""
    from tests.faults.conftest import _mount, _umount
    from tests.helpers import TRAIN

    for key, value in child_env().items():
        monkeypatch.setenv(key, value)
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text(TRAIN.read_text())
    args = ("--mode", "env", "--data-dir", str(mnist_dir), "--root", "run", "--out", "w.pt", "--epochs", "1")
    engine = Engine(str(tmp_path / "home"), echo=False)
    row = engine.submit(
        Spec(
            script=str(project / "train.py"),
            args=args,
            name="ro",
            resumable=True,
            artifacts=str(tmp_path / "s"),
        )
    )
    checkpoints = Path(row.layout.checkpoints)
    checkpoints.mkdir(parents=True)
    why = _mount(["--bind", str(checkpoints), str(checkpoints)])
    if why is not None:
        pytest.skip(f"cannot bind-mount here (needs root/CAP_SYS_ADMIN): {why}")
    try:
        why = _mount(["-o", "remount,bind,ro", str(checkpoints)])
        if why is not None:
            pytest.skip(f"cannot remount read-only here: {why}")
        failed = engine.run("ro")
    finally:
        _umount(checkpoints)
    assert failed.status is Status.PENDING and engine.registry.attempts("ro") == []
    assert "read-only file system" in failed.reason.lower() and str(checkpoints) in failed.reason
    assert engine.run("ro").status is Status.SUCCEEDED
    assert (tmp_path / "home" / "runs" / "ro" / "attempt-1" / "w.pt").exists()  # nothing ran before
