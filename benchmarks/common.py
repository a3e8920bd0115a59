"""What every figure shares: settings, statistics, result rows, and driving the training script."""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TRAIN = Path(__file__).resolve().with_name("train.py")


@dataclass
class Settings:
    """Sizes and repetitions; ``full``, ``quick`` and ``tiny`` presets (see ``run.py``)."""

    name: str = "full"
    reps: int = 3
    state_mb: tuple[float, ...] = (10.0, 100.0, 1000.0, 4000.0)
    profile_mb: float = 1000.0
    kill_every_n: int = 50
    resume_batches: int = 4000
    resume_positions: tuple[int, ...] = (1, 50, 99)
    throughput_steps: int = 1200
    paired_blocks: int = 21  # blocks per repetition of the paired throughput run, saves on in every other
    paired_block_steps: int = 200
    wall_steps: int = 600
    wall_k: tuple[int, ...] = (1, 3, 10)
    sync_mb: float = 1000.0
    work: str = field(default_factory=tempfile.gettempdir)


@dataclass
class Stat:
    median: float
    min: float
    max: float
    n: int
    samples: list[float]

    @classmethod
    def of(cls, samples: Iterable[float]) -> Stat:
        values = [float(v) for v in samples]
        if not values:
            return cls(float("nan"), float("nan"), float("nan"), 0, [])
        return cls(statistics.median(values), min(values), max(values), len(values), values)

    def fmt(self, digits: int = 3) -> str:
        if self.n == 0:
            return "-"
        if self.n == 1 or self.min == self.max:
            return f"{self.median:.{digits}g}"
        return f"{self.median:.{digits}g} [{self.min:.{digits}g}, {self.max:.{digits}g}]"


@dataclass
class Row:
    """One line of the report: a measured figure, what it is compared with, and the verdict."""

    figure: str
    case: str
    unit: str
    value: Stat
    baseline: Stat | None
    baseline_label: str
    ratio: Stat | None
    target: str
    met: bool | None
    notes: str = ""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        return data


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTNING_GRID_")}
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        PYTHONWARNINGS="ignore",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def train_cmd(root: str, *args: str) -> list[str]:
    return [sys.executable, str(TRAIN), "--root", root, *args]


class Proc:
    """The training script as a child: its lines, as they arrive, with arrival times."""

    def __init__(self, cmd: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        self.started = time.monotonic()
        self.popen = subprocess.Popen(
            list(cmd),
            env=env or child_env(),
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 600) -> tuple[str, float]:
        """Read lines until one matches; returns it and the time it arrived."""
        assert self.popen.stdout is not None
        deadline = time.monotonic() + timeout
        for line in self.popen.stdout:
            self.lines.append(line)
            if predicate(line):
                return line, time.monotonic()
            if time.monotonic() > deadline:
                break
        self.kill()
        raise RuntimeError(f"expected line never came; exit {self.popen.poll()}:\n{self.tail()}")

    def signal(self, sig: int) -> float:
        sent = time.monotonic()
        os.kill(self.popen.pid, sig)
        return sent

    def finish(self, timeout: float = 900) -> float:
        """Drain output, wait for the exit; returns the exit time."""
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line)
        self.popen.wait(timeout=timeout)
        return time.monotonic()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.finish()

    def tail(self, n: int = 3000) -> str:
        return "".join(self.lines)[-n:]

    def values(self, tag: str) -> list[list[str]]:
        return [line.split()[1:] for line in self.lines if line.startswith(tag + " ")]


def step_of(tag: str) -> Callable[[str], bool]:
    return lambda line: line.startswith(tag + " ")


def step_at_least(tag: str, step: int) -> Callable[[str], bool]:
    def match(line: str) -> bool:
        parts = line.split()
        return len(parts) >= 2 and parts[0] == tag and int(parts[1]) >= step

    return match


def raw_write(nbytes: int, folder: str) -> float:
    """``os.write`` + ``fsync`` of ``nbytes`` (random, 8 MiB chunks) to a new file in ``folder``."""
    chunk = os.urandom(min(max(nbytes, 1), 8 << 20))
    path = os.path.join(folder, "raw-write.bin")
    start = time.monotonic()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        written = 0
        while written < nbytes:
            written += os.write(fd, chunk[: nbytes - written])
        os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.monotonic() - start
    os.unlink(path)
    return elapsed


_HOLD_AND_WRITE = """
import sys, torch
from benchmarks.common import raw_write
held = torch.ones(int(sys.argv[1]) // 4)  # every page touched, as a trained model's state is
print(raw_write(int(sys.argv[2]), sys.argv[3]))
"""


def raw_write_holding(nbytes: int, folder: str, hold_bytes: int) -> float:
    """``raw_write`` by a fresh process that first fills ``hold_bytes`` of memory: the memory
    situation of a training process at its save.

    Why a second baseline: on a virtual machine whose host takes back the pages the guest frees
    (virtio-balloon free page reporting, as on the machine these figures were taken on), a write
    done right after a big process ended fills the page cache with the pages that process just
    freed, still backed by the host; a process that holds its state gets pages the host must back
    first. Measured there: 1 GB in 0.7–1.1 s right after a process ended, 1.6–3.9 s by a process
    holding 1 GB, the same disk, the same minutes."""
    done = subprocess.run(
        [sys.executable, "-c", _HOLD_AND_WRITE, str(hold_bytes), str(nbytes), folder],
        env=child_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return float(done.stdout.split()[-1])


def fresh_dir(parent: str, name: str) -> str:
    path = os.path.join(parent, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def checkpoint_files(root: str) -> list[Path]:
    folder = Path(root, "resumable")
    return sorted(folder.glob("*.ckpt")) if folder.is_dir() else []


def dump_json(path: str, data: Any) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2, default=str)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


SIGTERM = signal.SIGTERM
SIGKILL = signal.SIGKILL
