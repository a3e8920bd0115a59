"""``Resumable``: SIGTERM → finish the step → complete checkpoint → exit 0; rerun → continue bit-exactly.

Where a checkpoint may be cut
-----------------------------
Only at the end of a training batch after which nothing else is due before the next batch: not the
epoch's last batch, not a batch followed by validation, not inside a gradient-accumulation window,
not when training is about to stop. Lightning resumes from exactly this point through its
ordinary mid-epoch path, and none of its known resume gaps (a lost epoch after an end-of-epoch
save, a validation that is never re-run, loader state silently not loaded) can arise. A signal that
lands elsewhere is acted on at the next such batch end: validation in flight completes first.

The checkpoint is Lightning's own (model, optimizers, schedulers, loops, callbacks, precision)
plus, under this callback's state key, every RNG and each train loader's position (see
:mod:`lightning_grid.resumable.dataloader`). The process exits at the start of the next batch,
after that batch's data was fetched but before anything changes, so the metrics of the saved step
are logged exactly once.

Around ``fit``
--------------
When training ends a *final* checkpoint is committed. A run that finds one (the same command run
again, or a relaunch after a notice that came after ``fit``) restores that state and returns from
``fit`` at once, so the script's own code after ``fit`` runs on the final weights and nothing is
trained twice. From the first fit until the process is gone a notice is an interruption wherever it
lands (see :mod:`lightning_grid.resumable.signals`): it leaves a ``PREEMPTED`` marker naming the
newest checkpoint and the process exits 0. ``COMPLETED`` is written only by the process's exit hook,
when no notice came: "the script finished", not "training finished".
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_grid.checkpoints import COMPLETED_MARKER, CheckpointStore, CommitRecord
from lightning_grid.contract import Contract
from lightning_grid.errors import (
    CheckpointMismatchError,
    LightningGridError,
    StoreError,
    StoreUnreachableError,
    StoreWriteError,
)
from lightning_grid.resumable import _lightning, ddp_buckets, leaving, reshard, rng, sharded
from lightning_grid.resumable.background import Job, Writer
from lightning_grid.resumable.dataloader import ResumableLoader, can_make_resumable, shield_workers
from lightning_grid.resumable.leaving import Preempted
from lightning_grid.resumable.signals import SignalFlag, guard
from lightning_grid.resumable.snapshot import Snapshots
from lightning_grid.shutdown import EXIT_OVERHEAD_S, MARGIN, Plan, ShutdownNotice, read_notice

__all__ = ["Resumable", "Preempted"]

log = logging.getLogger("lightning_grid")

_STATE_KEY = "lightning_grid.Resumable"
# The instance the launcher's entry point adds needs its own key: Lightning refuses two stateful
# callbacks with one key, and the script may have added its own Resumable as well.
_FACTORY_STATE_KEY = "lightning_grid.Resumable[launcher]"
_STATE_VERSION = 1
#: How long a signalled process waits for the launcher's shutdown plan before saving in full.
PLAN_WAIT_S = 0.5
# The k-th fit() of a process (a multi-stage script) keeps its checkpoints apart from the others,
# so a later stage never resumes from an earlier stage's state.
_fits_in_process = 0


class _Process:
    """What the process-wide exit path needs once fits are over: where markers go (the launcher reads
    them at the top of the checkpoint location, whichever fit wrote the checkpoint) and the newest
    checkpoint that a relaunch would continue from with nothing lost."""

    def __init__(self) -> None:
        self.root: CheckpointStore | None = None  # markers (rank 0 only)
        self.root_url: str | None = None
        # The final checkpoint, or the one resumed from while nothing has been trained past it.
        self.last: tuple[CheckpointStore, CommitRecord] | None = None
        self.step = 0  # the last fit's global step
        self.marker_written = False
        self.fast_exit = True  # the last fit's Resumable(fast_exit=...)

    def relative_name(self, store: CheckpointStore, record: CommitRecord) -> str:
        """The checkpoint's name as seen from the root (``fit-2/ckpt-...`` for a later stage)."""
        if self.root_url is None or store.url.rstrip("/") == self.root_url.rstrip("/"):
            return record.name
        return f"{store.url.rstrip('/')[len(self.root_url.rstrip('/')) + 1 :]}/{record.name}"


_process = _Process()


def _write_marker_outside_fit(signal_name: str) -> CommitRecord | None:
    """A notice after fit (or between fits): the newest checkpoint holds everything; 0 steps redone."""
    if _process.root is None or _process.last is None or _process.marker_written:
        return None
    store, record = _process.last
    contract = Contract.from_env()
    _process.root.write_marker(
        {
            "step": record.step,
            # Past the record's step when the final save failed: those steps are redone.
            "left_at": max(record.step, _process.step),
            "checkpoint": _process.relative_name(store, record),
            "plan": "full",
            "signal": signal_name,
            "after_fit": True,
            "time": time.time(),
            "experiment": contract.experiment,
            "attempt": contract.attempt,
        }
    )
    _process.marker_written = True
    return record


def _held_by(record: CommitRecord) -> str:
    """What a relaunch after a notice outside fit resumes from, in words for the log."""
    if record.step >= _process.step:
        return f"the final checkpoint at step {record.step} holds the trained state (0 steps to redo)"
    return (
        f"the final checkpoint could not be saved; the one at step {record.step} is the resume point"
        f" ({_process.step - record.step} steps to redo)"
    )


def _on_signal_outside_fit(sig: signal.Signals) -> None:
    """The guard's action for a notice outside any fit: record it, then leave with status 0."""
    record = None
    try:
        record = _write_marker_outside_fit(sig.name)
    except Exception as exc:  # the exit must still happen, and with status 0
        log.warning("lightning_grid: the preemption marker could not be written: %s", exc)
    if record is not None:
        log.info(
            "lightning_grid: %s received after training; %s; exiting with status 0",
            sig.name,
            _held_by(record),
        )
    else:
        log.info("lightning_grid: %s received; exiting with status 0", sig.name)
    leaving.prepare(_process.fast_exit)
    raise Preempted(_process.step)


def _at_exit() -> None:
    """The process's last word (its signals already ignored): COMPLETED only when no notice came."""
    if _process.root is None:
        return
    if guard.received is not None:
        _write_marker_outside_fit(guard.received.name)
        return
    if _process.marker_written:
        return
    _process.root.write_marker({"step": _process.step, "time": time.time()}, COMPLETED_MARKER)


