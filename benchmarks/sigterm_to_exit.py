"""SIGTERM → process exit for checkpoints of growing size, next to the raw cost of writing the bytes.

    python benchmarks/sigterm_to_exit.py [--widths 32,2048,16384] [--repeats 3]

Runs the test suite's training script (tiny MNIST-format data it writes itself), sends a real
SIGTERM from outside at step 4, and reports per width: checkpoint size, SIGTERM → exit (median,
min, max), and the time to write and fsync the same number of bytes, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers import TRAIN, child_env, write_synthetic_mnist  # noqa: E402


def _raw_write(nbytes: int, folder: str) -> float:
    data = os.urandom(min(nbytes, 1 << 20))
    start = time.monotonic()
    fd = os.open(os.path.join(folder, "raw.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    written = 0
    while written < nbytes:
        written += os.write(fd, data[: nbytes - written])
    os.fsync(fd)
    os.close(fd)
    return time.monotonic() - start


def _one(width: int, data: str, work: str) -> tuple[float, int]:
    root = tempfile.mkdtemp(dir=work)
    cmd = [
        sys.executable,
        str(TRAIN),
        "--data-dir",
        data,
        "--root",
        root,
        "--out",
        os.path.join(root, "w.pt"),
    ]
    cmd += ["--announce", "--wide", str(width), "--step-sleep", "0.05", "--logger", "none"]
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("STEP 4"):
            break
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=600)
    elapsed = time.monotonic() - sent
    if proc.returncode != 0:
        raise SystemExit(f"width {width}: exit {proc.returncode}")
    ckpt = next(p for p in Path(root, "resumable").iterdir() if p.name.endswith(".ckpt"))
    return elapsed, ckpt.stat().st_size


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--widths", default="32,2048,16384")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        data = os.path.join(work, "data")
        write_synthetic_mnist(data, n_train=480, n_test=64)
        print("| width | checkpoint MB | SIGTERM→exit s (median [min, max]) | raw write+fsync s | ratio |")
        print("|---|---|---|---|---|")
        for width in (int(w) for w in args.widths.split(",")):
            runs = [_one(width, data, work) for _ in range(args.repeats)]
            times = [t for t, _ in runs]
            size = runs[0][1]
            raw = statistics.median(_raw_write(size, work) for _ in range(args.repeats))
            med = statistics.median(times)
            print(
                f"| {width} | {size / 1e6:.1f} | {med:.2f} [{min(times):.2f}, {max(times):.2f}] | {raw:.3f} | {med / max(raw, 1e-9):.1f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
