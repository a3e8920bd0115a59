"""Spot interruption notices from AWS, GCP and Azure metadata services.

The services are played by a small HTTP server on 127.0.0.1 that follows the providers' documented
protocols (IMDSv2 tokens with a TTL and 401 on a bad token; GCP's ``Metadata-Flavor`` header;
Azure's ``Metadata: true`` header and Scheduled Events document), and flips to "preempt" on demand.
"""

from __future__ import annotations

import email.utils
import json
import logging
import secrets
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lightning_grid.checkpoints import CheckpointStore
from lightning_grid.launcher.notices import (
    AWSSpotNotices,
    AzureScheduledEvents,
    GCPPreemptionNotices,
    cloud_notices,
)
from tests.helpers import child_env, grid, grid_status


class Metadata:
    """State of the fake metadata service, shared with the handler."""

    def __init__(self) -> None:
        self.preempt = False
        self.rebalance = False
        self.garbled = False
        self.token_ttl: dict[str, float] = {}  # token -> expiry (monotonic)
        self.token_requests = 0
        self.preempt_after: float | None = None  # monotonic time at which "preempt" turns on
        self.withdraw_after_serving = False  # the next machine gets no notice
        self.notice_window_s = 120  # AWS's two minutes between the notice and the termination

    def preempted(self) -> bool:
        return self.preempt or (self.preempt_after is not None and time.monotonic() >= self.preempt_after)


def _handler(state: Metadata) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: bytes = b"", content_type: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_PUT(self) -> None:
            if self.path != "/latest/api/token":
                return self._send(404)
            ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
            if ttl is None or not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return self._send(400)
            token = secrets.token_urlsafe(16)
            state.token_ttl[token] = time.monotonic() + int(ttl)
            state.token_requests += 1
            return self._send(200, token.encode())

        def do_GET(self) -> None:
            if self.path.startswith("/latest/meta-data/"):
                token = self.headers.get("X-aws-ec2-metadata-token", "")
                if state.token_ttl.get(token, 0) < time.monotonic():
                    return self._send(401)
                if self.path == "/latest/meta-data/spot/instance-action":
                    if state.garbled:
                        return self._send(200, b"{not json")
                    if not state.preempted():
                        return self._send(404)
                    if state.withdraw_after_serving:
                        state.preempt_after = None
                    when = time.strftime(
                        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + state.notice_window_s)
                    )
                    return self._send(
                        200, json.dumps({"action": "terminate", "time": when}).encode(), "application/json"
                    )
                if self.path == "/latest/meta-data/events/recommendations/rebalance":
                    if not state.rebalance:
                        return self._send(404)
                    return self._send(200, json.dumps({"noticeTime": "2026-11-25T12:00:00Z"}).encode())
                return self._send(404)
            if self.path == "/computeMetadata/v1/instance/preempted":
                if self.headers.get("Metadata-Flavor") != "Google":
                    return self._send(403)
                return self._send(
                    200, b"garbage" if state.garbled else (b"TRUE" if state.preempted() else b"FALSE")
                )
            if self.path.startswith("/metadata/scheduledevents"):
                if self.headers.get("Metadata") != "true":
                    return self._send(400)
                events = []
                if state.preempted():
                    not_before = email.utils.formatdate(time.time() + 30, usegmt=True)
                    events.append(
                        {
                            "EventId": "1",
                            "EventType": "Preempt",
                            "ResourceType": "VirtualMachine",
                            "NotBefore": not_before,
                        }
                    )
                return self._send(
                    200, json.dumps({"DocumentIncarnation": 1, "Events": events}).encode(), "application/json"
                )
            return self._send(404)

    return Handler


@pytest.fixture
def metadata():
    state = Metadata()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    yield state
    server.shutdown()
    server.server_close()


def test_aws_imdsv2_token_notice_and_rebalance(metadata: Metadata) -> None:
    source = AWSSpotNotices(metadata.url, interval_s=0)
    assert source.poll() is None and source.poll() is None
    assert metadata.token_requests == 1  # the token is reused while valid
    metadata.token_ttl.clear()  # revoked: the next GET is a 401, a fresh token is fetched once
    assert source.poll() is None and metadata.token_requests == 2
    metadata.rebalance = True
    assert source.poll() is None and source.early_warnings and "rebalance" in source.early_warnings[0]
    metadata.preempt = True
    notice = source.poll()
    assert notice is not None and notice.source == "aws" and "terminate" in notice.reason
    assert notice.deadline is not None and 100 < notice.deadline - time.monotonic() <= 121


