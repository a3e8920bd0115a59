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
