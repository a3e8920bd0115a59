"""``lightning_grid.Trainer``: a ``lightning.Trainer`` that is resumable without being told."""

from __future__ import annotations

import os
from collections.abc import Mapping
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
        kwargs = {**_torchrun_layout(), **kwargs}
        super().__init__(*args, callbacks=callbacks, **kwargs)

    @property
    def resumable(self) -> Resumable:
        return next(cb for cb in self.callbacks if isinstance(cb, Resumable) and cb._active)  # type: ignore[attr-defined]


def _torchrun_layout(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``num_nodes``/``devices`` as torchrun laid the job out (nothing outside torchrun)."""
    env = os.environ if environ is None else environ
    try:
        world, local = int(env["WORLD_SIZE"]), int(env["LOCAL_WORLD_SIZE"])
    except (KeyError, ValueError):
        return {}
    if "TORCHELASTIC_RUN_ID" not in env or local < 1 or world % local:
        return {}
    return {"num_nodes": world // local, "devices": local}