def test_aws_token_is_refreshed_before_expiry(metadata: Metadata) -> None:
    source = AWSSpotNotices(metadata.url, token_ttl_s=61, interval_s=0)  # 1 s before the 60 s margin
    source.poll()
    time.sleep(1.1)
    source.poll()
    assert metadata.token_requests == 2


def test_gcp_preempted_flag(metadata: Metadata) -> None:
    source = GCPPreemptionNotices(metadata.url, interval_s=0)
    assert source.poll() is None
    metadata.preempt = True
    notice = source.poll()
    assert (
        notice is not None and notice.deadline is not None and 28 < notice.deadline - time.monotonic() <= 30
    )


def test_azure_scheduled_events(metadata: Metadata) -> None:
    source = AzureScheduledEvents(metadata.url, interval_s=0)
    assert source.poll() is None
    metadata.preempt = True
    notice = source.poll()
    assert notice is not None and "NotBefore" in notice.reason
    assert notice.deadline is not None and 25 < notice.deadline - time.monotonic() <= 31


@pytest.mark.parametrize("make", [AWSSpotNotices, GCPPreemptionNotices])
def test_garbled_answers_are_logged_once_and_never_a_preemption(metadata: Metadata, make, caplog) -> None:
    metadata.garbled = True
    source = make(metadata.url, interval_s=0)
    with caplog.at_level(logging.WARNING, logger="lightning_grid"):
        assert all(source.poll() is None for _ in range(5))
    assert len([r for r in caplog.records if "metadata" in r.getMessage()]) == 1
    metadata.garbled = False
    metadata.preempt = True
    assert source.poll() is not None  # it kept asking


def test_unreachable_service_is_not_fatal(caplog) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    source = AzureScheduledEvents(f"http://127.0.0.1:{port}", interval_s=0, timeout_s=0.2)
    with caplog.at_level(logging.WARNING, logger="lightning_grid"):
        assert source.poll() is None and source.poll() is None
    assert len(caplog.records) == 1


def test_polls_are_rate_limited(metadata: Metadata) -> None:
    source = GCPPreemptionNotices(metadata.url, interval_s=60)
    source.poll()
    metadata.preempt = True
    assert source.poll() is None  # not asked again within the interval


def test_auto_detection_finds_the_cloud_that_answers(metadata: Metadata) -> None:
    dead = "http://127.0.0.1:9"  # discard port: refused at once
    env = {
        "LIGHTNING_GRID_AWS_METADATA_URL": dead,
        "LIGHTNING_GRID_GCP_METADATA_URL": metadata.url,
        "LIGHTNING_GRID_AZURE_METADATA_URL": dead,
    }
    sources = cloud_notices("auto", environ=env)
    assert [type(s) for s in sources] == [GCPPreemptionNotices]
    assert cloud_notices("none", environ=env) == []


def test_launcher_acts_on_an_aws_notice(tmp_path: Path, metadata: Metadata) -> None:
    script = tmp_path / "proj" / "job.py"
    script.parent.mkdir()
    script.write_text(
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
        "if os.environ['LIGHTNING_GRID_ATTEMPT'] == '1':\n"
        "    time.sleep(60)\n"
        "print('done', flush=True)\n"
    )
    metadata.preempt_after = time.monotonic() + 1.0
    metadata.withdraw_after_serving = True
    home = tmp_path / "home"
    aws = {"LIGHTNING_GRID_AWS_METADATA_URL": metadata.url}
    proc = grid(
        home,
        "run",
        "--use_spot",
        "--resumable",
        "--cloud",
        "aws",
        "--name",
        "aws1",
        str(script),
        timeout=120,
        **aws,
    )
    assert proc.returncode == 0, proc.stderr
    info = grid_status(home, "aws1")
    assert [a["outcome"] for a in info["attempts"]] == ["preempted", "succeeded"]
    reasons = " ".join(e["reason"] for e in info["events"])
    assert (
        "notice from aws: spot instance terminate" in reasons
        and "after the notice" in reasons
        and "window" in reasons
    )


