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
4. rank 0 writes the commit record, listing every file with its checksum and size, once the saved
   step's logs are flushed (in the callback's writer thread, as for a single file).

Periodic saves do not hold training up for the write (where this torch's DCP allows it, see
:func:`async_capable`): every rank copies its shards (:func:`start_async`), the ranks agree that
every copy was made, and each hands its copy to DCP's ``async_save``; DCP writes the files in a
background thread, with its own collectives on a gloo group of their own (:func:`writer_group`),
while training goes on. At a
later batch end at which every rank's write is done (the callback's per-batch agreement says so),
steps 3 and 4 run as above: :func:`finish_async`. A preemption or the final save first waits for
a periodic write still in flight and commits it.

A write that failed on any rank (a full disk) is removed by rank 0 once every rank is past it;
a folder without a record (a rank killed mid-write) is never trusted and is removed like any
uncommitted payload; discovery verifies every listed file, so a missing or damaged shard makes
the previous checkpoint the resume point. On resume every rank reads ``meta.pt`` at set-up (it is
injected as Lightning's loaded checkpoint, as a single file is), and the strategy's own
``load_checkpoint`` restores model and optimizer shards in place once the strategy has wrapped the
model and built the optimizers (``on_fit_start``, before Lightning restores the rest).
"""

from __future__ import annotations

import copy
import errno
import functools
import inspect
import logging
import os
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_grid._io import FULL_ERRNOS, checksum_stream, describe_os_error
from lightning_grid.checkpoints import CheckpointStore, CommitRecord, save_file
from lightning_grid.errors import StoreError, StoreFullError, StoreWriteError, UsageError
from lightning_grid.resumable import _lightning

__all__ = [
    "enabled",
    "check_store",
    "Pending",
    "write",
    "async_capable",
    "writer_group",
    "InFlight",
    "start_async",
    "finish_async",
    "abandon_async",
    "commit",
    "read_metadata",
    "restore_shards",
]

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
    """fsync ``path`` and return its checksum and size (one read; the bytes are in the page cache)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        with os.fdopen(os.dup(fd), "rb") as handle:
            digest, size = checksum_stream(handle)
    finally:
        os.close(fd)
    return {"checksum": digest, "size": size}


def check_store(trainer: pl.Trainer, store: CheckpointStore) -> None:
    """Every rank writes its shard straight into the folder: a path every node sees."""
    if enabled(trainer) and not store.is_local:
        raise UsageError(
            f"sharded checkpoints ({type(trainer.strategy).__name__}) are written by every rank to a shared"
            f" filesystem; {store.url!r} is not a local path (use a folder every node mounts)"
        )


def _new_folder(trainer: pl.Trainer, store: CheckpointStore, step: int) -> tuple[str, str]:
    """Every rank: the new checkpoint folder's name, as rank 0 picked it, and its path."""
    check_store(trainer, store)
    name = trainer.strategy.broadcast(f"ckpt-{step:010d}-{time.time_ns() // 1_000_000}{_FOLDER_SUFFIX}")
    return name, store.folder_path(name)


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
    started = time.monotonic()
    name, folder = _new_folder(trainer, store, step)
    strategy = trainer.strategy
    rank = trainer.global_rank
    try:
        # The strategy makes the folder on every rank; DCP writes each rank's shard (and, on rank 0,
        # .metadata once all shards are written), Lightning's meta.pt on rank 0. A rank's own files
        # are complete when this returns on that rank.
        strategy.save_checkpoint(checkpoint, folder)
        files = {n: _durable_digest(os.path.join(folder, n)) for n in _own_files(folder, rank)}
        error = None
    except _failures() as exc:  # DCP reports a rank's failure (its CheckpointException) on every rank
        files, error = {}, _failure(rank, exc, folder)
    return _collect(trainer, folder, name, step, reason, meta, files, error, started)


def _collect(
    trainer: pl.Trainer,
    folder: str,
    name: str,
    step: int,
    reason: str,
    meta: dict[str, Any],
    files: dict[str, dict[str, Any]],
    error: Failure | None,
    started: float,
) -> Pending | None:
    """Every rank, once its files are written (``files``: its own, durable and hashed) or its write
    failed (``error``): what rank 0 is to commit."""
    # The one collective after the write: every rank takes part, failed or not (a barrier skipped by
    # a failed rank would leave the others waiting), and rank 0 lists the folder only after it.
    gathered: list[Any] = [None] * trainer.world_size
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_gather_object(gathered, (files, error))
    else:
        gathered = [(files, error)]
    errors: list[Failure] = [e for _, e in gathered if e]
    if errors:
        if trainer.is_global_zero:
            _discard(folder)
        said, code = errors[0]
        kind = StoreFullError if code in FULL_ERRNOS else StoreWriteError
        raise kind(
            f"the step {step} sharded checkpoint {folder} could not be written: {said}",
            path=folder,
            errno=code,
        )
    if not trainer.is_global_zero:
        return None
    everything: dict[str, dict[str, Any]] = {}
    for r, (theirs, _) in enumerate(gathered):
        for member, info in theirs.items():
            everything[member] = {**info, "rank": r}
    metadata = _lightning.sharded_metadata_file()
    try:
        for member in sorted(os.listdir(folder)):  # DCP's .metadata, Lightning's meta.pt: rank 0's
            if member not in everything and os.path.isfile(os.path.join(folder, member)):
                everything[member] = {**_durable_digest(os.path.join(folder, member)), "rank": 0}
        if metadata not in everything:
            raise StoreWriteError(f"the step {step} sharded checkpoint {folder} has no {metadata}")
    except (OSError, StoreWriteError) as exc:
        _discard(folder)
        if isinstance(exc, StoreWriteError):
            raise
        raise StoreWriteError(
            f"the step {step} sharded checkpoint {folder} could not be made durable: {exc}"
        ) from exc
    timings = {"write_s": round(time.monotonic() - started, 4), "upload_s": 0.0, "ranks": trainer.world_size}
    return Pending(name, step, reason, everything, {**meta, **timings})


def _discard(folder: str) -> None:
    """Rank 0, after the collective that ends a failed save (no rank writes there any more): the
    folder goes at once. It would never be trusted, but on a full disk its partial shards hold the
    room that the next save needs, and a single file's failed save leaves no temp file either."""
    shutil.rmtree(folder, ignore_errors=True)


#: A rank's failed write: one line (rank, what, where) and its errno, if an OSError said one.
Failure = tuple[str, "int | None"]


@functools.cache
def _failures() -> tuple[type[BaseException], ...]:
    """What a failed DCP write raises: its ``CheckpointException`` derives from ``BaseException``,
    not ``Exception``, so an ``except Exception`` would let a full disk end the run. (Imported
    here, where DCP is in use: not at every start of the training script.)"""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


class _Failed(Exception):
    """A background write that never started: a rank failed before DCP's thread. ``failure`` is
    that rank's own (None on the others: the failed rank's reason is the one gathered)."""

    def __init__(self, failure: Failure | None) -> None:
        super().__init__(failure[0] if failure else "another rank could not start its write")
        self.failure = failure


def _failure(rank: int, exc: BaseException, folder: str) -> Failure:
    """One line for the warning, not DCP's message (a traceback per rank), and the errno, so that
    a full disk is reported as one (``StoreFullError``). DCP wraps each rank's exception as
    ``(exception, traceback)`` under the rank that raised it."""
    failures = getattr(exc, "failures", None)  # a CheckpointException's
    if isinstance(failures, dict) and failures:
        rank = min(failures)
        exc = failures[rank][0]
    if isinstance(exc, StoreWriteError) and exc.errno is not None:  # ours: it names path and cause
        return f"rank {rank}: {exc}", exc.errno
    if isinstance(exc, OSError) and exc.errno is not None:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"rank {rank}: {describe_os_error(exc)}{where}", exc.errno
    said = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    if isinstance(exc, RuntimeError) and "unexpected pos" in said:
        # DCP writes each tensor with torch.save into the shard's file; on a short write torch's
        # zip writer says only this, and the OSError under it is lost. A full disk is the usual
        # cause: say so where the filesystem confirms it.
        free = _free_bytes(folder)
        if free is not None and free < _NEARLY_FULL:
            full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return (
                f"rank {rank}: {describe_os_error(full)}: {free} bytes free under {folder} after a short"
                f" write ({said})",
                errno.ENOSPC,
            )
    return f"rank {rank}: {said}", None


#: Free bytes under which a short write is taken for a full disk.
_NEARLY_FULL = 1 << 20


def _free_bytes(folder: str) -> int | None:
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


@functools.cache
def async_capable() -> bool:
    """Whether this torch's DCP has what a background save needs: ``async_save`` taking a stager
    (ours hands on the copy :func:`_snapshot` made) and ``DefaultStager``, which copies every
    tensor, CPU ones too (pinned by ``tests/integration/test_sharded.py``). Earlier DCP handed CPU
    tensors to its writer thread as they were: there periodic sharded saves stay synchronous."""
    try:
        from torch.distributed.checkpoint import async_save
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions  # noqa: F401
    except ImportError:
        return False
    return "async_stager" in inspect.signature(async_save).parameters


class _Staged:
    """DCP's staging (its ``AsyncStager`` protocol) for a state already copied on the training
    thread: hands it on as it is."""

    _synchronize_after_execute = False

    @property
    def should_synchronize_after_execute(self) -> bool:
        return False

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def _snapshot(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of this rank's shards that training cannot change: DCP's own stager (to host
    memory), or, for FSDP's ``ShardedTensor`` (DCP's stager asks one for a ``data_ptr`` and
    fails), ``copy.deepcopy``, which ``ShardedTensor`` implements shard by shard; Lightning's
    sharded state dicts are offloaded to CPU (``offload_to_cpu=True``), so those copies are in
    host memory too."""
    if _holds_sharded_tensor(state):
        return copy.deepcopy(state)
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    stager = DefaultStager(StagingOptions(False, False, False, False))  # synchronous, as async_save's own
    try:
        staged = stager.stage(state)
    finally:
        stager.close()
    assert isinstance(staged, dict)
    return staged


def _holds_sharded_tensor(obj: Any) -> bool:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(obj, ShardedTensor):
        return True
    if isinstance(obj, dict):
        return any(_holds_sharded_tensor(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_holds_sharded_tensor(v) for v in obj)
    return False


def writer_group() -> Any:
    """A gloo group of every rank for DCP's background writes (None without torch.distributed).

    DCP's writer thread runs collectives of its own (the save plan, then the results); on the
    training's group they would interleave with the training's, and ``async_save`` needs a CPU
    backend, which an NCCL-only group lacks. A collective: every rank calls it at the same point."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    return torch.distributed.new_group(backend="gloo")


@dataclass
class InFlight:
    """A periodic folder save that DCP is writing in a background thread, on every rank."""

    name: str
    folder: str
    step: int
    reason: str
    meta: dict[str, Any]
    future: Future[Any]
    started: float
    error: Failure | None = None  # rank 0: Lightning's meta.pt could not be written
    done_at: float | None = None  # when DCP's write ended (its thread sets it)

    def running(self) -> bool:
        return not self.future.done()


def start_async(
    trainer: pl.Trainer,
    store: CheckpointStore,
    checkpoint: dict[str, Any],
    step: int,
    reason: str,
    meta: dict[str, Any],
    group: Any,
) -> InFlight:
    """Every rank: snapshot this rank's shards and start writing them; training may go on as soon
    as this returns. :func:`finish_async`, on every rank, makes the folder a :class:`Pending`."""
    from torch.distributed.checkpoint import async_save

    started = time.monotonic()
    name, folder = _new_folder(trainer, store, step)
    error: Failure | None = None
    try:  # on the training thread, so that a rank that fails here starts no DCP collective
        os.makedirs(folder, exist_ok=True)
        state = _snapshot(_lightning.sharded_dcp_state(trainer, checkpoint))
    except Exception as exc:  # a full or read-only store, no memory for the copy
        error = _failure(trainer.global_rank, exc, folder)
    # Every rank starts its DCP thread (whose collectives wait for every rank's), or none does.
    failed = torch.tensor([int(error is not None)], device=trainer.strategy.root_device)
    if trainer.world_size > 1:
        failed = trainer.strategy.reduce(failed, reduce_op="max")
    future: Future[Any]
    if failed.item():
        future = Future()
        future.set_exception(_Failed(error))
    else:
        response = async_save(
            state, checkpoint_id=folder, process_group=group, no_dist=group is None, async_stager=_Staged()
        )
        # Staged already, so async_save returns the write's future (an AsyncSaveResponse only
        # comes with staging in the background).
        future = response if isinstance(response, Future) else response.upload_completion
    inflight = InFlight(name, folder, step, reason, meta, future, started)
    future.add_done_callback(lambda _: setattr(inflight, "done_at", time.monotonic()))
    if trainer.is_global_zero:
        try:  # what is left of the checkpoint (loops, callbacks, our positions): small, written now
            path = os.path.join(folder, _lightning.sharded_metadata_file())
            save_file(checkpoint, path, "the sharded checkpoint's metadata")
        except Exception as exc:
            inflight.error = _failure(0, exc, folder)
    inflight.meta = {**meta, "async": True, "stall_s": round(time.monotonic() - started, 4)}
    return inflight


def finish_async(trainer: pl.Trainer, inflight: InFlight) -> Pending | None:
    """Every rank, at the same point (a collective): wait for this rank's write, then as
    :func:`write` does after it. Returns on rank 0 what to commit."""
    rank = trainer.global_rank
    begun = time.monotonic()
    files: dict[str, dict[str, Any]] = {}
    error = inflight.error
    try:
        inflight.future.result()
        if error is None:
            files = {
                n: _durable_digest(os.path.join(inflight.folder, n))
                for n in _own_files(inflight.folder, rank)
            }
    except _Failed as exc:  # this rank could not start its write, or another could not
        error = exc.failure or error
    except _failures() as exc:  # DCP's CheckpointException, on every rank alike
        error = _failure(rank, exc, inflight.folder)
    meta = {**inflight.meta, "finished_at_step": trainer.global_step}
    # The record's write_s is what the launcher plans a notice's window with: the write's own time,
    # not the training between its end and the batch end at which it was collected.
    idle = max(0.0, begun - inflight.done_at) if inflight.done_at is not None else 0.0
    return _collect(
        trainer,
        inflight.folder,
        inflight.name,
        inflight.step,
        inflight.reason,
        meta,
        files,
        error,
        inflight.started + idle,
    )


def abandon_async(inflight: InFlight) -> None:
    """After an exception in training (no collective is safe then): let this rank's write end, and
    commit nothing. The folder has no record, so it is never trusted and is removed later."""
    try:
        inflight.future.result()
    except _failures() as exc:
        log.debug("lightning_grid: the abandoned sharded save %s failed: %s", inflight.name, exc)


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
