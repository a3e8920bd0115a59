"""Artifact sync of an execution directory: first sync and unchanged second sync vs a plain copy.

The directory holds a few large files (checkpoints, data) and many small ones (logs, configs),
the total given by ``--sync-mb``. The plain copy is ``cp -r`` followed by ``sync`` (the upload
makes every file durable, so the copy is timed until its bytes are on disk too). Page caches are
warm for both: the source was just written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

from benchmarks.common import Row, Settings, Stat, fresh_dir, log
from lightning_grid.launcher import artifacts


def _make_execdir(folder: str, total_mb: float) -> int:
    big_share, small_files = 0.8, 200
    big_files = 4
    big = int(total_mb * 1e6 * big_share / big_files)
    small = int(total_mb * 1e6 * (1 - big_share) / small_files)
    chunk = os.urandom(1 << 20)
    written = 0
    for i in range(big_files):
        with open(os.path.join(folder, f"checkpoint-{i}.ckpt"), "wb") as handle:
            left = big
            while left > 0:
                n = min(left, len(chunk))
                handle.write(chunk[:n])
                left -= n
        written += big
    logs = os.path.join(folder, "lightning_logs", "version_0")
    os.makedirs(logs)
    for i in range(small_files):
        with open(os.path.join(logs, f"events-{i:03d}.log"), "wb") as handle:
            handle.write(os.urandom(small))
        written += small
    os.sync()
    return written


def artifact_sync(settings: Settings) -> tuple[list[Row], dict]:
    base = fresh_dir(settings.work, "sync")
    src = fresh_dir(base, "execdir")
    nbytes = _make_execdir(src, settings.sync_mb)
    copies: list[float] = []
    firsts: list[float] = []
    seconds: list[float] = []
    try:
        for rep in range(settings.reps):
            dst = os.path.join(base, "copy")
            shutil.rmtree(dst, ignore_errors=True)
            os.sync()
            start = time.monotonic()
            subprocess.run(["cp", "-r", src, dst], check=True)
            os.sync()
            copies.append(time.monotonic() - start)
            shutil.rmtree(dst, ignore_errors=True)

            store = os.path.join(base, "store")
            shutil.rmtree(store, ignore_errors=True)
            os.sync()
            first = artifacts.upload(src, store)
            second = artifacts.upload(src, store)
            if first.transferred != first.files or second.transferred != 0:
                raise RuntimeError(f"unexpected sync: {first.describe()} / {second.describe()}")
            firsts.append(first.seconds)
            seconds.append(second.seconds)
            shutil.rmtree(store, ignore_errors=True)
            log(
                f"sync rep {rep + 1}: copy {copies[-1]:.2f}s, first {firsts[-1]:.2f}s,"
                f" unchanged {seconds[-1] * 1000:.1f} ms ({nbytes / 1e6:.0f} MB)"
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    copy = Stat.of(copies)
    first_ratio = Stat.of(f / c for f, c in zip(firsts, copies))
    second_ratio = Stat.of(s / f for s, f in zip(seconds, firsts))
    rows = [
        Row(
            figure="artifact sync",
            case=f"first sync of a {nbytes / 1e6:.0f} MB execution directory (204 files)",
            unit="s",
            value=Stat.of(firsts),
            baseline=copy,
            baseline_label="cp -r + sync of the same directory",
            ratio=first_ratio,
            target="≤ 1.2 × copy",
            met=first_ratio.median <= 1.2,
        ),
        Row(
            figure="artifact sync",
            case="second sync, nothing changed",
            unit="s",
            value=Stat.of(seconds),
            baseline=Stat.of(firsts),
            baseline_label="first sync",
            ratio=second_ratio,
            target="≤ 0.05 × first",
            met=second_ratio.median <= 0.05,
        ),
    ]
    return rows, {}
