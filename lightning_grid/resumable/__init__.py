"""The in-process side: exact resume of a Lightning run after SIGTERM or SIGKILL.

Names load on first use, so that the callbacks-factory entry point (a submodule) costs nothing in a
process that is not resuming.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_grid._lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_grid.resumable.callback import Resumable
    from lightning_grid.resumable.leaving import Preempted
    from lightning_grid.resumable.trainer import Trainer

__all__ = ["Resumable", "Trainer", "Preempted"]

_LAZY = {
    "Resumable": "lightning_grid.resumable.callback",
    "Preempted": "lightning_grid.resumable.leaving",
    "Trainer": "lightning_grid.resumable.trainer",
}


__getattr__ = lazy_exports(__name__, _LAZY, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
