"""SIGTERM → exit against the raw cost of the bytes, and the steps a SIGTERM or a SIGKILL loses."""

from __future__ import annotations

import random
import shutil

from benchmarks.common import (
    SIGKILL,
    SIGTERM,
    Proc,
    Row,
    Settings,
    Stat,
    checkpoint_files,
    fresh_dir,
    log,
    raw_write,
    step_at_least,
    step_of,
    train_cmd,
)

_BIG_EPOCH = ["--batches", "100000"]


def _sigterm_once(root: str, state_mb: float, at_step: int) -> tuple[float, int, int]:
    """SIGTERM at ``at_step``: seconds to exit, checkpoint bytes, and the last completed step."""
    proc = Proc(train_cmd(root, "--state-mb", str(state_mb), "--announce", *_BIG_EPOCH))
    proc.wait_for(step_at_least("STEP", at_step))
    sent = proc.signal(SIGTERM)
    exited = proc.finish()
    if proc.popen.returncode != 0:
        raise RuntimeError(f"SIGTERM run exited {proc.popen.returncode}:\n{proc.tail()}")
    files = checkpoint_files(root)
    if not files:
        raise RuntimeError(f"no checkpoint after SIGTERM:\n{proc.tail()}")
    done = [int(v[0]) for v in proc.values("DONE")]
    return exited - sent, files[-1].stat().st_size, max(done)


def _resumed_at(root: str, extra: list[str]) -> int:
    """Relaunch: the global step its first batch starts from."""
    proc = Proc(train_cmd(root, "--announce", *_BIG_EPOCH, *extra))
    line, _ = proc.wait_for(step_of("STEP"))
    proc.kill()
    return int(line.split()[1])


def sigterm_to_exit(settings: Settings) -> tuple[list[Row], dict]:
    """SIGTERM → exit per state size; the smallest size is also relaunched to count lost steps."""
    rng = random.Random(0)
    rows: list[Row] = []
    curve = []
    lost: list[float] = []
    for index, mb in enumerate(settings.state_mb):
        times: list[float] = []
        raws: list[float] = []
        ratios: list[float] = []
        size = 0
        for rep in range(settings.reps):
            root = fresh_dir(settings.work, f"sigterm-{mb:g}")
            elapsed, size, completed = _sigterm_once(root, mb, rng.randint(5, 40))
            raw = raw_write(size, root)  # same disk, same bytes, right after
            if index == 0:
                lost.append(completed - _resumed_at(root, ["--state-mb", str(mb)]))
            shutil.rmtree(root, ignore_errors=True)
            times.append(elapsed)
            raws.append(raw)
            ratios.append(elapsed / (1.3 * raw + 1.0))
            log(f"SIGTERM→exit {mb:g} MB rep {rep + 1}: {elapsed:.3f}s (raw {raw:.3f}s, {size / 1e6:.1f} MB)")
        value, raw_stat, ratio = Stat.of(times), Stat.of(raws), Stat.of(ratios)
        rows.append(
            Row(
                figure="SIGTERM → process exit",
                case=f"{size / 1e6:.0f} MB checkpoint",
                unit="s",
                value=value,
                baseline=raw_stat,
                baseline_label="os.write + fsync of the same bytes",
                ratio=ratio,
                target="≤ 1.3 × raw + 1 s (ratio = value / (1.3 × raw + 1 s) ≤ 1)",
                met=value.median <= 1.3 * raw_stat.median + 1.0,
            )
        )
        curve.append({"mb": size / 1e6, "exit": value, "raw": raw_stat})
    lost_stat = Stat.of(lost)
    rows.append(
        Row(
            figure="steps lost per SIGTERM",
            case=f"SIGTERM at a random step, {settings.state_mb[0]:g} MB state",
            unit="steps",
            value=lost_stat,
            baseline=None,
            baseline_label="—",
            ratio=None,
            target="0 (every repetition)",
            met=lost_stat.max == 0,
        )
    )
    return rows, {"sigterm_curve": curve}


def steps_lost_sigkill(settings: Settings) -> tuple[list[Row], dict]:
    """SIGKILL at a random step of a run saving every N steps; the relaunch redoes the lost ones."""
    rng = random.Random(1)
    n = settings.kill_every_n
    extra = ["--step-sleep", "0.005", "--state-mb", "10", "--every-n-steps", str(n)]
    kill: list[float] = []
    for rep in range(settings.reps):
        root = fresh_dir(settings.work, "lost-kill")
        at = rng.randint(2 * n, 5 * n)
        first = Proc(train_cmd(root, "--announce", *_BIG_EPOCH, *extra))
        first.wait_for(step_at_least("STEP", at))
        first.signal(SIGKILL)
        first.finish()
        completed = max(int(v[0]) for v in first.values("DONE"))
        kill.append(completed - _resumed_at(root, extra))
        shutil.rmtree(root, ignore_errors=True)
        log(f"steps lost rep {rep + 1}: SIGKILL after step {completed} with saves every {n}: {kill[-1]:g}")
    kill_stat = Stat.of(kill)
    row = Row(
        figure="steps lost per SIGKILL",
        case=f"periodic saves every N = {n} steps",
        unit="steps",
        value=kill_stat,
        baseline=Stat.of([n]),
        baseline_label="N",
        ratio=Stat.of([k / n for k in kill]),
        target="≤ N (every repetition)",
        met=kill_stat.max <= n,
    )
    return [row], {}
