"""The in-process side: exact resume of a Lightning run after SIGTERM or SIGKILL."""

from lightning_grid.resumable.callback import Preempted, Resumable
from lightning_grid.resumable.trainer import Trainer

__all__ = ["Resumable", "Trainer", "Preempted"]
