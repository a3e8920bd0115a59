"""``lightning_grid.Trainer``: a ``lightning.Trainer`` that is resumable without being told."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from lightning_grid.resumable.callback import Resumable

__all__ = ["Trainer"]


class Trainer(pl.Trainer):
    """Exactly ``lightning.Trainer``, plus a :class:`Resumable` callback unless one is given.

    ``fit`` then continues from the newest valid checkpoint on its own: running the same command
    after an interruption is all a user does. Pass ``resumable=Resumable(...)`` to configure it.
    """

    def __init__(self, *args: Any, resumable: Resumable | None = None, **kwargs: Any) -> None:
        callbacks = kwargs.pop("callbacks", None)
        if callbacks is None:
            callbacks = []
        elif not isinstance(callbacks, list):
            callbacks = [callbacks]
        else:
            callbacks = list(callbacks)
        if resumable is not None:
            callbacks.append(resumable)
        elif not any(isinstance(cb, Resumable) for cb in callbacks):
            callbacks.append(Resumable())
        super().__init__(*args, callbacks=callbacks, **kwargs)

    @property
    def resumable(self) -> Resumable:
        return next(cb for cb in self.callbacks if isinstance(cb, Resumable) and cb._active)  # type: ignore[attr-defined]
