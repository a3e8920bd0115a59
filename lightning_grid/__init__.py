"""lightning-grid: train PyTorch Lightning models on spot machines without losing work.

The public API is what this module exports; everything else may change.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

from lightning_grid.errors import LightningGridError
from lightning_grid.launcher.experiment import Status
from lightning_grid.sdk import Experiment

if TYPE_CHECKING:
    from lightning_grid.resumable import Preempted, Resumable, Trainer

__all__ = ["Resumable", "Trainer", "Experiment", "Status", "Preempted", "LightningGridError", "__version__"]

__version__ = "0.1.0"

_log = logging.getLogger("lightning_grid")
if not _log.handlers:
    # Like Lightning's own logger: users see what we do (resuming, preempted) without configuring logging.
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("%(message)s"))
    _log.addHandler(_handler)
    _log.setLevel(logging.INFO)
    _log.propagate = False


_IN_PROCESS = {"Resumable", "Trainer", "Preempted"}


def __getattr__(name: str) -> Any:
    # The launcher imports this package too, and must stay small and quick to start: torch and
    # Lightning load only when the in-process side is asked for.
    if name in _IN_PROCESS:
        from lightning_grid import resumable

        return getattr(resumable, name)
    raise AttributeError(f"module 'lightning_grid' has no attribute {name!r}")
