"""Bit-exact resume: SIGTERM at chosen points, relaunch the same command, compare with plain Lightning.

Every case runs the real script in subprocesses; the reference is the same script run without
lightning_grid at all. 240 samples in batches of 16: 15 batches per epoch, 2 epochs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import assert_bit_identical, run_until_done

AUG = ["--aug", "--dropout", "0.2"]

CASES = {
    # name: (script options, interruptions)
    "mid_epoch": (AUG, ["train:5"]),
    "mid_validation": (AUG + ["--val-check-interval", "0.5"], ["val:7:1"]),
    "last_batch_of_epoch": (AUG, ["last:0"]),
    "epoch_boundary": (AUG + ["--sched", "epoch"], ["epoch_end:0"]),
    "several_times": (AUG, ["train:3", "train:9", "train:20"]),
    "workers": (AUG + ["--workers", "2"], ["train:5", "train:19"]),
    "persistent_workers": (AUG + ["--workers", "2", "--persistent"], ["train:5", "train:20"]),
    "step_scheduler": (AUG + ["--sched", "step"], ["train:7"]),
    "grad_accumulation": (AUG + ["--accum", "3"], ["train:2"]),
    "manual_two_optimizers": (AUG + ["--manual", "--sched", "step"], ["train:6", "train:40"]),
    "stateful_dataloader": (AUG + ["--loader", "stateful"], ["train:5", "last:1"]),
    "datamodule": (AUG + ["--datamodule"], ["train:5"]),
    "reload_dataloaders_every_epoch": (
        AUG + ["--datamodule", "--reload", "1", "--epochs", "3"],
        ["train:5", "train:20"],
    ),
    "loader_generator": (AUG + ["--loader", "generator", "--workers", "2"], ["train:14", "train:20"]),
}

SLOW_CASES = {
    "workers_mid_validation": (
        AUG + ["--workers", "2", "--val-check-interval", "0.5"],
        ["val:7:1", "last:1"],
    ),
    "persistent_3_workers_3_epochs": (
        AUG + ["--workers", "3", "--persistent", "--sched", "epoch", "--epochs", "3"],
        ["train:4", "epoch_end:1", "train:38"],
    ),
    "stateful_persistent_workers": (
        AUG + ["--workers", "2", "--loader", "stateful", "--persistent"],
        ["train:5", "train:19"],
    ),
    "generator_persistent": (
        AUG + ["--loader", "generator", "--workers", "2", "--persistent"],
        ["train:5", "train:20"],
    ),
    "datamodule_workers_validation": (
        AUG + ["--datamodule", "--workers", "2", "--val-check-interval", "0.25"],
        ["val:3:0", "val:10:1", "epoch_end:0"],
    ),
    "accumulation_with_workers": (
        AUG + ["--accum", "2", "--workers", "2", "--sched", "step"],
        ["train:3", "train:9"],
    ),
}


def _check(
    tmp_path: Path, mnist_dir: Path, reference, options: list[str], kills: list[str], mode: str = "callback"
) -> list:
    expected = reference.get(options)
    out = tmp_path / "weights.pt"
    args = ["--mode", mode, *options]
    for kill in kills:
        args += ["--kill", kill]
    runs = run_until_done(mnist_dir, tmp_path / "run", out, args)
    # A signal during the final batches finds no later point to cut: that run simply finishes.
    assert (2 if kills else 1) <= len(runs) <= len(kills) + 1, [r.output[-500:] for r in runs]
    assert_bit_identical(expected, out)
    return runs


@pytest.mark.parametrize("name", list(CASES))
def test_sigterm_resume_is_bit_identical(name: str, tmp_path: Path, mnist_dir: Path, reference) -> None:
    options, kills = CASES[name]
    runs = _check(tmp_path, mnist_dir, reference, options, kills)
    for run in runs[:-1]:
        assert "checkpoint at step" in run.output and "exiting with status 0" in run.output


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_CASES))
def test_sigterm_resume_is_bit_identical_more(name: str, tmp_path: Path, mnist_dir: Path, reference) -> None:
    options, kills = SLOW_CASES[name]
    _check(tmp_path, mnist_dir, reference, options, kills)


@pytest.mark.parametrize(
    "options",
    [AUG, AUG + ["--workers", "2", "--persistent"], AUG + ["--loader", "stateful", "--workers", "2"]],
    ids=["workers0", "persistent_workers", "stateful_workers"],
)
def test_adding_resumable_does_not_change_an_uninterrupted_run(
    options: list[str], tmp_path: Path, mnist_dir: Path, reference
) -> None:
    _check(tmp_path, mnist_dir, reference, options, [])


def test_drop_in_trainer_resumes_exactly(tmp_path: Path, mnist_dir: Path, reference) -> None:
    _check(tmp_path, mnist_dir, reference, AUG, ["train:5"], mode="trainer")