class Resumable(Callback):
    """Make a Lightning run survive SIGTERM (and, with periodic saves, SIGKILL) without losing work.

    Args:
        dirpath: fsspec URL for checkpoints. Default: ``$LIGHTNING_GRID_CHECKPOINTS`` when the launcher
            set it, else ``<default_root_dir>/resumable``.
        every_n_train_steps: also save every N optimizer steps (for hard kills), in a background thread.
            0 or None: off (as in ``ModelCheckpoint``).
        train_time_interval: also save every this much training time (a ``timedelta``, as in
            ``ModelCheckpoint``), in a background thread. 0 or None: off.
        every_n_seconds: the same as ``train_time_interval``, in seconds (give one of the two).
        keep: committed checkpoints to keep (newest first).
        signals: signals that mean "checkpoint and exit": SIGTERM by default; add SIGUSR1 for clusters
            that warn with it.
        resume: look for the newest valid checkpoint at start and continue from it.
        storage_options: passed to fsspec (credentials, endpoint URLs).
        fast_exit: once a preemption checkpoint is durable, end the process as soon as Python's
            exit work (threads, ``atexit`` handlers, logging, the script's open files, the standard
            streams) has run, without module teardown and C-level exit handlers (libtorch's static
            destructors): 0.1–0.2 s of the window at 10 MB, more for large models. The exit
            status is kept. False for a library whose ``__del__`` or C exit handler must run (an
            HDF5 file left open).
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str] | None = None,
        every_n_train_steps: int | None = None,
        every_n_seconds: float | None = None,
        keep: int = 3,
        signals: Iterable[int] = (signal.SIGTERM,),
        resume: bool = True,
        storage_options: dict[str, Any] | None = None,
        train_time_interval: timedelta | None = None,
        fast_exit: bool = True,
    ) -> None:
        if every_n_train_steps is not None and every_n_train_steps < 0:
            raise ValueError(f"every_n_train_steps must be >= 0 (0: off), got {every_n_train_steps}")
        if every_n_seconds is not None and every_n_seconds < 0:
            raise ValueError(f"every_n_seconds must be >= 0 (0: off), got {every_n_seconds}")
        if train_time_interval is not None:
            if every_n_seconds:
                raise ValueError("give train_time_interval or every_n_seconds, not both")
            every_n_seconds = train_time_interval.total_seconds()
            if every_n_seconds < 0:
                raise ValueError(f"train_time_interval must not be negative, got {train_time_interval}")
        every_n_train_steps = every_n_train_steps or None  # 0: off
        every_n_seconds = every_n_seconds or None
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.dirpath = os.fspath(dirpath) if dirpath is not None else None
        self.every_n_train_steps = every_n_train_steps
        self.every_n_seconds = every_n_seconds
        self.keep = keep
        self.resume = resume
        self.storage_options = storage_options
        self.fast_exit = fast_exit
        self._flag = SignalFlag(signals)
        self._signal_numbers = tuple(int(s) for s in self._flag.signals)
        self._from_factory = False
        self._active = True
        self.store: CheckpointStore | None = None
        self._state_for_dump: dict[str, Any] | None = None
        self._sharded_resume: CommitRecord | None = None  # a sharded checkpoint to restore at fit start
        self._logs_flushed = threading.Event()
        self._background = Writer()  # the thread that writes (and commits) while training goes on
        self._snapshots = Snapshots()  # the periodic save's host copies, kept from save to save
        self._reset_run_state()
        self._trainer_ref: pl.Trainer | None = None
        self._last_save_step = 0
        self._last_save_time = time.monotonic()
        self._warned_loaders: set[int] = set()
        self._restore_limits: Any = None
        self._progress_path = Contract.from_env().progress_file
        self._progress_fd: int | None = None
        # A LightningCLI script refuses to start where its config file exists: a resumed run is the
        # same run. Patched only once LightningCLI is imported, only for trainers that can resume.
        _lightning.tolerate_same_cli_config(_may_resume)

    @property
    @override
    def state_key(self) -> str:
        return _FACTORY_STATE_KEY if self._from_factory else _STATE_KEY

    # -- set-up ------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer_ref = trainer
        self._reset_run_state()
        others = [cb for cb in trainer.callbacks if isinstance(cb, Resumable) and cb is not self]  # type: ignore[attr-defined]
        if self._from_factory and others:
            self._active = False  # the user added one explicitly: it is in charge
            return
        global _fits_in_process
        _fits_in_process += 1
        root_url = url = self._resolve_url(trainer)
        if _fits_in_process > 1:
            url = f"{url.rstrip('/')}/fit-{_fits_in_process}"
        self.store = CheckpointStore(url, storage_options=self.storage_options)
        sharded.check_store(trainer, self.store)  # before anything trains: a folder every rank writes
        if trainer.is_global_zero:
            self.store.check_writable()
            self.store.remove_uncommitted()
            if _process.root_url != root_url:
                # Markers describe this process: last time's go (the launcher clears them too).
                _process.root_url = root_url
                _process.root = CheckpointStore(root_url, storage_options=self.storage_options, retries=1)
                _process.root.clear_marker()
                _process.root.clear_marker(COMPLETED_MARKER)
        trainer.strategy.barrier("lightning_grid.setup")
        guard.arm(self._signal_numbers, _on_signal_outside_fit, _at_exit)
        _process.fast_exit = self.fast_exit
        if self.fast_exit:
            leaving.note_installed_modules()
        self._flag.install()
        # Ours runs last at a batch end, so other callbacks' state for that batch is included. A new
        # list, because Lightning is iterating over the current one to call setup().
        trainer.callbacks = [cb for cb in trainer.callbacks if cb is not self] + [self]  # type: ignore[attr-defined]
        _lightning.wrap_train_loaders(trainer, self._make_loader, self._drop_loaders)
        _lightning.wrap_val_loaders(trainer, lambda dl: shield_workers(dl, self._signal_numbers))
        if self.resume:
            self._resume_from_store(trainer, pl_module)
        self._last_save_step = trainer.global_step
        self._last_save_time = time.monotonic()

    def _reset_run_state(self) -> None:
        """Per-fit state: a callback object may serve several fits, and nothing carries over."""
        self.last_commit: CommitRecord | None = None
        self.resumed_from: CommitRecord | None = None
        self._loaders: list[ResumableLoader] = []
        self._loader_states: list[dict[str, Any]] | None = None
        self._resume_rng: dict[str, Any] | None = None
        self._writer: Job | None = None  # the save being written, if any
        self._write_error: BaseException | None = None
        # A periodic sharded save DCP is still writing (on every rank), and DCP's own gloo group.
        self._in_flight: sharded.InFlight | None = None
        self._dcp_group: Any = None
        self._exit_after_commit = False
        self._awaiting_flush = False
        self._val_iterated = False
        self._cancel_val_worker_seed = False
        self._rng_before_val: dict[str, Any] | None = None
        self._plan: ShutdownNotice | None = None
        self._spool: CheckpointStore | None = None
        self._spooled: CommitRecord | None = None
        self._cut_any = False  # a checkpoint was cut in this fit (on every rank; rank 0 writes it)
        self._final_rng: dict[str, Any] | None = None
        self._fit_over = False  # the final checkpoint is committed (or was restored): nothing to train
        self._ddp_layout: ddp_buckets.Layout | None = None  # the resumed-from run's gradient buckets
        self._flag.received = None

    def _resolve_url(self, trainer: pl.Trainer) -> str:
        if self.dirpath:
            return self.dirpath
        contract = Contract.from_env()
        if contract.checkpoints:
            return contract.checkpoints
        return os.path.join(trainer.default_root_dir, "resumable")

    def _resume_from_store(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.store is not None
        if trainer.is_global_zero:
            try:  # a checkpoint saved here while the store was down goes up first
                self.store.recover_spooled()
            except (StoreError, OSError) as exc:
                log.warning("lightning_grid: a spooled checkpoint could not be uploaded yet: %s", exc)
        trainer.strategy.barrier("lightning_grid.recover_spooled")
        found = self.store.latest_valid()
        if found is None:
            return
        record, data = found
        location = self.store.location(record.name)
        # -- sharded strategies (FSDP/DCP): the shards are restored at on_fit_start, see sharded.py --
        self._sharded_resume = record if record.is_folder else None
        if record.is_folder != sharded.enabled(trainer):
            what = "a sharded (DCP) folder" if record.is_folder else "a single file"
            raise CheckpointMismatchError(
                f"checkpoint {location} (step {record.step}) is {what}, which this run's strategy"
                f" ({type(trainer.strategy).__name__}) does not restore: point Resumable(dirpath=...) or"
                " LIGHTNING_GRID_CHECKPOINTS at this run's own folder, or remove it"
            )
        if record.is_folder:
            checkpoint = sharded.read_metadata(self.store, record)
        else:
            checkpoint = self.store.load_bytes(data)
            self._check_same_model(pl_module, checkpoint, location, record.step)
        # -- end sharded ---------------------------------------------------------------------------
        callback_states = checkpoint.setdefault("callbacks", {})
        ours = callback_states.get(_STATE_KEY) or callback_states.get(_FACTORY_STATE_KEY) or {}
        if ours:
            callback_states[self.state_key] = ours  # whichever instance wrote it, this one reads it
        mine = self._rank_state(trainer, ours)
        if mine is not None:
            for logger, version in zip(trainer.loggers, mine.get("logger_versions", [])):
                if version is not None:
                    _lightning.reopen_logger(
                        logger, version, int(mine["logged_step"]), trainer.is_global_zero
                    )
            # Lightning would warn that a plain loader cannot resume mid-epoch; ours can.
            warnings.filterwarnings(
                "ignore", message="You're resuming from a checkpoint that ended before the epoch"
            )
        _lightning.inject_checkpoint(trainer, checkpoint)
        self.resumed_from = record
        _process.last = (self.store, record)
        final = ours.get("final") if isinstance(ours, dict) else None
        finished = final is not None and _same_limits(trainer, final)
        if finished:
            # Restores model, optimizers, loops and callbacks, then trains nothing: the code after
            # fit() runs on the final weights, as it would have in the run that finished.
            self._restore_limits = _lightning.skip_training(trainer)
        if not trainer.is_global_zero:
            return
        if finished:
            log.info(
                "lightning_grid: this fit had already finished (step %d): its final state is restored from %s and"
                " no training is redone",
                record.step,
                location,
            )
        elif final is not None:
            log.info(
                "lightning_grid: continuing the finished fit in %s (step %d) under new limits (max_epochs=%s,"
                " max_steps=%s)",
                location,
                record.step,
                trainer.max_epochs,
                trainer.max_steps,
            )
        else:
            log.info("lightning_grid: resuming from %s (step %d, %s)", location, record.step, record.reason)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # -- sharded strategies: the model and optimizers exist now, sharded; Lightning restores
        # the rest (loops, schedulers, callbacks) from the injected meta.pt right after this hook.
        record, self._sharded_resume = self._sharded_resume, None
        if record is not None and self._active and self.store is not None:
            sharded.restore_shards(trainer, self.store, record)

    def _rank_state(self, trainer: pl.Trainer, state: dict[str, Any]) -> dict[str, Any] | None:
        """This rank's part of the checkpoint.

        Written by a world of another size (spot capacity came back short, or larger), there is no
        "own" part: the RNG is chosen by :func:`reshard.rng_for_rank`, the logger's place is rank
        0's, and each train loader gets every old rank's position, to re-shard the rest of the
        epoch when the loader is built (:meth:`_make_loader`).
        """
        ranks = state.get("ranks")
        if not ranks:
            return None
        if len(ranks) == trainer.world_size:
            return dict(ranks[trainer.global_rank])
        first = ranks[0]
        return {
            "rng": reshard.rng_for_rank([r["rng"] for r in ranks], trainer.global_rank),
            "loaders": [{"resize": [r["loaders"][i] for r in ranks]} for i in range(len(first["loaders"]))],
            "logged_step": first["logged_step"],
            "logger_versions": first.get("logger_versions", []),
            "val_iterated": False,  # an exact-replay correction: nothing is replayed exactly here
            "resized_from": len(ranks),
        }

    @staticmethod
    def _check_same_model(
        pl_module: pl.LightningModule, checkpoint: dict[str, Any], where: str, step: int
    ) -> None:
        if not pl_module.strict_loading or is_overridden("configure_model", pl_module):
            return  # layers created later, or partial loading was asked for: Lightning decides
        saved = checkpoint.get("state_dict") or {}
        current = pl_module.state_dict()
        missing = sorted(set(current) - set(saved))
        unexpected = sorted(set(saved) - set(current))
        shapes = [
            f"{k} {tuple(saved[k].shape)}→{tuple(current[k].shape)}"
            for k in sorted(set(saved) & set(current))
            if hasattr(saved[k], "shape") and tuple(saved[k].shape) != tuple(current[k].shape)
        ]
        if missing or unexpected or shapes:
            parts = []
            if missing:
                parts.append(f"missing {missing[:5]}")
            if unexpected:
                parts.append(f"unexpected {unexpected[:5]}")
            if shapes:
                parts.append(f"different shapes {shapes[:5]}")
            raise CheckpointMismatchError(
                f"checkpoint {where} (step {step}) was written for a different model ({'; '.join(parts)}):"
                " point Resumable(dirpath=...) or LIGHTNING_GRID_CHECKPOINTS at this run's own folder, or remove it"
            )

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self._active or not state_dict.get("ranks"):
            return
        trainer = self._trainer_ref
        mine = self._rank_state(trainer, state_dict) if trainer is not None else None
        if mine is None:
            return
        self._loader_states = list(mine.get("loaders", []))
        if state_dict.get("final") is not None:
            # The state at the end of training: for the code after fit() (put back at teardown),
            # never for training steps.
            self._final_rng = mine.get("rng")
            return
        if mine.get("resized_from") and not self._loader_states:
            self._resize_fallback(int(mine["resized_from"]), "no train loader position was saved")
            return
        self._resume_rng = mine.get("rng")
        self._ddp_layout = state_dict.get("ddp_buckets")
        # Persistent validation workers already existed in the interrupted process (made during the
        # sanity check, which a resumed fit skips): creating them again here draws one base seed
        # from the global RNG that the original run never drew.
        self._cancel_val_worker_seed = bool(mine.get("val_iterated"))

    def _drop_loaders(self) -> None:
        """Lightning is about to build new train loaders: the old ones (and their workers) go, and
        positions are counted in the new set only."""
        for loader in self._loaders:
            loader.close()
        self._loaders = []

    def _make_loader(self, loader: Any) -> Any:
        if not can_make_resumable(loader):
            if id(loader) not in self._warned_loaders and not hasattr(loader, "state_dict"):
                self._warned_loaders.add(id(loader))
                warnings.warn(
                    f"lightning_grid: the train loader {type(loader).__name__} cannot be resumed mid-epoch exactly"
                    " (an IterableDataset, a custom batching or iteration scheme); give it state_dict/load_state_dict"
                    " or use a map-style dataset",
                    stacklevel=2,
                )
            return shield_workers(loader, self._signal_numbers)
        wrapped = ResumableLoader(loader, self._signal_numbers)
        index = len(self._loaders)
        self._loaders.append(wrapped)
        states = self._loader_states
        if states is not None and index < len(states):
            if "resize" in states[index]:
                self._reshard_loader(wrapped, states[index]["resize"], len(states))
            else:
                rank = self._trainer_ref.global_rank if self._trainer_ref is not None else None
                wrapped.load_position_state(states[index], rank=rank)
        return wrapped

    def _reshard_loader(self, loader: ResumableLoader, old: list[dict[str, Any]], loaders: int) -> None:
        """The checkpoint was cut by ``len(old)`` processes: give this rank its share of the rest of
        the interrupted epoch (every remaining sample trained once across the new world, the same
        number of batches on every rank), or say why not and restart the epoch's data as before."""
        trainer = self._trainer_ref
        assert trainer is not None
        try:
            if loaders != 1:
                raise reshard.CannotReshard(
                    f"the checkpoint has {loaders} train loaders; one can be re-sharded"
                )
            accumulate = (
                trainer.accumulate_grad_batches if trainer.lightning_module.automatic_optimization else 1
            )
            plan = reshard.plan_resize(
                loader, old, trainer.world_size, trainer.global_rank, trainer.limit_train_batches, accumulate
            )
        except reshard.CannotReshard as exc:
            self._resize_fallback(len(old), str(exc))
            return
        loader.load_resharded(plan.batches, plan.order)
        reshard.shift_epoch_progress(trainer, plan.offset)
        if trainer.is_global_zero:
            log.info("%s", plan.message(len(old), trainer.world_size))

    def _resize_fallback(self, old_world: int, reason: str) -> None:
        """A checkpoint of another world size that cannot be re-sharded: the model, optimizer and
        loops resume; the epoch's data restarts from its beginning and the RNG is not restored."""
        self._resume_rng = None
        trainer = self._trainer_ref
        if trainer is not None and trainer.is_global_zero:
            log.warning(
                "lightning_grid: the checkpoint was written by %d processes, this run has %d: the model and"
                " optimizer resume, the data order and RNG do not (%s)",
                old_world,
                trainer.world_size,
                reason,
            )

    # -- training ----------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        # Lightning installed its SIGTERM handler after our set-up; ours must decide when to stop.
        if _lightning.take_lightning_sigterm(trainer):
            self._flag.set()
        self._flag.install()
        self._loader_states = None  # applied to the loaders built for this fit
        _process.last = None  # training goes past the checkpoint resumed from (if any)
        ddp_buckets.replay(trainer.strategy.model, self._ddp_layout)
        self._ddp_layout = None

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._active:
            return
        if self._resume_rng is not None:
            # With workers (or no batch fetched since the restore) nobody has put the training
            # process's RNG back yet; with num_workers=0 the loader did it right before building the
            # first batch that the interrupted run had not fetched.
            if not any(loader.main_rng_applied for loader in self._loaders):
                rng.restore(self._resume_rng)
            self._resume_rng = None
        if self._awaiting_flush:
            self._release_commit(trainer)
        if self._exit_after_commit:
            self._finish_preemption(trainer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active:
            return
        self._note_progress(trainer)
        if self._writer is not None and not self._writer.is_alive():
            self._reap_writer()
        if (
            self._cancel_val_worker_seed
            and _persistent_val_workers(trainer)
            and _lightning.validation_due_after_batch(trainer)
        ):
            self._rng_before_val = rng.capture()
        in_flight = self._in_flight
        signalled, due, busy, writing = self._agree(
            trainer,
            bool(self._flag),
            self._periodic_due(trainer),
            self._writer is not None or in_flight is not None,
            in_flight is not None and in_flight.running(),
        )
        if in_flight is not None and not writing:
            self._finish_in_flight(trainer)  # every rank's part is written: commit it
        plan = None
        if signalled:
            plan = self._plan = self._plan or self._agreed_plan(
                trainer, self._shutdown_plan(bool(self._flag))
            )
        if plan is not None and plan.plan is Plan.KEEP:
            # Nothing new is saved, so any batch end will do: leave at the next batch start.
            self._flag.set()
            self._exit_after_commit = True
            return
        if not (signalled or due) or not self._is_clean_cut(trainer, batch_idx):
            return
        if plan is not None:
            self._flag.set()
            if in_flight is not None and plan.plan is not Plan.KEEP:
                plan = self._plan = self._replan_after_write(trainer, plan, in_flight)
                if plan.plan is Plan.KEEP:
                    self._exit_after_commit = True
                    return
            spool = plan.spool if plan.plan is Plan.LOCAL else None
            # Training stops here, so the live tensors can be written without a copy.
            self._save(trainer, batch_idx + 1, reason="preempted", copy_tensors=False, spool=spool)
            self._exit_after_commit = True
        elif not busy:
            self._save(trainer, batch_idx + 1, reason="periodic", copy_tensors=True)

    def _note_progress(self, trainer: pl.Trainer) -> None:
        """Under the launcher, at every batch end: the step reached, so that after a SIGKILL the
        steps past the newest checkpoint are billed as redone. One small write at a fixed offset
        (no rename, no fsync: a single system call), best effort, never in the way."""
        if self._progress_path is None or not trainer.is_global_zero:
            return
        try:
            if self._progress_fd is None:
                self._progress_fd = os.open(self._progress_path, os.O_WRONLY | os.O_CREAT, 0o600)
            os.pwrite(self._progress_fd, f"{trainer.global_step:>20d}\n".encode(), 0)
        except OSError:
            self._progress_path = None  # a launcher's private folder that went away: stop trying

    def _shutdown_plan(self, signalled_here: bool) -> ShutdownNotice:
        """What the launcher said fits the notice's window (a full save when nobody said anything,
        and whenever there is no committed checkpoint to keep instead).

        A scheduler may signal the script and the launcher at the same moment (SLURM sends both
        SIGTERM at a preemption): a batch end right after it would find no plan yet and choose a
        full save that the window cannot hold. So a process that got the signal itself, under a
        launcher that writes plans, waits up to ``PLAN_WAIT_S`` for the plan (it comes within the
        launcher's 0.1 s poll)."""
        path = Contract.from_env().notice_file
        notice = read_notice(path)
        if notice is None and path and signalled_here:
            deadline = time.monotonic() + PLAN_WAIT_S
            while notice is None and time.monotonic() < deadline:
                time.sleep(0.01)
                notice = read_notice(path)
        if notice is None or (notice.plan is Plan.KEEP and not self._has_fallback()):
            return ShutdownNotice(Plan.FULL, deadline=0.0, window_s=0.0)
        if notice.plan is Plan.LOCAL and not notice.spool:
            return ShutdownNotice(Plan.FULL, deadline=notice.deadline, window_s=notice.window_s)
        if notice.plan is not Plan.FULL:
            log.info("lightning_grid: %s", notice.reason or f"shutdown plan: {notice.plan.value}")
        return notice

    @staticmethod
    def _agreed_plan(trainer: pl.Trainer, mine: ShutdownNotice) -> ShutdownNotice:
        """One plan for every rank. The launcher's plan file is on the noticed machine only (other
        nodes learn of the notice through the collective), so the shortest plan any rank read wins:
        if one machine has no time for a save, nobody starts one (all ranks must take part in a
        save, or none). Only rank 0 writes, so ``local`` versus ``full`` is rank 0's own choice."""
        if not _distributed(trainer):
            return mine
        order = {Plan.KEEP: 0, Plan.LOCAL: 1, Plan.FULL: 2}
        code = torch.tensor([order[mine.plan]], device=trainer.strategy.root_device)
        agreed = int(trainer.strategy.reduce(code, reduce_op="min").item())
        if agreed == 0 and mine.plan is not Plan.KEEP:
            return ShutdownNotice(
                Plan.KEEP,
                deadline=mine.deadline,
                window_s=mine.window_s,
                reason="another node's notice leaves no time for a new save: the last checkpoint stays",
            )
        return mine

    def _replan_after_write(
        self, trainer: pl.Trainer, plan: ShutdownNotice, in_flight: sharded.InFlight
    ) -> ShutdownNotice:
        """A periodic sharded save was being written in the background when the notice came, and
        the launcher's plan did not count it. It is finished and committed first (it is
        consistent, and it may be all the window holds); a new save then starts only if what is
        left of the window holds one as long as that write took, with the launcher's margins.
        Otherwise nothing new is saved and the folder just committed is the resume point: leaving
        in time, with the marker written, beats a save cut off by the machine's end. Every rank
        decides alike: the noticed machine's deadline counts for all."""
        self._settle(trainer)
        took = (
            (in_flight.done_at or time.monotonic())
            - in_flight.started
            + float(in_flight.meta.get("dump_s", 0))
        )
        left = plan.deadline - time.time() if plan.deadline > 0 else float("inf")
        short = left < took * MARGIN + EXIT_OVERHEAD_S
        # Only rank 0 commits, so only rank 0 knows whether anything is committed to fall back on.
        stranded = trainer.is_global_zero and self.last_commit is None and self.resumed_from is None
        if _distributed(trainer):
            flags = torch.tensor([int(short), int(stranded)], device=trainer.strategy.root_device)
            flags = trainer.strategy.reduce(flags, reduce_op="max")
            short, stranded = bool(flags[0].item()), bool(flags[1].item())
        if not short or stranded:
            return plan
        reason = (
            f"a periodic save was being written when the notice came (it took {took:.1f}s); the"
            f" {max(left, 0.0):.1f}s left of the window do not hold another: the checkpoint it wrote stays"
        )
        if trainer.is_global_zero:
            log.info("lightning_grid: %s", reason)
        return ShutdownNotice(Plan.KEEP, deadline=plan.deadline, window_s=plan.window_s, reason=reason)

    def _has_fallback(self) -> bool:
        """Whether a run that saves nothing more still has a checkpoint to resume from (a write in
        flight commits before the exit). The same answer on every rank: only rank 0 writes."""
        return self._cut_any or self.resumed_from is not None

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_iterated = True
        if self._rng_before_val is not None:
            rng.restore(self._rng_before_val)
            self._rng_before_val = None
            self._cancel_val_worker_seed = False

    def _periodic_due(self, trainer: pl.Trainer) -> bool:
        if (
            self.every_n_train_steps
            and trainer.global_step - self._last_save_step >= self.every_n_train_steps
        ):
            return True
        return bool(self.every_n_seconds and time.monotonic() - self._last_save_time >= self.every_n_seconds)

    @staticmethod
    def _agree(
        trainer: pl.Trainer, signalled: bool, due: bool, busy: bool, writing: bool = False
    ) -> tuple[bool, bool, bool, bool]:
        """All ranks must cut the same checkpoint: a signal, a due save or a write still in flight
        (only rank 0 writes; with sharded saves, a background write on any rank: ``writing``) on any
        rank counts for all."""
        if not _distributed(trainer):
            return signalled, due, busy, writing
        flags = torch.tensor(
            [int(signalled), int(due), int(busy), int(writing)], device=trainer.strategy.root_device
        )
        flags = trainer.strategy.reduce(flags, reduce_op="max")  # one collective for the four
        return bool(flags[0].item()), bool(flags[1].item()), bool(flags[2].item()), bool(flags[3].item())

    @staticmethod
    def _is_clean_cut(trainer: pl.Trainer, batch_idx: int) -> bool:
        loop = trainer.fit_loop.epoch_loop
        if loop.batch_progress.is_last_batch or batch_idx + 1 >= trainer.num_training_batches:
            return False
        if trainer.should_stop or (0 <= trainer.max_steps <= trainer.global_step):
            return False
        if (
            trainer.lightning_module.automatic_optimization
            and (batch_idx + 1) % trainer.accumulate_grad_batches
        ):
            return False
        return not _lightning.validation_due_after_batch(trainer)

    # -- saving ------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        # Filled only while we cut a checkpoint: other checkpoints (ModelCheckpoint's) carry no
        # loader position, so resuming from them never pretends to be exact.
        return self._state_for_dump or {}

    def _save(
        self, trainer: pl.Trainer, consumed: int, reason: str, copy_tensors: bool, spool: str | None = None
    ) -> None:
        self._settle(trainer)
        started = time.monotonic()
        main_rng = rng.capture()
        final = reason == "final"
        mine = {
            "rng": main_rng,
            # A final checkpoint is never trained from: no loader positions.
            "loaders": []
            if final
            else [
                ld.position_state(consumed, main_rng, trainer.num_training_batches) for ld in self._loaders
            ],
            "logged_step": _lightning.logged_step(trainer),
            "logger_versions": [getattr(lg, "version", None) for lg in trainer.loggers],
            "val_iterated": self._val_iterated or self._cancel_val_worker_seed,
        }
        ranks = _gather(trainer, mine)
        self._state_for_dump = {
            "version": _STATE_VERSION,
            "ranks": ranks,
            "reason": reason,
            "ddp_buckets": ddp_buckets.capture(trainer.strategy.model),
        }
        if final:
            # A relaunch under the same limits returns from fit() at once; under others it trains on.
            self._state_for_dump["final"] = {"max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps}
        try:
            checkpoint = _lightning.dump_checkpoint(trainer)
        finally:
            self._state_for_dump = None
        step = trainer.global_step
        self._last_save_step = step
        self._last_save_time = time.monotonic()
        self._cut_any = True
        self._awaiting_flush = True
        # -- sharded strategies (FSDP/DCP): every rank writes its shard, see sharded.py -------------
        if sharded.enabled(trainer):
            self._save_sharded(
                trainer, checkpoint, step, reason, consumed, mine["logged_step"], started, copy_tensors
            )
            return
        # -- end sharded ---------------------------------------------------------------------------
        if not trainer.is_global_zero:
            return
        copies: list[Any] = []  # events the writer waits for: device → host copies in flight
        if copy_tensors:
            # Training goes on and changes the live tensors: write a private copy (device tensors
            # are copied in stream order, without blocking: the step does not wait for them).
            checkpoint = self._snapshots.take(checkpoint, copies)
        self._logs_flushed.clear()
        self._write_error = None
        meta = {
            "epoch": trainer.current_epoch,
            "batch_in_epoch": consumed,
            "logged_step": mine["logged_step"],
            "dump_s": round(time.monotonic() - started, 4),
        }
        store = self.store
        if spool is not None:
            # A folder on this machine's disk: the launcher uploads from it after the exit.
            store = self._spool = CheckpointStore(spool)
        self._writer = self._background.submit(self._write, store, checkpoint, step, reason, meta, copies)

    def _write(
        self,
        store: CheckpointStore,
        checkpoint: dict[str, Any],
        step: int,
        reason: str,
        meta: dict[str, Any],
        copies: Iterable[Any] = (),
    ) -> None:
        try:
            for copied in copies:
                copied.synchronize()  # the snapshot is complete before a byte of it is read
            record = store.save(checkpoint, step, reason=reason, meta=meta, before_commit=self._wait_for_logs)
            if store is self.store:
                self.last_commit = record
                store.prune(self.keep)
            else:
                self._spooled = record
        except BaseException as exc:
            self._failed_write(exc, step, reason)

    def _failed_write(self, exc: BaseException, step: int, reason: str) -> None:
        """Reported on the training thread, except a periodic or final save the store refused: a
        full disk (or a filesystem gone read-only) must not end a run that can still train, nor
        one whose training is over and whose script still has work to do after ``fit()`` (saving
        its weights elsewhere, say). Nothing was committed and no temp file is left, the previous
        checkpoint stays in force, and the next periodic save tries again."""
        if reason not in ("periodic", "final") or not isinstance(exc, StoreWriteError):
            self._write_error = exc
            return
        if reason == "final":
            last = self.last_commit
            log.warning(
                "lightning_grid: the final checkpoint at step %d could not be saved; training is over and the"
                " script goes on (%s): %s",
                step,
                f"a relaunch would resume from the checkpoint at step {last.step}"
                if last is not None
                else "there is no checkpoint: a relaunch would train from the start",
                exc,
            )
            return
        log.warning(
            "lightning_grid: periodic checkpoint at step %d not saved, training continues (the last committed"
            " checkpoint stays; the next periodic save retries): %s",
            step,
            exc,
        )

    # -- sharded strategies (FSDP/DCP), see sharded.py ----------------------------------------------
    def _save_sharded(
        self,
        trainer: pl.Trainer,
        checkpoint: dict[str, Any],
        step: int,
        reason: str,
        consumed: int,
        logged_step: Any,
        started: float,
        copy_tensors: bool,
    ) -> None:
        """Every rank writes its part now (training waits), or, for a periodic save (training
        goes on: ``copy_tensors``), DCP snapshots it and writes it in the background until a later
        batch end. Rank 0 commits the folder in the writer thread once the saved step's logs are
        flushed, as for a single file. A spool (the launcher's ``local`` plan) is not used: the
        folder goes to the store directly."""
        assert self.store is not None
        meta = {
            "epoch": trainer.current_epoch,
            "batch_in_epoch": consumed,
            "logged_step": logged_step,
            "dump_s": round(time.monotonic() - started, 4),
        }
        if trainer.is_global_zero:
            self._logs_flushed.clear()
            self._write_error = None
        if copy_tensors and sharded.async_capable():
            if self._dcp_group is None:
                self._dcp_group = sharded.writer_group()
            self._in_flight = sharded.start_async(
                trainer, self.store, checkpoint, step, reason, meta, self._dcp_group
            )
            return
        outcome: sharded.Pending | BaseException | None
        try:
            outcome = sharded.write(trainer, self.store, checkpoint, step, reason, meta)
        except StoreError as exc:  # on every rank alike; rank 0 reports it as the writer would
            outcome = exc
        self._start_commit(trainer, outcome, step, reason)

    def _finish_in_flight(self, trainer: pl.Trainer) -> None:
        """Every rank, at the same batch end: the background write is done (or is waited for);
        rank 0 commits it."""
        in_flight, self._in_flight = self._in_flight, None
        assert in_flight is not None
        outcome: sharded.Pending | BaseException | None
        try:
            outcome = sharded.finish_async(trainer, in_flight)
        except StoreError as exc:
            outcome = exc
        self._start_commit(trainer, outcome, in_flight.step, in_flight.reason)

    def _start_commit(
        self, trainer: pl.Trainer, outcome: sharded.Pending | BaseException | None, step: int, reason: str
    ) -> None:
        if not trainer.is_global_zero:
            return
        self._writer = self._background.submit(self._commit_sharded, outcome, step, reason)

    def _commit_sharded(
        self, outcome: sharded.Pending | BaseException | None, step: int, reason: str
    ) -> None:
        try:
            if isinstance(outcome, BaseException):
                raise outcome
            assert outcome is not None and self.store is not None
            self._wait_for_logs()
            self.last_commit = sharded.commit(self.store, outcome)
            self.store.prune(self.keep)
        except BaseException as exc:
            self._failed_write(exc, step, reason)

    # -- end sharded -------------------------------------------------------------------------------
    def _wait_for_logs(self) -> None:
        self._logs_flushed.wait()

    def _reap_writer(self) -> None:
        if self._writer is None:
            return
        self._writer.join()
        self._writer = None
        if self._write_error is not None:
            error, self._write_error = self._write_error, None
            if isinstance(error, LightningGridError):
                raise error
            raise LightningGridError(
                f"saving a checkpoint to {self.store.url if self.store else '?'} failed: {error}"
            ) from error

    def _settle(self, trainer: pl.Trainer) -> None:
        """Every rank, before a checkpoint is cut or the run leaves: the save still being written
        is committed first (a sharded one still in flight is waited for)."""
        if self._in_flight is not None:
            self._finish_in_flight(trainer)
        if self._writer is not None:
            self._release_commit(trainer)
            self._reap_writer()

    def _release_commit(self, trainer: pl.Trainer) -> None:
        """The saved batch's metrics were logged after the cut: make them durable, then let the
        writer commit the checkpoint."""
        if self._awaiting_flush:
            self._flush_logs(trainer)
            self._awaiting_flush = False
        self._logs_flushed.set()

    def _flush_logs(self, trainer: pl.Trainer) -> None:
        for logger in trainer.loggers:
            logger.save()
            _lightning.protect_csv_log(logger)

    def _finish_preemption(self, trainer: pl.Trainer) -> None:
        save_error: StoreError | None = None
        try:
            self._settle(trainer)  # every rank is here: a periodic sharded save in flight is finished too
        except StoreError as exc:
            # The preemption save failed (a full disk, a store that did not come back): the newest
            # committed checkpoint is still a valid resume point, and the marker says how far
            # training had got, so the launcher counts the steps to redo honestly.
            save_error = exc
        plan = self._plan.plan if self._plan is not None else Plan.FULL
        signal_name = self._flag.received.name if self._flag.received else "SIGTERM"
        # The marker goes beside the checkpoint it names: the spool for a local save, which the
        # launcher publishes together with it.
        store, record = self.store, self.last_commit
        if isinstance(save_error, StoreUnreachableError):
            # Whole and committed in this machine's private spool: the next run here uploads it
            # before resuming. There is no marker to write (the store is down): exit 0 all the same.
            log.warning(
                "lightning_grid: %s received; the store did not answer, so the checkpoint at step %d is kept"
                " at %s and goes up when the next run here starts; exiting with status 0",
                signal_name,
                trainer.global_step,
                save_error.spooled,
            )
            store = None
        elif save_error is not None:
            record = self.last_commit or self.resumed_from
            if record is None:
                raise SystemExit(
                    f"lightning_grid: {signal_name} received at step {trainer.global_step}; the checkpoint"
                    f" could not be saved and there is no earlier one to resume from: {save_error}"
                )
        elif plan is Plan.LOCAL:
            store, record = self._spool, self._spooled
        elif plan is Plan.KEEP:
            record = self.last_commit or self.resumed_from
        if trainer.is_global_zero and store is not None and record is not None:
            contract = Contract.from_env()
            info = {
                "step": record.step,
                "left_at": trainer.global_step,
                "checkpoint": record.name,
                "plan": plan.value,
                "signal": signal_name,
                "time": time.time(),
                "experiment": contract.experiment,
                "attempt": contract.attempt,
            }
            if save_error is not None:
                info["save_error"] = str(save_error)
            try:
                store.write_marker(info)
                _process.marker_written = True
            except StoreError as exc:
                if save_error is None:  # the new checkpoint is committed: resuming from it is right
                    log.warning("lightning_grid: the preemption marker could not be written: %s", exc)
                else:  # neither the checkpoint nor the marker: say so in one line, not as a success
                    raise SystemExit(
                        f"lightning_grid: {signal_name} received at step {trainer.global_step}; the checkpoint"
                        f" could not be saved ({save_error}) and neither could the marker naming the one at"
                        f" step {record.step}: {exc}"
                    ) from exc
            where = store.location(record.name)
            what = {
                Plan.FULL: f"checkpoint at step {record.step} committed to {where}",
                Plan.LOCAL: f"checkpoint at step {record.step} written to {where} for the launcher to upload",
                Plan.KEEP: f"nothing new saved (no time); the checkpoint at step {record.step} ({where}) stays",
            }[plan]
            if save_error is not None:
                log.warning(
                    "lightning_grid: %s received; the checkpoint at step %d could not be saved (%s); the one at"
                    " step %d (%s) stays the resume point (%d steps to redo); exiting with status 0",
                    signal_name,
                    trainer.global_step,
                    save_error,
                    record.step,
                    where,
                    trainer.global_step - record.step,
                )
            else:
                log.info("lightning_grid: %s received; %s; exiting with status 0", signal_name, what)
        trainer.strategy.barrier("lightning_grid.preempted")
        # Everything is durable now; what is left is leaving, in the notice's window.
        leaving.prepare(self.fast_exit)
        guard.leave()  # until the process is gone, further signals change nothing
        raise Preempted(trainer.global_step)

    # -- the end -----------------------------------------------------------------------------------
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        self._settle(trainer)
        self._snapshots.release()  # no periodic save follows
        # The final checkpoint: a relaunch after this point (a notice in the code after fit, or the
        # same command run again) restores it and trains nothing. Synchronous: fit() returns only
        # once it is committed.
        self._save(trainer, 0, reason="final", copy_tensors=False)
        self._release_commit(trainer)
        self._reap_writer()
        if self.last_commit is not None:
            _process.last = (self.store, self.last_commit)  # type: ignore[assignment]
        _process.step = trainer.global_step
        self._fit_over = True
        trainer.strategy.barrier("lightning_grid.final")
        self._leave_if_signalled(trainer)

    def _leave_if_signalled(self, trainer: pl.Trainer) -> None:
        """A notice that came once training could no longer be cut (its last batches, the final
        save, the teardown): the final checkpoint holds everything, so leave now with status 0 and
        let a relaunch run the code after fit() on the restored state."""
        if not self._fit_over or not self._agree(trainer, bool(self._flag), False, False)[0]:
            return
        signal_name = self._flag.received.name if self._flag.received else "SIGTERM"
        if trainer.is_global_zero:
            try:
                record = _write_marker_outside_fit(signal_name)
            except Exception as exc:
                record = None
                log.warning("lightning_grid: the preemption marker could not be written: %s", exc)
            if record is not None:
                log.info(
                    "lightning_grid: %s received as training ended; %s; exiting with status 0",
                    signal_name,
                    _held_by(record),
                )
        trainer.strategy.barrier("lightning_grid.preempted")
        leaving.prepare(self.fast_exit)
        guard.leave()
        raise Preempted(trainer.global_step)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if not self._active or isinstance(exception, Preempted):
            return
        if self._in_flight is not None:
            # Other ranks may never reach a collective again: this rank's write only ends.
            sharded.abandon_async(self._in_flight)
            self._in_flight = None
        if self._writer is not None:
            # Commit what was being written: it is consistent, and the logs up to it are flushed now.
            self._release_commit(trainer)
            try:
                self._reap_writer()
            except LightningGridError as exc:
                log.error("lightning_grid: %s", exc)
        self._snapshots.release()
        self._flag.uninstall()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self._restore_limits is not None:
            # A fit that had already finished: nothing trained. The code after fit() gets the RNG
            # state the finished run had when its training ended.
            self._restore_limits()
            self._restore_limits = None
            self._fit_over = True
            _process.step = trainer.global_step
            if self._final_rng is not None:
                rng.restore(self._final_rng)
                self._final_rng = None
        if self._active:
            self._leave_if_signalled(trainer)
        self._flag.uninstall()


def _gather(trainer: pl.Trainer, state: dict[str, Any]) -> list[dict[str, Any]]:
    """Each rank's RNG and loader position differ; rank 0 writes them all, each rank reads its own."""
    if not _distributed(trainer):
        return [state]
    gathered: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, state)
    return gathered


def _persistent_val_workers(trainer: pl.Trainer) -> bool:
    loaders = trainer.val_dataloaders
    if loaders is None:
        return False
    if not isinstance(loaders, (list, tuple)):
        loaders = list(loaders.values()) if isinstance(loaders, dict) else [loaders]
    return any(
        getattr(dl, "persistent_workers", False) and getattr(dl, "num_workers", 0) > 0 for dl in loaders
    )


def _distributed(trainer: pl.Trainer) -> bool:
    return trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def _same_limits(trainer: pl.Trainer, final: dict[str, Any]) -> bool:
    """Whether a finished fit's limits are this fit's: then it is the same fit, and it is over."""
    return final.get("max_epochs") == trainer.max_epochs and final.get("max_steps") == trainer.max_steps


def _may_resume(trainer: pl.Trainer) -> bool:
    """Whether ``trainer`` has a Resumable that continues runs from their checkpoints."""
    return any(isinstance(cb, Resumable) and cb.resume for cb in trainer.callbacks)  # type: ignore[attr-defined]
