"""Entry point ``lightning.pytorch.callbacks_factory``: resumability for scripts that never import us.

Lightning calls every registered factory when a Trainer is built. Ours returns nothing unless the
launcher said the run is resumable (``LIGHTNING_GRID_RESUMABLE=1``), so installing lightning-grid
changes no one's training by itself.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from lightning_grid.contract import Contract
from lightning_grid.resumable.callback import Resumable

__all__ = ["callbacks_factory"]


def callbacks_factory() -> list[Callback]:
    contract = Contract.from_env()
    if not contract.resumable:
        return []
    callback = Resumable(
        every_n_train_steps=contract.every_n_train_steps, every_n_seconds=contract.every_n_seconds
    )
    # Stands down in setup() when the script added its own Resumable.
    callback._from_factory = True
    return [callback]
