"""The environment contract between the launcher and the training process.

The launcher and the in-process side never import each other; they agree only on these variable
names. Keeping them in one module means a rename cannot silently break one side.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ENV_RESUMABLE",
    "ENV_CHECKPOINTS",
    "ENV_EXPERIMENT",
    "ENV_ATTEMPT",
    "ENV_HOME",
    "ENV_NOTICE",
    "ENV_EVERY_N_TRAIN_STEPS",
    "ENV_EVERY_N_SECONDS",
    "ENV_PROGRESS",
    "ENV_NODE",
    "Contract",
    "default_home",
]

#: "1" when the script runs under ``lightning-grid run --resumable``: the callbacks factory then adds
#: :class:`~lightning_grid.Resumable` to every Trainer without the script importing us.
ENV_RESUMABLE = "LIGHTNING_GRID_RESUMABLE"
#: fsspec URL where checkpoints are written and looked for (lives in the artifact store).
ENV_CHECKPOINTS = "LIGHTNING_GRID_CHECKPOINTS"
#: Name of the experiment this process belongs to (for messages and markers).
ENV_EXPERIMENT = "LIGHTNING_GRID_EXPERIMENT"
#: 1-based attempt number; > 1 means this process is a relaunch after an interruption.
ENV_ATTEMPT = "LIGHTNING_GRID_ATTEMPT"
#: Path of the file the launcher writes at a notice, before its SIGTERM: how to save in the time
#: left (see :mod:`lightning_grid.shutdown`). Absent or missing: save in full.
ENV_NOTICE = "LIGHTNING_GRID_NOTICE"
#: Periodic saves for the Resumable the launcher adds (``run --every-n-train-steps/--every-n-seconds``),
#: so that a script that never imports us also survives a SIGKILL, and a notice too short for a new
#: save has a recent checkpoint to keep.
ENV_EVERY_N_TRAIN_STEPS = "LIGHTNING_GRID_EVERY_N_TRAIN_STEPS"
ENV_EVERY_N_SECONDS = "LIGHTNING_GRID_EVERY_N_SECONDS"
#: Path of a small file where the training process notes, at every batch end, the step it has
#: reached: after a SIGKILL the launcher compares it with the newest committed checkpoint to bill
#: the steps that will be trained again.
ENV_PROGRESS = "LIGHTNING_GRID_PROGRESS"
#: Multi-node: the number of the node (machine) this process runs on, as the launcher counts them.
#: Processes of different nodes tell apart the notice meant for one machine.
ENV_NODE = "LIGHTNING_GRID_NODE"
#: Root of lightning-grid's persistent state (registry, default artifact store).
ENV_HOME = "LIGHTNING_GRID_HOME"

_TRUE = {"1", "true", "yes", "on"}


def default_home(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return os.path.abspath(env.get(ENV_HOME) or os.path.join(os.path.expanduser("~"), ".lightning_grid"))


@dataclass(frozen=True)
class Contract:
    """What the launcher told this process, parsed once."""

    resumable: bool = False
    checkpoints: str | None = None
    experiment: str | None = None
    attempt: int = 1
    notice_file: str | None = None
    every_n_train_steps: int | None = None
    every_n_seconds: float | None = None
    progress_file: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Contract:
        env = os.environ if environ is None else environ
        attempt_raw = env.get(ENV_ATTEMPT, "1")
        try:
            attempt = max(1, int(attempt_raw))
        except ValueError:
            attempt = 1
        return cls(
            resumable=env.get(ENV_RESUMABLE, "").strip().lower() in _TRUE,
            checkpoints=env.get(ENV_CHECKPOINTS) or None,
            experiment=env.get(ENV_EXPERIMENT) or None,
            attempt=attempt,
            notice_file=env.get(ENV_NOTICE) or None,
            every_n_train_steps=_positive(env.get(ENV_EVERY_N_TRAIN_STEPS), int),
            every_n_seconds=_positive(env.get(ENV_EVERY_N_SECONDS), float),
            progress_file=env.get(ENV_PROGRESS) or None,
        )

    def to_env(self) -> dict[str, str]:
        """The variables to add to a child's environment (inverse of :meth:`from_env`)."""
        env = {ENV_RESUMABLE: "1" if self.resumable else "0", ENV_ATTEMPT: str(self.attempt)}
        if self.checkpoints:
            env[ENV_CHECKPOINTS] = self.checkpoints
        if self.experiment:
            env[ENV_EXPERIMENT] = self.experiment
        if self.notice_file:
            env[ENV_NOTICE] = self.notice_file
        if self.every_n_train_steps:
            env[ENV_EVERY_N_TRAIN_STEPS] = str(self.every_n_train_steps)
        if self.every_n_seconds:
            env[ENV_EVERY_N_SECONDS] = repr(self.every_n_seconds)
        if self.progress_file:
            env[ENV_PROGRESS] = self.progress_file
        return env


def _positive(raw: str | None, kind: type[int] | type[float]) -> Any:
    """A positive number, or None: a garbled value must not stop training (Resumable would refuse it)."""
    try:
        value = kind(raw) if raw else None
    except ValueError:
        return None
    return value if value is not None and value > 0 else None
