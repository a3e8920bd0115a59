"""Checkpoints of sharded strategies (FSDP ``state_dict_type="sharded"``, ``ModelParallelStrategy``).

There no rank holds the whole model: each rank's state dict has only its shard, and the strategy
writes a ``torch.distributed.checkpoint`` (DCP) folder in which every rank writes its own file.
:class:`~lightning_grid.resumable.callback.Resumable` then saves like this, on every rank,
synchronously (training waits for the write):

1. rank 0 picks the folder's name (``ckpt-<step>-<ms>.dcp``, beside the single-file checkpoints)
   and every rank gets it;
2. every rank hands Lightning's checkpoint dict to the strategy's own ``save_checkpoint``: its
   shard of model and optimizer goes to ``__<rank>_<n>.distcp``, and rank 0 writes DCP's
   ``.metadata`` and Lightning's ``meta.pt`` (loops, schedulers, callbacks, with this project's
   RNG and loader positions of every rank, gathered as in the single-file case);
3. every rank fsyncs and hashes the files it wrote, and the lists (or the rank's error) are
   gathered to rank 0, a collective every rank joins whether its write failed or not; rank 0 then
   also hashes any file in the folder nobody claimed;
4. rank 0 writes the commit record, listing every file with its sha256 and size, once the saved
   step's logs are flushed (in the callback's writer thread, as for a single file).

A folder without a record (a rank killed mid-write) is never trusted and is removed like any
uncommitted payload; discovery verifies every listed file, so a missing or damaged shard makes
the previous checkpoint the resume point. On resume every rank reads ``meta.pt`` at set-up (it is
injected as Lightning's loaded checkpoint, as a single file is), and the strategy's own
``load_checkpoint`` restores model and optimizer shards in place once the strategy has wrapped the
model and built the optimizers (``on_fit_start``, before Lightning restores the rest).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_grid.checkpoints import CheckpointStore, CommitRecord
from lightning_grid.errors import StoreError, StoreWriteError, UsageError
from lightning_grid.resumable import _lightning

__all__ = ["enabled", "check_store", "Pending", "write", "commit", "read_metadata", "restore_shards"]

log = logging.getLogger("lightning_grid")

_FOLDER_SUFFIX = ".dcp"


def enabled(trainer: pl.Trainer) -> bool:
    """Whether this trainer's checkpoints are DCP folders written by every rank."""
    return _lightning.saves_sharded(trainer)


@dataclass
class Pending:
    """A folder every rank has written and made durable; rank 0 commits it."""

    name: str
    step: int
    reason: str
    files: dict[str, dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)


def _own_files(folder: str, rank: int) -> list[str]:
    """The files of ``folder`` that ``rank`` wrote: DCP names a rank's data ``__<rank>_<n>.distcp``."""
    prefix = f"__{rank}_"
    return sorted(n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(".distcp"))


def _durable_digest(path: str) -> dict[str, Any]:
    """fsync ``path`` and return its sha256 and size (one read; the bytes are in the page cache)."""
    digest = hashlib.sha256()
    size = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        with os.fdopen(os.dup(fd), "rb") as handle:
            while chunk := handle.read(8 << 20):
                digest.update(chunk)
                size += len(chunk)
    finally:
        os.close(fd)
    return {"sha256": digest.hexdigest(), "size": size}


def check_store(trainer: pl.Trainer, store: CheckpointStore) -> None:
    """Every rank writes its shard straight into the folder: a path every node sees."""
    if enabled(trainer) and not store.is_local:
        raise UsageError(
            f"sharded checkpoints ({type(trainer.strategy).__name__}) are written by every rank to a shared"
            f" filesystem; {store.url!r} is not a local path (use a folder every node mounts)"
        )


def write(
    trainer: pl.Trainer,
    store: CheckpointStore,
    checkpoint: dict[str, Any],
    step: int,
    reason: str,
    meta: dict[str, Any],
) -> Pending | None:
    """Every rank: write this rank's part of the folder checkpoint and make it durable.

    Returns, on rank 0, what its commit record is to say (None elsewhere). A write that failed on
    any rank raises ``StoreWriteError`` on every rank (DCP reports a failure on all of them); a
    store that cannot hold a folder written by every rank raises ``UsageError`` on every rank."""
    check_store(trainer, store)
    started = time.monotonic()
    strategy = trainer.strategy
    name = strategy.broadcast(f"ckpt-{step:010d}-{time.time_ns() // 1_000_000}{_FOLDER_SUFFIX}")
    folder = store.folder_path(name)
    rank = trainer.global_rank
    try:
        # The strategy makes the folder on every rank; DCP writes each rank's shard (and, on rank 0,
        # .metadata once all shards are written), Lightning's meta.pt on rank 0. A rank's own files
        # are complete when this returns on that rank.
        strategy.save_checkpoint(checkpoint, folder)
        files = {n: _durable_digest(os.path.join(folder, n)) for n in _own_files(folder, rank)}
        error = None
    except Exception as exc:  # DCP reports a rank's failure (its CheckpointException) on every rank
        files, error = {}, f"rank {rank}: {exc}"
    # The one collective after the write: every rank takes part, failed or not (a barrier skipped by
    # a failed rank would leave the others waiting), and rank 0 lists the folder only after it.
    gathered: list[Any] = [None] * trainer.world_size
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_gather_object(gathered, (files, error))
    else:
        gathered = [(files, error)]
    errors = [e for _, e in gathered if e]
    if errors:
        raise StoreWriteError(
            f"the step {step} sharded checkpoint {folder} could not be written: {errors[0]}"
        )
    if not trainer.is_global_zero:
        return None
    everything: dict[str, dict[str, Any]] = {}
    for r, (theirs, _) in enumerate(gathered):
        for member, info in theirs.items():
            everything[member] = {**info, "rank": r}
    for member in sorted(os.listdir(folder)):  # DCP's .metadata, Lightning's meta.pt: rank 0 wrote them
        if member not in everything and os.path.isfile(os.path.join(folder, member)):
            everything[member] = {**_durable_digest(os.path.join(folder, member)), "rank": 0}
    metadata = _lightning.sharded_metadata_file()
    if metadata not in everything:
        raise StoreWriteError(f"the step {step} sharded checkpoint {folder} has no {metadata}")
    timings = {"write_s": round(time.monotonic() - started, 4), "upload_s": 0.0, "ranks": trainer.world_size}
    return Pending(name, step, reason, everything, {**meta, **timings})


def commit(store: CheckpointStore, pending: Pending) -> CommitRecord:
    """Rank 0: the commit record, listing every file of the folder (written last)."""
    return store.commit_folder(pending.name, pending.step, pending.files, pending.reason, pending.meta)


def read_metadata(store: CheckpointStore, record: CommitRecord) -> dict[str, Any]:
    """Everything but the model and optimizer shards, as Lightning's loaded checkpoint dict."""
    path = os.path.join(store.folder_path(record.name), _lightning.sharded_metadata_file())
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict):
        raise StoreError(f"{path} does not hold a Lightning checkpoint")
    return checkpoint


def restore_shards(trainer: pl.Trainer, store: CheckpointStore, record: CommitRecord) -> None:
    """Every rank: the strategy loads its model and optimizer shards in place (the rest of the
    checkpoint is already injected). Call once the strategy has set up model and optimizers."""
    trainer.strategy.load_checkpoint(store.folder_path(record.name))
