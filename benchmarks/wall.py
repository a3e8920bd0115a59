"""Total wall time with k simulated preemptions vs an uninterrupted run + k × one restart's cost.

All runs go through ``lightning-grid run --use_spot --resumable`` (``--simulate-preemptions`` for
k > 0). One restart's cost is measured on its own, from its parts:

* SIGTERM → exit of the same script (run directly),
* relaunch → first new optimizer step of the same script (run directly),
* the launcher's time between two attempts (exit → next spawn: save and restore the execution
  directory), read from the registry of the interrupted runs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

from benchmarks.common import (
    SIGTERM,
    TRAIN,
    Proc,
    Row,
    Settings,
    Stat,
    child_env,
    fresh_dir,
    log,
    step_at_least,
    step_of,
    train_cmd,
)

STEP_SLEEP = 0.02


def _args(settings: Settings) -> list[str]:
    return [
        "--state-mb", "10", "--step-sleep", str(STEP_SLEEP),
        "--batches", str(settings.wall_steps + 10), "--max-steps", str(settings.wall_steps),
    ]  # fmt: skip


def _restart_parts(settings: Settings) -> tuple[float, float]:
    """(SIGTERM → exit, relaunch → first new step) of the script run directly."""
    root = fresh_dir(settings.work, "wall-direct")
    proc = Proc(train_cmd(root, *_args(settings), "--announce"))
    proc.wait_for(step_at_least("STEP", max(2, settings.wall_steps // 3)))
    sent = proc.signal(SIGTERM)
    exit_s = proc.finish() - sent
    again = Proc(train_cmd(root, *_args(settings), "--announce"))
    again.wait_for(step_of("STEP"))
    _, done = again.wait_for(step_of("DONE"))
    again.kill()
    shutil.rmtree(root, ignore_errors=True)
    return exit_s, done - again.started


def _launch(settings: Settings, k: int, startup_s: float, train_s: float, rep: int) -> tuple[float, dict]:
    """One launcher run; returns its wall time and its status (attempts, restarts)."""
    base = fresh_dir(settings.work, f"wall-k{k}")
    script = shutil.copy(TRAIN, fresh_dir(base, "script"))
    home = os.path.join(base, "home")
    name = f"wall-{k}-{rep}"
    cmd = [sys.executable, "-m", "lightning_grid.cli", "run", "--use_spot", "--resumable", "--name", name]
    if k:
        # Each interrupted attempt trains about half of train_s / (k + 1) before its notice, so
        # that the k notices all come before the training is done, even when an attempt starts
        # faster than the uninterrupted run did.
        after = startup_s + 0.5 * train_s / (k + 1)
        cmd += ["--simulate-preemptions", ",".join([f"{after:.2f}"] * k)]
    cmd += [script, "--mode", "env", "--root", ".", *_args(settings)]
    env = child_env(LIGHTNING_GRID_HOME=home)
    proc = Proc(cmd, env=env)
    ended = proc.finish()
    seconds = ended - proc.started
    if proc.popen.returncode != 0:
        raise RuntimeError(f"launcher exit {proc.popen.returncode}:\n{proc.tail()}")
    status = Proc([sys.executable, "-m", "lightning_grid.cli", "status", name, "--json"], env=env)
    status.finish()
    info = json.loads("".join(status.lines))
    started = [float(v[1]) for v in proc.values("TRAINING")]
    finished = [float(v[1]) for v in proc.values("FINISHED")]
    info["_startup_s"] = started[0] - proc.started if started else float("nan")
    info["_train_s"] = finished[-1] - started[-1] if finished and started else float("nan")
    shutil.rmtree(base, ignore_errors=True)
    return seconds, info


def _gaps(info: dict) -> list[float]:
    attempts = sorted(info.get("attempts", []), key=lambda a: a["number"])
    return [
        float(b["started"]) - float(a["ended"])
        for a, b in zip(attempts, attempts[1:])
        if a.get("ended") and b.get("started")
    ]


def preemption_wall_time(settings: Settings) -> tuple[list[Row], dict]:
    base: list[float] = []
    walls: dict[int, list[float]] = {k: [] for k in settings.wall_k}
    restarts: dict[int, list[int]] = {k: [] for k in settings.wall_k}
    exits: list[float] = []
    resumes: list[float] = []
    gaps: list[float] = []
    predicted: dict[int, list[float]] = {k: [] for k in settings.wall_k}
    failures: list[str] = []
    for rep in range(settings.reps):
        exit_s, resume_s = _restart_parts(settings)
        exits.append(exit_s)
        resumes.append(resume_s)
        t0, info0 = _launch(settings, 0, 0.0, 0.0, rep)
        base.append(t0)
        rep_gaps: list[float] = []
        for k in settings.wall_k:
            try:
                seconds, info = _launch(settings, k, info0["_startup_s"], info0["_train_s"], rep)
            except RuntimeError as exc:  # the launcher failed: recorded, the other runs go on
                failures.append(f"k={k} rep {rep + 1}: {str(exc).strip().splitlines()[-1]}")
                log(f"wall k={k} rep {rep + 1} failed: {failures[-1]}")
                seconds, info = float("nan"), {"restarts": -1}
            walls[k].append(seconds)
            restarts[k].append(int(info.get("restarts", -1)))
            rep_gaps += _gaps(info)
        gaps += rep_gaps
        gap = Stat.of(rep_gaps).median if rep_gaps else 0.0
        cost = exit_s + resume_s + gap
        for k in settings.wall_k:
            predicted[k].append(t0 + k * cost)
        log(
            f"wall rep {rep + 1}: uninterrupted {t0:.1f}s, restart = exit {exit_s:.2f} + resume {resume_s:.2f}"
            f" + launcher {gap:.2f} s; "
            + ", ".join(f"k={k} {walls[k][-1]:.1f}s (restarts {restarts[k][-1]})" for k in settings.wall_k)
        )
    cost_stat = Stat.of(e + r + g for e, r, g in zip(exits, resumes, [Stat.of(gaps).median] * len(exits)))
    rows = []
    for k in settings.wall_k:
        ok = [(w, p) for w, p in zip(walls[k], predicted[k]) if w == w]
        ratio = Stat.of(w / p for w, p in ok)
        rows.append(
            Row(
                figure="total wall time with k simulated preemptions",
                case=f"k = {k} (restarts seen: {sorted(set(restarts[k]))})",
                unit="s",
                value=Stat.of(w for w, _ in ok),
                baseline=Stat.of(predicted[k]),
                baseline_label=f"uninterrupted ({Stat.of(base).fmt()} s) + k × restart ({cost_stat.fmt()} s)",
                ratio=ratio,
                target="within 10 % (0.9 ≤ ratio ≤ 1.1)",
                met=0.9 <= ratio.median <= 1.1 and all(r == k for r in restarts[k]),
                notes="; ".join(f for f in failures if f.startswith(f"k={k} ")),
            )
        )
    extra = {
        "wall": {
            "k": list(settings.wall_k),
            "measured": [Stat.of(w for w in walls[k] if w == w) for k in settings.wall_k],
            "predicted": [Stat.of(predicted[k]) for k in settings.wall_k],
            "uninterrupted": Stat.of(base),
            "restart_parts": {
                "sigterm_to_exit": Stat.of(exits),
                "relaunch_to_first_step": Stat.of(resumes),
                "launcher_between_attempts": Stat.of(gaps),
            },
        }
    }
    return rows, extra


__all__ = ["preemption_wall_time", "time"]
