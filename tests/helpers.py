"""Shared helpers for tests that run real training in subprocesses."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "tests" / "scripts" / "train.py"
sys.path.insert(0, str(REPO / "examples" / "mnist"))

from synthetic_mnist import write_synthetic_mnist  # noqa: E402


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTNING_GRID_")}
    env.update(
        OMP_NUM_THREADS="1",  # two cores: processes, not threads, are the parallelism here
        MKL_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        PYTHONWARNINGS="ignore",
        CUBLAS_WORKSPACE_CONFIG=":4096:8",  # deterministic cuBLAS where a GPU is used
    )
    env.update(extra)
    return env


@dataclass
class Run:
    returncode: int
    output: str
    seconds: float


def run_train(
    data_dir: Path,
    root: Path,
    out: Path,
    args: list[str],
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> Run:
    cmd = [
        sys.executable,
        str(TRAIN),
        "--data-dir",
        str(data_dir),
        "--root",
        str(root),
        "--out",
        str(out),
        *args,
    ]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env or child_env(), capture_output=True, text=True, timeout=timeout)
    return Run(proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start)


def run_until_done(
    data_dir: Path,
    root: Path,
    out: Path,
    args: list[str],
    max_attempts: int = 8,
    env: dict[str, str] | None = None,
) -> list[Run]:
    """Relaunch the same command until it finishes, as a launcher would; every interrupted attempt
    must have exited 0 (SIGTERM) or been SIGKILLed (-9)."""
    runs: list[Run] = []
    for _ in range(max_attempts):
        run = run_train(data_dir, root, out, args, env=env)
        runs.append(run)
        if out.exists():
            assert run.returncode == 0, run.output[-3000:]
            return runs
        assert run.returncode in (0, -signal.SIGKILL), (
            f"attempt {len(runs)} exited {run.returncode}:\n{run.output[-3000:]}"
        )
    raise AssertionError(f"not finished after {max_attempts} attempts:\n{runs[-1].output[-3000:]}")


EXAMPLE = REPO / "examples" / "mnist" / "mnist.py"


def run_example(folder: Path, args: list[str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """The MNIST example run directly (no launcher), in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(EXAMPLE), *args]
    return subprocess.run(cmd, cwd=folder, env=child_env(), capture_output=True, text=True, timeout=timeout)


def grid(home: Path, *argv: str, timeout: float = 600, **env_extra: str) -> subprocess.CompletedProcess[str]:
    """``lightning-grid ARGV...`` as a user runs it, with its state under ``home``."""
    env = child_env(LIGHTNING_GRID_HOME=str(home), **env_extra)
    cmd = [sys.executable, "-m", "lightning_grid.cli", *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def grid_status(home: Path, name: str, **env_extra: str) -> dict:
    proc = grid(home, "status", name, "--json", **env_extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def max_abs_diff(a_path: Path, b_path: Path) -> float:
    a = torch.load(a_path)
    b = torch.load(b_path)
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def assert_bit_identical(a_path: Path, b_path: Path) -> None:
    a = torch.load(a_path)
    b = torch.load(b_path)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ in {different}; max |Δw| = {max_abs_diff(a_path, b_path)}"


__all__ = [
    "write_synthetic_mnist",
    "run_train",
    "run_until_done",
    "assert_bit_identical",
    "max_abs_diff",
    "child_env",
    "Run",
    "REPO",
]


def write_script(folder: Path, name: str, text: str) -> Path:
    """A small script for a test, in its own folder (the launcher captures the whole folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def unreachable_s3_store(**overrides: Any) -> Any:
    """A CheckpointStore on s3:// whose endpoint is a local port nobody listens on: every request
    fails at once (one botocore attempt, a 1 s connect timeout), so its saves stay in the spool."""
    from lightning_grid.checkpoints import CheckpointStore

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    options = {
        "key": "x",
        "secret": "y",
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
    }
    return CheckpointStore("s3://bucket/run", storage_options=options, **{"backoff_s": 0.01, **overrides})


def run_tree(command: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``command`` to its end; on a timeout, kill it with every descendant. torchrun starts its
    workers in sessions of their own: killing torchrun alone would leave them running (a hung
    collective would then outlive the test)."""
    import psutil

    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(
            f"{command[:4]}… still running after {timeout}s:\n{(out + err)[-3000:]}"
        ) from None
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


FSDP_TRAIN = REPO / "tests" / "scripts" / "fsdp_train.py"


def run_fsdp(
    ckpt: Path, out: Path, *more: str, attempt: str = "1", ok: bool = True, nproc: int = 2, **env: str
) -> str:
    """``tests/scripts/fsdp_train.py`` under torchrun on 127.0.0.1 (CPU, gloo), with ``env`` added
    to the environment: its output, once it ended with status 0 (``ok``) or not."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
        str(FSDP_TRAIN), "--out", str(out), "--ckpt-dir", str(ckpt), *more,
    ]  # fmt: skip
    proc = run_tree(command, env=child_env(LIGHTNING_GRID_ATTEMPT=attempt, **env), timeout=300)
    assert (proc.returncode == 0) == ok, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr
