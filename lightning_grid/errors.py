"""One error hierarchy for the whole package.

Every message carries the offending value, so a user reading one line knows what to fix.
"""

from __future__ import annotations

__all__ = [
    "LightningGridError",
    "UsageError",
    "CheckpointError",
    "CorruptCheckpointError",
    "CheckpointMismatchError",
    "StoreError",
    "StoreUnwritableError",
    "StoreWriteError",
    "StoreFullError",
    "ManifestError",
]


class LightningGridError(Exception):
    """Root of every error raised on purpose by lightning_grid."""


class UsageError(LightningGridError):
    """The user asked for something that cannot work (bad option, bad value, missing file)."""


class CheckpointError(LightningGridError):
    """A checkpoint could not be written, read or used."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's bytes do not match its commit record (truncated, overwritten, bit rot)."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint belongs to a different model than the one being trained."""


class StoreError(LightningGridError):
    """The checkpoint or artifact store could not be reached or used."""


class StoreUnwritableError(StoreError):
    """The store location cannot be written: found at start, before any training time is spent."""


class StoreWriteError(StoreError):
    """A write to a checkpoint or artifact store failed part-way (full disk, quota, read-only
    filesystem, I/O error): nothing was committed, no temporary file is left, and what was
    committed before is untouched. ``path`` is what was being written, ``errno`` the OS's code."""

    def __init__(self, message: str, path: str | None = None, errno: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno


class StoreFullError(StoreWriteError):
    """The store's filesystem is full (ENOSPC) or the user's quota is spent (EDQUOT)."""


class ManifestError(StoreError):
    """An artifact store's manifest is malformed or hostile; nothing was restored from it.

    ``manifest`` is its location, ``entry`` the offending file name (None when the whole document
    is at fault)."""

    def __init__(self, message: str, manifest: str, entry: str | None = None) -> None:
        super().__init__(message)
        self.manifest = manifest
        self.entry = entry


class RegistryError(LightningGridError):
    """The registry (SQLite under LIGHTNING_GRID_HOME) cannot be read or written: corrupt, disk full."""


class StoreUnreachableError(StoreError):
    """A remote store did not take a checkpoint after every retry. The checkpoint is whole and
    committed in this machine's private spool (``spooled``), and the next run here uploads it."""

    def __init__(self, message: str, spooled: str) -> None:
        super().__init__(message)
        self.spooled = spooled