@pytest.mark.slow  # over 25 s on 2 cores: CI runs it, the default run does not
def test_agent_on_two_machines_resumes_bit_identical(
    tmp_path: Path, metadata: Metadata, mnist_dir: Path, reference
) -> None:
    """Machine 1 runs the script until the (fake) AWS notice, exits 75 with its checkpoint in the store;
    machine 2 starts from an empty folder, restores, and finishes identical to an uninterrupted run."""
    from tests.helpers import TRAIN, assert_bit_identical

    options = ["--aug", "--dropout", "0.2", "--step-sleep", "0.2"]
    expected = reference.get(options)
    project = tmp_path / "machine1"
    project.mkdir()
    (project / "train.py").write_text(TRAIN.read_text())
    store = f"file://{tmp_path / 'store'}"
    command = [
        "--",
        sys.executable,
        "train.py",
        "--mode",
        "env",
        "--data-dir",
        str(mnist_dir),
        "--root",
        "run",
        "--out",
        "w.pt",
        *options,
    ]
    env = child_env(LIGHTNING_GRID_AWS_METADATA_URL=metadata.url)
    agent = [
        sys.executable,
        "-m",
        "lightning_grid.cli",
        "agent",
        "--artifacts",
        store,
        "--name",
        "exp",
        "--cloud",
        "aws",
    ]

    metadata.preempt_after = time.monotonic() + 6.0
    metadata.withdraw_after_serving = True
    first = subprocess.run(
        [*agent, "--workdir", str(project), *command], env=env, capture_output=True, text=True, timeout=300
    )
    assert first.returncode == 75, first.stderr[-3000:]
    assert not (project / "w.pt").exists()

    machine2 = tmp_path / "machine2"
    second = subprocess.run(
        [*agent, "--workdir", str(machine2), *command], env=env, capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert_bit_identical(expected, machine2 / "w.pt")

    status = subprocess.run(
        [sys.executable, "-m", "lightning_grid.cli", "status", "exp", "--artifacts", store, "--json"],
        env=env,
        capture_output=True,
        text=True,
    )
    info = json.loads(status.stdout)
    assert info["status"] == "succeeded" and info["restarts"] == 1
    assert [a["outcome"] for a in info["attempts"]] == ["preempted", "succeeded"]
    assert info["attempts"][0]["synced_after_notice_s"] is not None


@pytest.mark.slow
def test_launcher_keeps_the_periodic_checkpoint_when_no_save_fits_the_notice(
    tmp_path: Path, metadata: Metadata, mnist_dir: Path, reference
) -> None:
    """Saves take ~2.5 s (a slow state gather) and the notice leaves ~4 s: a new save plus the exit
    would not fit, so the script leaves at once and the last periodic checkpoint is the resume point."""
    from tests.helpers import TRAIN, assert_bit_identical

    options = ["--aug", "--dropout", "0.2", "--max-steps", "18"]
    expected = reference.get(options)
    project = tmp_path / "proj"
    project.mkdir()
    (project / "train.py").write_text(TRAIN.read_text())
    slow = ["--every-n-steps", "6", "--slow-save", "2.5", "--step-sleep", "0.6", "--announce"]
    # The script sets its own periodic saves: Resumable(every_n_train_steps=6) in the script itself.
    args = [
        "--mode",
        "callback",
        "--data-dir",
        str(mnist_dir),
        "--root",
        "run",
        "--out",
        "w.pt",
        *options,
        *slow,
    ]
    metadata.notice_window_s = 4
    metadata.withdraw_after_serving = True
    home = tmp_path / "home"
    env = child_env(LIGHTNING_GRID_HOME=str(home), LIGHTNING_GRID_AWS_METADATA_URL=metadata.url)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "lightning_grid.cli", "run", "--use_spot", "--resumable", "--cloud", "aws"]
        + ["--name", "tight", str(project / "train.py"), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert launcher.stdout is not None
    output = []
    store = CheckpointStore(str(home / "artifacts" / "tight" / "checkpoints"))
    for line in launcher.stdout:
        output.append(line)
        if line.strip() == "STEP 7":  # the save at step 6 was cut; the next one is 6 steps away
            break
    # Its commit record (which the launcher's plan reads) is written as step 7 starts: wait for it,
    # so that the plan never depends on which of the two comes first.
    deadline = time.monotonic() + 60
    while not any(r.step == 6 for r in store.committed()) and time.monotonic() < deadline:
        time.sleep(0.05)
    metadata.preempt_after = time.monotonic()
    output.extend(launcher.stdout)
    assert launcher.wait(timeout=300) == 0, "".join(output)[-3000:]
    info = grid_status(home, "tight")
    assert [a["outcome"] for a in info["attempts"]] == ["preempted", "succeeded"]
    first = info["attempts"][0]
    assert first["checkpoint_step"] == 6 and first["steps_redone"] >= 1
    assert info["bill"]["steps_redone"] == first["steps_redone"]
    assert f"kept the checkpoint at step 6 ({first['steps_redone']} steps to redo)" in first["reason"]
    reasons = " ".join(e["reason"] for e in info["events"])
    assert "shutdown plan keep" in reasons and "the checkpoint at step 6 stays the resume point" in reasons
    assert "nothing new saved" in "".join(output)
    assert_bit_identical(expected, home / "artifacts" / "tight" / "execdir" / "files" / "w.pt")
