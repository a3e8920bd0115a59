"""lightning-grid: train PyTorch Lightning models on spot machines without losing work.

The public API is what this module exports; everything else may change.

Importing this package stays light and platform-neutral: Lightning's callbacks-factory entry point
imports it in every training process of a user who has us installed, on any OS. The in-process side
(torch, Lightning) and the launcher (Linux only) load only when one of their names is asked for.
"""

from __future__ import annotations

import logging
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from lightning_grid._lazy import lazy_exports
from lightning_grid.errors import LightningGridError

if TYPE_CHECKING:
    from lightning_grid.launcher.experiment import Status
    from lightning_grid.resumable import Preempted, Resumable, Trainer
    from lightning_grid.sdk import Experiment

__all__ = ["Resumable", "Trainer", "Experiment", "Status", "Preempted", "LightningGridError", "__version__"]

try:
    __version__ = version("lightning-grid")  # defined once, in pyproject.toml
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

_log = logging.getLogger("lightning_grid")
_log.setLevel(logging.INFO)
if not _log.handlers and not logging.getLogger().hasHandlers():
    # As Lightning does: without any logging configured, users still see what we do (resuming,
    # preempted); once they configure logging (a root handler), our records go to it instead.
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("%(message)s"))
    _log.addHandler(_handler)
    _log.propagate = False


_LAZY = {
    "Resumable": "lightning_grid.resumable",
    "Trainer": "lightning_grid.resumable",
    "Preempted": "lightning_grid.resumable",
    "Status": "lightning_grid.launcher.experiment",
    "Experiment": "lightning_grid.sdk",
}


def _platform_check() -> None:
    from lightning_grid.launcher import require_supported_platform

    require_supported_platform()  # one clear line instead of a missing fcntl deep in the engine


__getattr__ = lazy_exports(__name__, _LAZY, globals(), before={"Experiment": _platform_check})


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
