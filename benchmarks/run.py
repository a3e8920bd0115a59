"""Run every benchmark in one go and write the report (``python -m benchmarks`` or ``python benchmarks/run.py``).

    python -m benchmarks                       # full suite, about 30 minutes on 2 cores
    python -m benchmarks --quick               # every figure at small sizes, about a minute
    python -m benchmarks --only sigterm,sync   # some figures
    python -m benchmarks --out DIR --reps 5

Writes ``results.json``, ``results.md`` and PNG plots to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import exit_profile, preemption, resume, sync, throughput, wall  # noqa: E402
from benchmarks.common import Row, Settings, Stat, log  # noqa: E402
from benchmarks.report import write  # noqa: E402

Figure = Callable[[Settings], tuple[list[Row], dict]]
FIGURES: dict[str, Figure] = {
    "sigterm": preemption.sigterm_to_exit,
    "sigterm-gpu": preemption.sigterm_to_exit_gpu,
    "profile": exit_profile.exit_breakdown,
    "sigkill": preemption.steps_lost_sigkill,
    "resume": resume.resume_overhead,
    "throughput": throughput.throughput,
    "wall": wall.preemption_wall_time,
    "sync": sync.artifact_sync,
}

PRESETS = {
    "full": Settings(),
    "quick": Settings(
        name="quick", reps=1, state_mb=(10.0,), profile_mb=10.0, kill_every_n=20, resume_batches=400,
        throughput_steps=150, paired_blocks=5, paired_block_steps=100, wall_steps=120, wall_k=(1,), sync_mb=50.0,
    ),
    "tiny": Settings(
        name="tiny", reps=1, state_mb=(2.0,), profile_mb=2.0, kill_every_n=10, resume_batches=100, resume_positions=(1, 99),
        throughput_steps=40, paired_blocks=3, paired_block_steps=50, wall_steps=60, wall_k=(1,), sync_mb=5.0,
    ),
}  # fmt: skip


def default_figures() -> list[str]:
    """Every figure; the GPU one only where CUDA is there to measure it."""
    import torch

    return [name for name in FIGURES if name != "sigterm-gpu" or torch.cuda.is_available()]


def _failed(name: str, exc: BaseException) -> Row:
    first = str(exc).strip().splitlines()
    tail = " / ".join(line.strip() for line in first[-3:])
    return Row(
        figure=name,
        case="the figure could not be measured",
        unit="",
        value=Stat.of([]),
        baseline=None,
        baseline_label="—",
        ratio=None,
        target="runs to the end",
        met=False,
        notes=f"{type(exc).__name__}: {first[0] if first else ''} … {tail}"[:600],
    )


def describe_machine(work: str) -> dict[str, Any]:
    import lightning
    import psutil
    import torch

    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    usage = shutil.disk_usage(work)
    disk = f"{work}: {usage.total / 1e9:.0f} GB, {usage.free / 1e9:.0f} GB free"
    try:
        device = os.stat(work).st_dev
        with open("/proc/self/mountinfo") as handle:
            for line in handle:
                parts = line.split()
                major, minor = (int(x) for x in parts[2].split(":"))
                if os.makedev(major, minor) == device:
                    sep = parts.index("-")
                    disk += f", {parts[sep + 1]} on {parts[sep + 2]}"
                    name = os.path.basename(parts[sep + 2])
                    rotational = f"/sys/block/{name}/queue/rotational"
                    if os.path.exists(rotational):
                        disk += (
                            " (rotational)"
                            if Path(rotational).read_text().strip() == "1"
                            else " (non-rotational)"
                        )
                    break
    except (OSError, ValueError):
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": psutil.virtual_memory().total / 1e9,
        "disk": disk,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "load_average_at_start": list(os.getloadavg()),
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--quick", action="store_true", help="small sizes, one repetition, 2 jobs")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None)
    p.add_argument("--only", default=None, help=f"comma-separated figures: {', '.join(FIGURES)}")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--state-mb", default=None, help="checkpoint sizes for SIGTERM → exit, e.g. 10,1000,4000")
    p.add_argument("--profile-mb", type=float, default=None, help="state size of the exit breakdown (1000)")
    p.add_argument("--sync-mb", type=float, default=None)
    p.add_argument("--wall-k", default=None, help="preemption counts, e.g. 1,3,10")
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="figures run at once (1 for timings you report; default 1, quick 2)",
    )
    p.add_argument("--work", default=None, help="scratch folder on the disk to measure (default: a temp dir)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    preset = args.preset or ("quick" if args.quick else "full")
    settings = PRESETS[preset]
    if args.reps:
        settings = replace(settings, reps=args.reps)
    if args.state_mb:
        settings = replace(settings, state_mb=tuple(float(v) for v in args.state_mb.split(",")))
    if args.sync_mb:
        settings = replace(settings, sync_mb=args.sync_mb)
    if args.profile_mb:
        settings = replace(settings, profile_mb=args.profile_mb)
    if args.wall_k:
        settings = replace(settings, wall_k=tuple(int(v) for v in args.wall_k.split(",")))
    names = default_figures() if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise SystemExit(f"unknown figure(s) {unknown}; choose from {list(FIGURES)}")
    jobs = args.jobs or (1 if preset == "full" else 2)
    os.makedirs(args.work or tempfile.gettempdir(), exist_ok=True)
    work = tempfile.mkdtemp(prefix="lightning-grid-bench-", dir=args.work)
    settings = replace(settings, work=work)
    need = 3.5 * max([*settings.state_mb, settings.sync_mb]) * 1e6
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"{work} has {free / 1e9:.1f} GB free; this preset needs about {need / 1e9:.1f} GB")
    machine = describe_machine(work)
    log(f"preset {preset}, figures {names}, {jobs} job(s), scratch {work}")
    started = time.time()
    begin = time.monotonic()
    rows: list[Row] = []
    extra: dict[str, Any] = {}
    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(FIGURES[name], settings) for name in names]
            for name, future in zip(names, futures):
                try:
                    figure_rows, figure_extra = future.result()
                except Exception as exc:  # one broken figure must not cost the others
                    log(f"figure {name} failed: {exc}")
                    figure_rows, figure_extra = [_failed(name, exc)], {}
                rows += figure_rows
                extra.update(figure_extra)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "machine": machine,
        "settings": {k: v for k, v in settings.__dict__.items() if k != "work"}
        | {"jobs": jobs, "figures": names},
        "started": started,
        "seconds": time.monotonic() - begin,
        "load_average_at_end": list(os.getloadavg()),
    }
    paths = write(args.out, report, rows, extra)
    print(Path(paths["markdown"]).read_text())
    log("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
