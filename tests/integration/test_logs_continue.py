"""One continuous log across interruptions: same version directory, every step once, same values."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.helpers import run_until_done

AUG = ["--aug", "--dropout", "0.2"]


def _step_rows(metrics: Path) -> dict[int, float]:
    rows: dict[int, float] = {}
    with open(metrics, newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("train_loss_step"):
                step = int(row["step"])
                assert step not in rows, f"step {step} logged twice"
                rows[step] = float(row["train_loss_step"])
    return rows


@pytest.mark.parametrize(
    "kills,version",
    [
        (["train:5", "train:17"], None),
        (["train:9:SIGKILL"], None),  # rows logged after the last checkpoint are dropped, then redone
        (["train:5", "train:12:SIGKILL"], "0"),  # a fixed version: Lightning deletes metrics.csv on reopen
    ],
    ids=["sigterm_twice", "sigkill", "fixed_version"],
)
def test_csv_log_is_one_continuous_run(
    kills: list[str], version: str | None, tmp_path: Path, mnist_dir: Path, reference
) -> None:
    expected_weights = reference.get(AUG)
    ref_metrics = expected_weights.parent / "logs" / "version_0" / "metrics.csv"
    root, out = tmp_path / "run", tmp_path / "w.pt"
    args = AUG + ["--every-n-steps", "4"] + [a for k in kills for a in ("--kill", k)]
    # Before a SIGKILL, the periodic writes already released finish: which checkpoint the relaunch
    # finds must not depend on the machine's load (a kill in the middle of a write is tested apart).
    args += ["--kill-settle"]
    if version is not None:
        args += ["--logger-version", version]
    run_until_done(mnist_dir, root, out, args)
    folder = "version_0" if version is None else version  # a string version names the folder itself
    versions = sorted(p.name for p in (root / "logs").iterdir())
    assert versions == [folder], versions
    got = _step_rows(root / "logs" / folder / "metrics.csv")
    want = _step_rows(ref_metrics)
    assert sorted(got) == sorted(want) == list(range(len(want)))
    assert got == want  # bit-exact training logs bit-exact losses


def test_tensorboard_continues_the_same_version(tmp_path: Path, mnist_dir: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, out = tmp_path / "run", tmp_path / "w.pt"
    run_until_done(
        mnist_dir,
        root,
        out,
        AUG
        + ["--logger", "tb", "--every-n-steps", "4", "--kill", "train:5", "--kill", "train:14:SIGKILL"]
        + ["--kill-settle"],
    )
    versions = sorted(p.name for p in (root / "tb").iterdir())
    assert versions == ["version_0"], versions
    acc = EventAccumulator(str(root / "tb" / "version_0"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train_loss_step")]
    assert steps == sorted(set(steps)) == list(range(30))
