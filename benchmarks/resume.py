"""Resume overhead: relaunch → first new optimizer step, at 1 %, 50 %, 99 % of an epoch, vs a cold start."""

from __future__ import annotations

import os
import shutil

from benchmarks.common import (
    SIGTERM,
    Proc,
    Row,
    Settings,
    Stat,
    fresh_dir,
    log,
    step_at_least,
    step_of,
    train_cmd,
)


def _args(settings: Settings) -> list[str]:
    return ["--batches", str(settings.resume_batches), "--state-mb", "10", "--announce"]


def _first_step(root: str, settings: Settings, expect_resume: bool) -> float:
    """Launch; seconds until the first optimizer step of this process is done."""
    proc = Proc(train_cmd(root, *_args(settings)))
    start_line, _ = proc.wait_for(step_of("STEP"))
    _, done_at = proc.wait_for(step_of("DONE"))
    proc.kill()
    resumed = int(start_line.split()[1]) > 0
    if resumed != expect_resume:
        raise RuntimeError(f"expected resume={expect_resume}, first step {start_line!r}:\n{proc.tail()}")
    return done_at - proc.started


def _make_checkpoint(root: str, settings: Settings, percent: int) -> tuple[int, float]:
    # The epoch's last batches are never a clean cut (the checkpoint would land after the epoch),
    # so the signal needs room to arrive before them: small epochs are cut a little earlier.
    step = max(1, min(settings.resume_batches * percent // 100 - 1, settings.resume_batches - 12))
    proc = Proc(train_cmd(root, *_args(settings)))
    proc.wait_for(step_at_least("STEP", step))
    sent = proc.signal(SIGTERM)
    exited = proc.finish()
    if proc.popen.returncode != 0:
        raise RuntimeError(f"exit {proc.popen.returncode}:\n{proc.tail()}")
    return step, exited - sent


def resume_overhead(settings: Settings) -> tuple[list[Row], dict]:
    positions = settings.resume_positions
    roots = {}
    exits = []
    for percent in positions:
        roots[percent] = fresh_dir(settings.work, f"resume-{percent}")
        step, exit_s = _make_checkpoint(roots[percent], settings, percent)
        exits.append(exit_s)
        log(f"resume: checkpoint at {percent}% (step {step + 1} of {settings.resume_batches})")
    cold: list[float] = []
    resumed: dict[int, list[float]] = {p: [] for p in positions}
    for rep in range(settings.reps):  # interleaved: cold, 1 %, 50 %, 99 %, cold, ...
        cold_root = fresh_dir(settings.work, "resume-cold")
        cold.append(_first_step(cold_root, settings, expect_resume=False))
        for percent in positions:
            resumed[percent].append(_first_step(roots[percent], settings, expect_resume=True))
        log(
            f"resume rep {rep + 1}: cold {cold[-1]:.2f}s, "
            + ", ".join(f"{p}% {resumed[p][-1]:.2f}s" for p in positions)
        )
    for root in [*roots.values(), os.path.join(settings.work, "resume-cold")]:
        shutil.rmtree(root, ignore_errors=True)
    cold_stat = Stat.of(cold)
    rows = []
    for percent in positions:
        value = Stat.of(resumed[percent])
        ratio = Stat.of(r / c for r, c in zip(resumed[percent], cold))
        rows.append(
            Row(
                figure="resume overhead (relaunch → first new step)",
                case=f"at {percent} % of a {settings.resume_batches}-batch epoch",
                unit="s",
                value=value,
                baseline=cold_stat,
                baseline_label="cold start → first step",
                ratio=ratio,
                target="≤ 1.5 × cold start",
                met=ratio.median <= 1.5,
            )
        )
    first, last = positions[0], positions[-1]
    flat = Stat.of(a / b for a, b in zip(resumed[last], resumed[first]))
    rows.append(
        Row(
            figure="resume overhead (relaunch → first new step)",
            case=f"{last} % vs {first} % (no O(position) fast-forward)",
            unit="s",
            value=Stat.of(resumed[last]),
            baseline=Stat.of(resumed[first]),
            baseline_label=f"resume at {first} %",
            ratio=flat,
            target=f"{last} % / {first} % ≤ 1.2",
            met=flat.median <= 1.2,
        )
    )
    curve = {
        "positions": list(positions),
        "resume": [Stat.of(resumed[p]) for p in positions],
        "cold": cold_stat,
        "sigterm_exit": Stat.of(exits),
    }
    return rows, {"resume_curve": curve}
