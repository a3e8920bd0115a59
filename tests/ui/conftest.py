"""Helpers for the dashboard's tests: registries with a story in them, a real server, a real browser."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

from lightning_grid.launcher import registry as registry_module
from lightning_grid.launcher.events import Kind
from lightning_grid.launcher.experiment import Status
from lightning_grid.launcher.layout import new_id
from lightning_grid.launcher.registry import ExperimentRow, Registry
from lightning_grid.launcher.spec import Spec
from tests.helpers import REPO, child_env

CHROMIUM = "/usr/bin/chromium"
XSS = "<script>window.__pwned = 1</script>"

# A non-Lightning script that follows the env contract: its progress lives in the execution
# directory; it commits checkpoints (payload, then commit record) where the launcher says, and on
# SIGTERM saves (taking a moment, like a real checkpoint), leaves the preemption marker and exits 0.
COUNTER = textwrap.dedent(
    """
    import hashlib, json, os, signal, sys, time
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    total = int(sys.argv[1])
    ckpts = os.environ["LIGHTNING_GRID_CHECKPOINTS"]
    os.makedirs(ckpts, exist_ok=True)

    def commit(step, reason):
        name = f"ckpt-{step:010d}-{int(time.time() * 1000)}.ckpt"
        payload = bytes(1024 * step)
        with open(os.path.join(ckpts, name), "wb") as f:
            f.write(payload)
        record = {"name": name, "step": step, "sha256": hashlib.sha256(payload).hexdigest(),
                  "size": len(payload), "time": time.time(), "reason": reason, "meta": {}}
        with open(os.path.join(ckpts, name + ".commit.json"), "w") as f:
            f.write(json.dumps(record))

    done = int(open("progress.txt").read()) if os.path.exists("progress.txt") else 0
    print(f"attempt {os.environ['LIGHTNING_GRID_ATTEMPT']} starts at {done}", flush=True)
    print("<script>window.__pwned = 1</script> is only text", flush=True)
    while done < total:
        time.sleep(0.1)
        done += 1
        open("progress.txt", "w").write(str(done))
        if done % 10 == 0:
            commit(done, "periodic")
        if stop:
            time.sleep(0.3)
            commit(done, "preempted")
            with open(os.path.join(ckpts, "PREEMPTED.json"), "w") as f:
                f.write(json.dumps({"step": done}))
            print(f"saved at {done}", flush=True)
            sys.exit(0)
    with open(os.path.join(ckpts, f"ckpt-{total + 1:010d}-{int(time.time() * 1000)}.ckpt"), "wb") as f:
        f.write(b"abandoned: never committed")
    print("finished", done, flush=True)
    """
)
CRASH = "import sys\nprint('loading data', flush=True)\nprint('Traceback: boom', flush=True)\nsys.exit(3)\n"


def require(*modules: str, browser: bool = False) -> None:
    """Skip (with the reason) when the dashboard's test stack is missing; under CI=true, fail."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if browser and not os.path.exists(CHROMIUM):
        missing.append(f"{CHROMIUM} (apt-get install -y chromium)")
    if not missing:
        return
    message = f"the dashboard tests need {', '.join(missing)} (pip install -e '.[test]')"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: {message}", pytrace=False)
    pytest.skip(message)


# -- registries with a story ------------------------------------------------------------------------
class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@contextlib.contextmanager
def clock_at(clock: Clock) -> Iterator[Clock]:
    """The registry stamps events with ``time.time()``: let a test choose the times of a story."""
    with mock.patch.object(registry_module, "time", clock):
        yield clock


