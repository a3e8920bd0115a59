"""Entry points ``lightning.pytorch.callbacks_factory`` and ``pytorch_lightning.callbacks_factory``.

Lightning calls every registered factory when a Trainer is built, in every training process of a
user who has lightning-grid installed. Ours return nothing unless the launcher said the run is
resumable (``LIGHTNING_GRID_RESUMABLE=1``), so installing lightning-grid changes no one's training by
itself; and until then they import nothing but the contract (no torch work, no launcher, nothing
Linux-only).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from lightning_grid.contract import Contract

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import Callback

__all__ = ["callbacks_factory", "pytorch_lightning_callbacks_factory"]

_log = logging.getLogger("lightning_grid")
_warned_pytorch_lightning = False


def callbacks_factory() -> list[Callback]:
    """Resumability for scripts that never import us (``lightning-grid run --resumable``)."""
    contract = Contract.from_env()
    if not contract.resumable:
        return []
    from lightning_grid.resumable.callback import Resumable

    callback = Resumable(
        every_n_train_steps=contract.every_n_train_steps, every_n_seconds=contract.every_n_seconds
    )
    # Stands down in setup() when the script added its own Resumable.
    callback._from_factory = True
    return [callback]


def pytorch_lightning_callbacks_factory() -> list[Any]:
    """The standalone ``pytorch_lightning`` package: adds nothing, and says why when it matters.

    The Resumable is built on ``lightning.pytorch`` (its loops, loaders and checkpoint connector);
    handed to a ``pytorch_lightning.Trainer`` it would break the run, not resume it.
    """
    global _warned_pytorch_lightning
    if Contract.from_env().resumable and not _warned_pytorch_lightning:
        _warned_pytorch_lightning = True
        _log.warning(
            "lightning-grid: this Trainer comes from the standalone `pytorch_lightning` package, which "
            "the Resumable does not support, so this run is not resumable; use `import lightning.pytorch "
            "as pl` (the same API) instead"
        )
    return []
