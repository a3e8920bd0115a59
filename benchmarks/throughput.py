"""Steady-state throughput: plain Lightning, + Resumable, + periodic saves, under ``lightning-grid run``.

The four variants run interleaved (plain, resumable, periodic, launcher; plain, ...), so that a
slow patch of a shared machine hits all of them; each ratio is taken within one round. The
launcher's own memory and CPU are sampled with psutil while it supervises.

Separate processes cannot resolve 1 % on a shared virtual machine: between two runs of the same
plain script, minutes apart, the speed moved from 74 to 121 steps/s (tenth session). So periodic
saves are also measured *paired*, in one process: blocks of ``paired_block_steps`` steps with
periodic saves on and off in turn, each block with saves compared with the mean of the two blocks
around it, seconds apart. That run also times the training thread inside Resumable's batch hooks:
what the training step waits for at a save, apart from what the writer thread costs it.
"""

from __future__ import annotations

import os
import shutil
import statistics
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


def _paired(settings: Settings) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per block with saves: (its speed / the mean of its neighbours', its speed, the training
    thread's milliseconds per save); and the speeds of the blocks without saves."""
    root = fresh_dir(settings.work, "tp-paired")
    block = settings.paired_block_steps
    warmup = max(5, block // 2)
    steps = warmup + settings.paired_blocks * block
    args = [
        "--features", "784", "--hidden", "1024", "--batch-size", "32", "--batches", str(steps + 10),
        "--max-steps", str(steps), "--warmup", str(warmup),
        "--every-n-steps", str(PERIODIC_N), "--ab-block", str(block),
    ]  # fmt: skip
    proc = Proc(train_cmd(root, "--mode", "callback", *args))
    proc.finish()
    shutil.rmtree(root, ignore_errors=True)
    # (saves, steps, steps/s, seconds in Resumable's hooks) per block
    blocks = [(v[0] == "1", int(v[1]), int(v[1]) / float(v[2]), float(v[4])) for v in proc.values("BLOCK")]
    if proc.popen.returncode != 0 or len(blocks) < 3:
        raise RuntimeError(f"no paired blocks (exit {proc.popen.returncode}):\n{proc.tail()}")
    without = [b for b in blocks if not b[0]]
    # The training thread's time in Resumable's hooks at a step without a save, from the blocks without.
    plain_hook_s = sum(b[3] for b in without) / sum(b[1] for b in without)
    saves_per_block = max(1, block // PERIODIC_N)
    ratios, speeds, per_save_ms = [], [], []
    for before, (saves, n, speed, hook_s), after in zip(blocks, blocks[1:], blocks[2:]):
        if not saves or before[0] or after[0]:
            continue
        ratios.append(speed / ((before[2] + after[2]) / 2))
        speeds.append(speed)
        per_save_ms.append(1000 * (hook_s - plain_hook_s * n) / saves_per_block)
    return ratios, speeds, per_save_ms, [b[2] for b in without]


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
    paired: list[float] = []
    paired_on: list[float] = []
    paired_off: list[float] = []
    per_save_ms: list[float] = []
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
        ratios, on, waits, off = _paired(settings)
        paired += ratios
        paired_on += on
        paired_off += off
        per_save_ms += waits
        log(
            f"throughput rep {rep + 1}: "
            + ", ".join(f"{v} {values[v][-1]:.1f}/s" for v in VARIANTS)
            + f"; launcher {peak:.0f} MB, {used:.2f}% CPU"
            + f"; paired saves/none {Stat.of(ratios).fmt()}, training thread {Stat.of(waits).fmt()} ms per save"
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
    paired_ratio, waits = Stat.of(paired), Stat.of(per_save_ms)
    step_ms = 1000 / statistics.median(paired_off) if paired_off else float("nan")
    rows.append(
        Row(
            figure="steady-state throughput",
            unit="steps/s",
            case=f"Resumable, periodic saves every {PERIODIC_N} steps, paired blocks in one process",
            value=Stat.of(paired_on),
            baseline=Stat.of(paired_off),
            baseline_label=f"the blocks of {settings.paired_block_steps} steps either side, without saves",
            ratio=paired_ratio,
            target="≥ 0.99 × without saves",
            met=paired_ratio.median >= 0.99,
            notes=(
                f"{paired_ratio.n} blocks with saves over {settings.reps} run(s); the training thread spends"
                f" {waits.fmt()} ms per save in Resumable's hooks (snapshot, hand-over), against a"
                f" {step_ms:.1f} ms step: the rest of the difference is the writer thread's work"
                " (serialise, hash, write) competing with training for the machine"
            ),
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
        "paired": {"ratio": paired_ratio, "training_thread_ms_per_save": waits},
    }
    return rows, extra
