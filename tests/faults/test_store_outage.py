"""An object store that goes away at the worst moment: a real S3 API (moto's server) behind a TCP
proxy on 127.0.0.1 that the test cuts and restores, and a real Lightning script under the launcher.

Before: the script spooled its checkpoint to a fixed folder and exited; the launcher crashed with a
traceback reading ``PREEMPTED.json`` and left the experiment stuck ``interrupting``; the spooled
checkpoint was never used. Now the experiment waits ``pending`` with the cause in one line, and once
the store answers again ``run --resume`` uploads the spooled checkpoint first and continues from it,
bit-identically."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.helpers import TRAIN, assert_bit_identical, child_env

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

AUG = ["--aug", "--dropout", "0.2"]


class Proxy:
    """Forwards 127.0.0.1:port to a target port; ``cut()`` drops every connection and refuses new
    ones (nothing listens), ``restore()`` listens again on the same port."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        assert self._listener is not None
        self._listener.close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


@pytest.mark.slow
def test_store_down_at_the_preemption_then_back(tmp_path: Path, mnist_dir: Path, reference) -> None:
    expected = reference.get(AUG)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    proxy = Proxy(server.get_host_and_port()[1])
    try:
        env = child_env(
            LIGHTNING_GRID_HOME=str(tmp_path / "home"),
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}",
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
            TMPDIR=str(tmp_path / "tmp"),  # the machine's private spool lives under it
            AWS_MAX_ATTEMPTS="1",  # botocore gives up at once; our own retries remain
        )
        (tmp_path / "tmp").mkdir()
        subprocess.run(
            [sys.executable, "-c", "import s3fs; s3fs.S3FileSystem().mkdir('lg-bucket')"], env=env, check=True
        )
        project = tmp_path / "project"
        project.mkdir()
        (project / "train.py").write_text(TRAIN.read_text())
        args = ["--mode", "env", "--data-dir", str(mnist_dir), "--root", "run", "--out", "weights.pt", *AUG]
        cli = [sys.executable, "-m", "lightning_grid.cli", "run"]
        launcher = subprocess.Popen(
            [*cli, "--resumable", "--name", "outage", "--artifacts", "s3://lg-bucket/grid",
             str(project / "train.py"), *args, "--announce", "--step-sleep", "0.2"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert launcher.stdout is not None
        for line in launcher.stdout:
            if line.startswith("STEP 3"):
                break
        proxy.cut()  # the store goes away, then the machine is told to go
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=240)
        assert launcher.returncode == 1, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        info = json.loads(
            subprocess.run(
                [sys.executable, "-m", "lightning_grid.cli", "status", "outage", "--json"],
                env=env, capture_output=True, text=True, check=True,
            ).stdout
        )  # fmt: skip
        assert info["status"] == "pending"
        assert [a["outcome"] for a in info["attempts"]] == ["preempted"]
        kinds = {e["kind"] for e in info["events"]}
        assert "sync_failed" in kinds and "warning" in kinds
        log1 = (tmp_path / "home" / "runs" / "outage" / "attempt-1.log").read_text()
        assert "goes up when the next run here starts" in log1, log1[-3000:]

        proxy.restore()
        resumed = subprocess.run(
            [*cli, "--resume", "outage"], env=env, capture_output=True, text=True, timeout=300
        )
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        log2 = (tmp_path / "home" / "runs" / "outage" / "attempt-2.log").read_text()
        assert "saved while s3://lg-bucket/grid/outage/checkpoints was unreachable" in log2, log2[-3000:]
        assert "resuming from" in log2
        assert_bit_identical(expected, tmp_path / "home" / "runs" / "outage" / "attempt-2" / "weights.pt")
    finally:
        with contextlib.suppress(Exception):
            proxy.cut()
        server.stop()
