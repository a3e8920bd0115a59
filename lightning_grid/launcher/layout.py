"""Where an experiment's things live in the artifact store, defined once.

::

    <artifacts>/<name>/experiment.json   who owns this folder (the experiment's id): never resume another's
    <artifacts>/<name>/execdir/          the execution directory (a manifest and its files)
    <artifacts>/<name>/checkpoints/      the checkpoint store the script writes to
    <artifacts>/<name>/events/           one object per event (the agent's story; no registry there)

The local engine, the agent, ``status --artifacts`` and the dashboard all go through this class.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from lightning_grid._io import atomic_write_bytes
from lightning_grid.errors import StoreError, UsageError

__all__ = ["StoreLayout", "new_id"]


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class StoreLayout:
    base: str  # <artifacts>/<name>

    @classmethod
    def of(cls, artifacts: str, name: str) -> StoreLayout:
        return cls(f"{artifacts.rstrip('/')}/{name}")

    @property
    def execdir(self) -> str:
        return f"{self.base}/execdir"

    @property
    def checkpoints(self) -> str:
        return f"{self.base}/checkpoints"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    @property
    def legacy_events(self) -> str:
        """Where agents before one-object-per-event kept their story (still read)."""
        return f"{self.base}/events.jsonl"

    @property
    def identity(self) -> str:
        return f"{self.base}/experiment.json"

    # -- ownership ----------------------------------------------------------------------------------
    def owner(self) -> dict[str, Any] | None:
        """The identity record of the experiment that uses this folder, or None if none claimed it."""
        fs, path = _open(self.identity)
        try:
            return dict(json.loads(fs.cat_file(path)))
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise StoreError(f"unreadable {self.identity}: {exc}") from exc
        except Exception as exc:  # any backend's failure (botocore's are not OSErrors)
            raise StoreError(f"store unreachable: {self.identity}: {exc}") from exc

    def claim(self, experiment_id: str, name: str) -> None:
        """Bind the folder to one experiment, or refuse: two registries (or two users) that pick the
        same name over one store must never resume each other's checkpoints."""
        owner = self.owner()
        if owner is not None:
            if owner.get("id") == experiment_id:
                return
            raise UsageError(
                f"the artifact store already holds another experiment named {name!r} at {self.base}"
                f" (id {owner.get('id')}); choose another --name or --artifacts"
            )
        data = json.dumps({"id": experiment_id, "name": name, "created": time.time()}).encode()
        fs, path = _open(self.identity)
        try:
            if isinstance(fs, LocalFileSystem):
                atomic_write_bytes(path, data)
            else:
                fs.pipe_file(path, data)
        except Exception as exc:  # any backend's failure
            raise StoreError(f"cannot write {self.identity}: {exc}") from exc

    def check_owner(self, experiment_id: str) -> None:
        """Before an attempt: the folder still belongs to this experiment (or to nobody yet)."""
        owner = self.owner()
        if owner is not None and owner.get("id") != experiment_id:
            raise StoreError(
                f"{self.base} now belongs to another experiment (id {owner.get('id')}, not {experiment_id}):"
                " refusing to resume from its checkpoints"
            )


def _open(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ValueError, ImportError) as exc:
        raise UsageError(f"cannot use artifact store {url!r}: {exc}") from exc
    return fs, path