def fake_experiment(
    home: Path, name: str, status: Status, start: float, *, log_lines: tuple[str, ...] = ("step 1", "step 2")
) -> None:
    """An experiment left in ``status`` through the registry's own API, at chosen times: the
    in-between statuses (queued, interrupting, pending, restoring) are hard to hold a real launcher in."""
    registry = Registry(str(home))
    clock = Clock(start)
    runs = home / "runs" / name
    runs.mkdir(parents=True, exist_ok=True)
    spec = Spec(
        script="train.py", args=("--epochs", "3"), name=name, resumable=True, use_spot=True,
        instance_type="g4dn.xlarge", cloud="aws", artifacts=str(home / "artifacts"),
    )  # fmt: skip
    row = ExperimentRow(
        name=name, id=new_id(), status=Status.QUEUED, spec=spec, source_dir=str(home),
        artifacts=str(home / "artifacts" / name), created=start, updated=start,
    )  # fmt: skip
    with clock_at(clock):
        registry.create(row)
        if status is Status.QUEUED:
            return
        clock.now = start + 5
        registry.transition(name, Status.RUNNING, "attempt 1 started")
        log = runs / "attempt-1.log"
        log.write_text("\n".join(log_lines) + "\n")
        registry.start_attempt(name, 1, 999_999, str(log))
        if status is Status.RUNNING:
            return
        clock.now = start + 65
        registry.record(
            name, Kind.NOTICE, "attempt 1: notice from aws: spot interruption notice (2 minutes)", attempt=1,
            source="aws", reason="spot interruption notice (2 minutes)", window_s=120.0,
        )  # fmt: skip
        registry.transition(name, Status.INTERRUPTING, "spot interruption notice; SIGTERM sent")
        registry.update_attempt(name, 1, notice_at=clock.now)
        if status is Status.INTERRUPTING:
            return
        clock.now = start + 80
        registry.update_attempt(
            name, 1, ended=clock.now, exit_code=0, outcome="preempted",
            reason="preempted; checkpoint at step 120", checkpoint_step=120,
        )  # fmt: skip
        clock.now = start + 81
        registry.transition(name, Status.PENDING, "preempted", restarts=1)
        if status is Status.PENDING:
            return
        clock.now = start + 140
        if status is Status.RESTORING:
            registry.transition(name, Status.RESTORING, "restoring for attempt 2")
            return
        if status is Status.STOPPED:
            registry.transition(name, Status.STOPPED, "stopped by the user")
            return
    raise ValueError(f"no fake story for {status}")


def script(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def launch(home: Path, *argv: str) -> subprocess.Popen[str]:
    """``lightning-grid ARGV`` in the background, as a user's terminal would run it."""
    return subprocess.Popen(
        [sys.executable, "-m", "lightning_grid.cli", *argv],
        env=child_env(LIGHTNING_GRID_HOME=str(home)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_line(proc: subprocess.Popen[str], pattern: str, timeout: float = 30) -> re.Match[str]:
    """Read ``proc``'s stdout until a line matches; fail (with its stderr) if it exits or hangs.

    A thread reads: a selector on the pipe would miss lines already pulled into Python's buffer."""
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    stdout = proc.stdout

    def pump() -> None:
        for line in stdout:
            lines.put(line)
            if re.search(pattern, line):
                return  # the rest is left to whoever reads (or ends) the process later
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    proc.kill()
    _, err = proc.communicate(timeout=10)
    raise AssertionError(f"no line matching {pattern!r}; stdout: {''.join(seen)!r}; stderr: {err[-3000:]}")


@dataclass
class Server:
    proc: subprocess.Popen[str]
    url: str
    token: str | None


@contextlib.contextmanager
def ui_server(home: Path, *args: str) -> Iterator[Server]:
    """A real ``lightning-grid ui`` (port 0: the OS picks a free one, no race between xdist workers)."""
    proc = launch(home, "ui", "--port", "0", *args)
    try:
        match = wait_for_line(proc, r"(http://\S+?/)(?:\?token=(\S+))?(\s|$)")
        url, token = match.group(1), match.group(2)
        yield Server(proc, url, token)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn shuts down cleanly
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.communicate()


def save_screenshot(page: object, tmp_path: Path, name: str, docs: bool = False) -> Path:
    """A full-page PNG in the test's tmp dir; copies where LIGHTNING_GRID_TEST_ARTIFACTS says, and
    into docs/images when LIGHTNING_GRID_DOCS_SCREENSHOTS=1 (for the docs' own pictures)."""
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]
    target = os.environ.get("LIGHTNING_GRID_TEST_ARTIFACTS")
    if target:
        folder = Path(target) if os.path.isabs(target) else REPO / target
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / name)
    if docs and os.environ.get("LIGHTNING_GRID_DOCS_SCREENSHOTS") == "1":
        images = REPO / "docs" / "images"
        images.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, images / name)
    return path
