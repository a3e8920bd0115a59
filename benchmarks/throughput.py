"""Steady-state throughput: plain Lightning, + Resumable, + periodic saves, under ``lightning-grid run``.

The four variants run interleaved (plain, resumable, periodic, launcher; plain, ...), so that a
slow patch of a shared machine hits all of them; each ratio is taken within one round. The
launcher's own memory and CPU are sampled with psutil while it supervises.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time

import psutil

from benchmarks.common import TRAIN, Proc, Row, Settings, Stat, child_env, fresh_dir, log, train_cmd

VARIANTS = ("plain", "resumable", "periodic", "launcher")
PERIODIC_N = 50


def _model_args(settings: Settings) -> list[str]:
    warmup = max(5, settings.throughput_steps // 10)
    return [
        "--features", "784", "--hidden", "1024", "--batch-size", "32",
        "--batches", str(settings.throughput_steps + 10),
        "--max-steps", str(settings.throughput_steps), "--warmup", str(warmup),
    ]  # fmt: skip


class _Sampler(threading.Thread):
    """RSS and CPU time of one process (not its children), every 0.1 s."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.samples: list[tuple[float, int, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with self.proc.oneshot():
                    cpu = self.proc.cpu_times()
                    self.samples.append(
                        (time.monotonic(), self.proc.memory_info().rss, cpu.user + cpu.system)
                    )
            except psutil.Error:
                return
            self.stop.wait(0.1)

    def peak_rss_mb(self) -> float:
        return max(s[1] for s in self.samples) / 1e6

    def supervising_cpu_percent(self, since: float, until: float) -> float:
        """CPU used by the launcher itself between two moments (while the script trains)."""
        window = [s for s in self.samples if since <= s[0] <= until]
        if len(window) < 2:
            return float("nan")
        (t0, _, c0), (t1, _, c1) = window[0], window[-1]
        return 100.0 * (c1 - c0) / (t1 - t0)


def _throughput(proc: Proc) -> tuple[float, float]:
    """(steps per wall second, steps per CPU second of the training process)."""
    values = proc.values("THROUGHPUT")
    if proc.popen.returncode != 0 or not values:
        raise RuntimeError(f"no throughput (exit {proc.popen.returncode}):\n{proc.tail()}")
    return float(values[-1][0]), float(values[-1][1])


def _direct(settings: Settings, mode: str, extra: list[str]) -> tuple[float, float]:
    root = fresh_dir(settings.work, f"tp-{mode}")
    proc = Proc(train_cmd(root, "--mode", mode, *_model_args(settings), *extra))
    proc.finish()
    shutil.rmtree(root, ignore_errors=True)
    return _throughput(proc)


def _launched(settings: Settings, rep: int) -> tuple[tuple[float, float], float, float]:
    base = fresh_dir(settings.work, "tp-launcher")
    script_dir = fresh_dir(base, "script")
    script = shutil.copy(TRAIN, script_dir)
    home = os.path.join(base, "home")
    cmd = [sys.executable, "-m", "lightning_grid.cli", "run", "--resumable", "--name", f"tp-{rep}", script]
    cmd += ["--mode", "env", "--root", ".", *_model_args(settings)]
    proc = Proc(cmd, env=child_env(LIGHTNING_GRID_HOME=home))
    sampler = _Sampler(proc.popen.pid)
    sampler.start()
    # From the script's first line (training is about to start) to its result line.
    _, begin = proc.wait_for(lambda line: line.startswith("TRAINING"))
    _, end = proc.wait_for(lambda line: line.startswith("THROUGHPUT"))
    proc.finish()
    sampler.stop.set()
    sampler.join()
    shutil.rmtree(base, ignore_errors=True)
    return _throughput(proc), sampler.peak_rss_mb(), sampler.supervising_cpu_percent(begin, end)


def throughput(settings: Settings) -> tuple[list[Row], dict]:
    values: dict[str, list[float]] = {v: [] for v in VARIANTS}
    per_cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    rss: list[float] = []
    cpu: list[float] = []
    for rep in range(settings.reps):
        measured = {
            "plain": _direct(settings, "plain", []),
            "resumable": _direct(settings, "callback", []),
            "periodic": _direct(settings, "callback", ["--every-n-steps", str(PERIODIC_N)]),
        }
        measured["launcher"], peak, used = _launched(settings, rep)
        for variant, (wall_speed, cpu_speed) in measured.items():
            values[variant].append(wall_speed)
            per_cpu[variant].append(cpu_speed)
        rss.append(peak)
        cpu.append(used)
        log(
            f"throughput rep {rep + 1}: "
            + ", ".join(f"{v} {values[v][-1]:.1f}/s" for v in VARIANTS)
            + f"; launcher {peak:.0f} MB, {used:.2f}% CPU"
        )

    def ratio(variant: str, against: str) -> Stat:
        return Stat.of(a / b for a, b in zip(values[variant], values[against]))

    def cpu_note(variant: str, against: str) -> str:
        per = Stat.of(a / b for a, b in zip(per_cpu[variant], per_cpu[against]))
        return f"per CPU-second of the training process: ratio {per.fmt()}"

    rss_stat, cpu_stat = Stat.of(rss), Stat.of(cpu)
    compared = [
        # variant, baseline variant, case, what the baseline is, the least ratio that meets the target
        ("resumable", "plain", "Resumable, no periodic saves", "plain Lightning (interleaved)", 0.99),
        ("periodic", "plain", f"Resumable, periodic saves every {PERIODIC_N} steps", "plain Lightning (interleaved)", 0.99),
        ("launcher", "resumable", "under lightning-grid run --resumable", "the same script run directly (with Resumable)", 0.99),
    ]  # fmt: skip
    rows = []
    for variant, against, case, label, least in compared:
        variant_ratio = ratio(variant, against)
        rows.append(
            Row(
                figure="steady-state throughput",
                unit="steps/s",
                case=case,
                value=Stat.of(values[variant]),
                baseline=Stat.of(values[against]),
                baseline_label=label,
                ratio=variant_ratio,
                target=f"≥ {least} × {'plain' if against == 'plain' else 'direct'}",
                met=variant_ratio.median >= least,
                notes=cpu_note(variant, against),
            )
        )
    rows += [
        Row(
            figure="launcher footprint",
            case="peak RSS of the launcher process",
            unit="MB",
            value=rss_stat,
            baseline=None,
            baseline_label="—",
            ratio=None,
            target="< 100 MB",
            met=rss_stat.max < 100,
        ),
        Row(
            figure="launcher footprint",
            case="launcher CPU while the script trains",
            unit="% of a core",
            value=cpu_stat,
            baseline=None,
            baseline_label="—",
            ratio=None,
            target="< 1 %",
            met=cpu_stat.median < 1.0,
        ),
    ]
    extra = {
        "throughput": {v: Stat.of(values[v]) for v in VARIANTS},
        "throughput_per_cpu_second": {v: Stat.of(per_cpu[v]) for v in VARIANTS},
    }
    return rows, extra
