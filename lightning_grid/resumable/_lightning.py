"""Every use of a private Lightning API, in one place.

Lightning offers no public hook for (a) the train loaders after it has processed them (and the
position of a stateful loader at the last batch trained rather than the last one its fetcher
prefetched), (b) resuming from a checkpoint chosen by a callback, (c) the checkpoint dict without
writing it, (d) whether validation will run after the current batch, (e) reopening a logger's
existing version, (f) ending a fit at once after restoring a finished one, or (g) LightningCLI's
config check on a resumed run. Each
function below is pinned by ``tests/unit/test_lightning_internals.py`` so that a Lightning upgrade
that moves one of them fails loudly there, not silently in a user's resumed run.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import os
import shutil
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.types import _Stateful
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.trainer.connectors.data_connector import _DataLoaderSource
from lightning.pytorch.utilities.combined_loader import CombinedLoader

from lightning_grid._io import atomic_writer

__all__ = [
    "wrap_train_loaders",
    "wrap_val_loaders",
    "inject_checkpoint",
    "dump_checkpoint",
    "validation_due_after_batch",
    "logged_step",
    "take_lightning_sigterm",
    "reopen_logger",
    "protect_csv_log",
    "skip_training",
    "tolerate_same_cli_config",
    "saves_sharded",
    "sharded_metadata_file",
    "sharded_dcp_state",
    "PROCESS_START",
]

PROCESS_START = time.time()


# -- (a) the train loaders, after Lightning processed them (DistributedSampler injected etc.) -------
# Snapshots kept of stateful loaders' positions: Lightning's fetcher is at most a few batches ahead.
_SNAPSHOTS = 8


class _WrappingCombinedLoader(CombinedLoader):
    """Applies a transform to each loader when Lightning assigns the processed loaders.

    For train loaders it also answers Lightning's ``_state_dicts()`` (what a checkpoint stores of a
    loader that has ``state_dict``, e.g. a StatefulDataLoader over an IterableDataset) with each
    loader's state right after the *last batch handed to the training loop*. The live state would
    already count the batches the data fetcher prefetched, and a resumed run would skip them.
    """

    _transform: Callable[[Any], Any]
    # Batches fetched but not handed to the training loop yet; None: do not track (validation).
    _pending: Callable[[], int] | None = None
    _yielded = 0
    _snapshots: deque[tuple[int, list[Any]]] | None = None

    def _set_flattened(self, loaders: list[Any]) -> None:
        CombinedLoader.flattened.fset(self, [self._transform(dl) for dl in loaders])  # type: ignore[attr-defined]

    flattened = property(CombinedLoader.flattened.fget, _set_flattened)  # type: ignore[assignment,attr-defined]

    def _tracked(self) -> list[Any]:
        """Stateful loaders whose own state is their position (ours track theirs themselves)."""
        return [
            dl for dl in self.flattened if _is_stateful(dl) and not getattr(dl, "tracks_own_position", False)
        ]

    def __iter__(self) -> _WrappingCombinedLoader:
        result = super().__iter__()
        self._yielded = 0
        self._snapshots = deque(maxlen=_SNAPSHOTS) if self._pending is not None and self._tracked() else None
        return result  # type: ignore[return-value]

    def __next__(self) -> Any:
        out = super().__next__()
        if self._snapshots is not None:
            self._yielded += 1
            # A copy: a loader may hand out its live (mutable) state.
            self._snapshots.append(
                (self._yielded, [copy.deepcopy(dl.state_dict()) for dl in self._tracked()])
            )
        return out

    def _state_dicts(self) -> list[dict[str, Any]]:
        live = super()._state_dicts()
        if self._snapshots is None or self._pending is None:
            return live
        trained = self._yielded - self._pending()
        found = next((states for count, states in self._snapshots if count == trained), None)
        if found is None:
            return live  # before the first batch, or further behind than we keep: Lightning's own
        tracked = iter(found)
        stateful = [dl for dl in self.flattened if _is_stateful(dl)]
        return [
            next(tracked) if not getattr(dl, "tracks_own_position", False) else state
            for dl, state in zip(stateful, live)
        ]


def _is_stateful(loader: Any) -> bool:
    """Lightning's own test of what ``_state_dicts`` saves (same order)."""
    return isinstance(loader, _Stateful)


def _prefetched(trainer: pl.Trainer) -> int:
    """Batches Lightning's train data fetcher holds that the training loop has not received yet."""
    fetcher = trainer.fit_loop._data_fetcher
    return len(getattr(fetcher, "batches", None) or ())


@dataclass
class _WrappingSource(_DataLoaderSource):
    transform: Callable[[Any], Any] | None = None
    on_new_set: Callable[[], None] | None = None
    pending: Callable[[], int] | None = None

    def dataloader(self) -> Any:
        if self.on_new_set is not None:
            self.on_new_set()  # a fresh set of loaders (first fit, or reload_dataloaders_every_n_epochs)
        loaders = super().dataloader()
        if isinstance(loaders, CombinedLoader):
            combined = _WrappingCombinedLoader(loaders.iterables, loaders._mode)
        else:
            combined = _WrappingCombinedLoader(loaders, "max_size_cycle")
        combined._transform = self.transform  # type: ignore[assignment]
        combined._pending = self.pending
        return combined


def _wrap_source(
    loop: Any,
    transform: Callable[[Any], Any],
    on_new_set: Callable[[], None] | None = None,
    pending: Callable[[], int] | None = None,
) -> None:
    source = loop._data_source
    if isinstance(source, _WrappingSource):
        source.transform = transform
        source.on_new_set = on_new_set
        source.pending = pending
        return
    loop._data_source = _WrappingSource(source.instance, source.name, transform, on_new_set, pending)


def wrap_train_loaders(
    trainer: pl.Trainer, transform: Callable[[Any], Any], on_new_set: Callable[[], None] | None = None
) -> None:
    """Route every train loader Lightning builds for this fit through ``transform``;
    ``on_new_set`` runs before each new set of loaders is requested. Stateful loaders are saved at
    the position of the last batch trained."""
    _wrap_source(trainer.fit_loop, transform, on_new_set, lambda: _prefetched(trainer))


def wrap_val_loaders(trainer: pl.Trainer, transform: Callable[[Any], Any]) -> None:
    """Route every validation loader Lightning builds during fit through ``transform``."""
    _wrap_source(trainer.fit_loop.epoch_loop.val_loop, transform)


# -- (b) resume from a checkpoint the callback found -----------------------------------------------
def inject_checkpoint(trainer: pl.Trainer, checkpoint: dict[str, Any]) -> None:
    """Make the coming restore use ``checkpoint`` as if ``fit(ckpt_path=...)`` had named it.

    Lightning's ``resume_start(None)`` leaves a pre-loaded checkpoint in place, and an explicit
    ``fit(ckpt_path=...)`` still replaces it, so a user's own choice wins.
    """
    trainer._checkpoint_connector._loaded_checkpoint = checkpoint


# -- (c) the checkpoint dict -----------------------------------------------------------------------
def dump_checkpoint(trainer: pl.Trainer) -> dict[str, Any]:
    """What ``trainer.save_checkpoint`` would write (all ranks must call it: some strategies gather)."""
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=False)


# -- (d) the loop's own decisions ------------------------------------------------------------------
def validation_due_after_batch(trainer: pl.Trainer) -> bool:
    """Whether the fit loop will run validation right after the batch that just ended."""
    loop = trainer.fit_loop.epoch_loop
    fetcher = trainer.fit_loop._data_fetcher
    return fetcher is not None and bool(loop._should_check_val_fx(fetcher))


def logged_step(trainer: pl.Trainer) -> int:
    """The ``step`` value loggers get for the batch that just ended."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def take_lightning_sigterm(trainer: pl.Trainer) -> bool:
    """Read and clear Lightning's own SIGTERM flag, so its loop does not abort before our save."""
    connector = trainer._signal_connector
    received = bool(connector.received_sigterm)
    connector.received_sigterm = False
    return received


# -- (e) loggers continue the same version ---------------------------------------------------------
def _created_by_this_process(path: str) -> bool:
    try:
        entries = [os.path.join(root, f) for root, _, files in os.walk(path) for f in files]
    except OSError:
        return False
    return all(os.path.getmtime(e) >= PROCESS_START - 1 for e in entries)


def reopen_logger(logger: Any, version: Any, last_step: int, writer: bool = True) -> bool:
    """Point ``logger`` at the version directory of the interrupted run and drop what came after
    ``last_step`` (the work that is redone), so the log reads as one run. Returns whether it applied.

    Only the writing process (global rank 0) touches files; the others just agree on the version.
    """
    if not writer:
        if isinstance(logger, (CSVLogger, TensorBoardLogger)):
            logger._version = version
            return True
        return False
    if isinstance(logger, CSVLogger):
        return _reopen_csv(logger, version, last_step)
    if isinstance(logger, TensorBoardLogger):
        return _reopen_tensorboard(logger, version, last_step)
    return False


def _discard_fresh_version_dir(logger: Any, version: Any) -> None:
    if logger._experiment is None or logger.version == version:
        return
    fresh = logger.log_dir
    finalize = getattr(logger._experiment, "close", None)
    if callable(finalize):
        with contextlib.suppress(Exception):
            finalize()
    logger._experiment = None
    if os.path.isdir(fresh) and _created_by_this_process(fresh):
        shutil.rmtree(fresh, ignore_errors=True)


_CSV_BACKUP = ".metrics.csv.lightning_grid"


def protect_csv_log(logger: Any) -> None:
    """Keep a hard link to the CSV logger's metrics file.

    Lightning's CSV writer deletes ``metrics.csv`` when it opens an existing version directory,
    before any callback runs; the link keeps the rows (same inode, so appends show through) for
    :func:`reopen_logger` to restore. No copy is made.
    """
    if not isinstance(logger, CSVLogger) or logger._experiment is None:
        return
    metrics = os.path.join(logger.log_dir, "metrics.csv")
    backup = os.path.join(logger.log_dir, _CSV_BACKUP)
    try:
        if os.path.isfile(metrics) and not (os.path.exists(backup) and os.path.samefile(metrics, backup)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(backup)
            os.link(metrics, backup)
    except OSError:
        pass  # filesystems without hard links: the rows survive only if metrics.csv does


def _reopen_csv(logger: CSVLogger, version: Any, last_step: int) -> bool:
    _discard_fresh_version_dir(logger, version)
    logger._version = version
    logger._experiment = None
    metrics = os.path.join(logger.log_dir, "metrics.csv")
    backup = os.path.join(logger.log_dir, _CSV_BACKUP)
    source = metrics if os.path.isfile(metrics) else backup
    kept: list[dict[str, str]] = []
    fieldnames: list[str] = []
    if os.path.isfile(source):
        with open(source, newline="") as handle:
            reader = csv.DictReader(handle)
            fieldnames = list(reader.fieldnames or [])
            for row in reader:
                try:
                    if int(float(row.get("step") or 0)) <= last_step:
                        kept.append(row)
                except ValueError:
                    kept.append(row)
        if source == metrics:
            os.replace(metrics, metrics + ".resume")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
        writer = logger.experiment
    if fieldnames:
        buffer = io.StringIO()
        out = csv.DictWriter(buffer, fieldnames=fieldnames)
        out.writeheader()
        out.writerows(kept)
        with atomic_writer(metrics, "w") as handle:
            handle.write(buffer.getvalue())
        writer.metrics_keys = list(fieldnames)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(metrics + ".resume")
        protect_csv_log(logger)
    return True


def _reopen_tensorboard(logger: TensorBoardLogger, version: Any, last_step: int) -> bool:
    _discard_fresh_version_dir(logger, version)
    logger._version = version
    logger._experiment = None
    # TensorBoard ignores events at or after purge_step in the earlier event files of this run.
    logger._kwargs["purge_step"] = last_step + 1
    return True


# -- (f) a fit that had already finished returns at once ------------------------------------------
def skip_training(trainer: pl.Trainer) -> Callable[[], None]:
    """Make the coming ``fit`` restore its checkpoint and train nothing (no sanity check, no batch,
    no train hooks); returns the function that puts the trainer's limits back (for a later fit).

    Lightning's own "done" test cannot be relied on: a run that ``EarlyStopping`` ended restores
    with ``should_stop`` unset and would train on.
    """
    saved = (trainer.limit_train_batches, trainer.num_sanity_val_steps)
    trainer.limit_train_batches = 0
    trainer.num_sanity_val_steps = 0

    def restore() -> None:
        trainer.limit_train_batches, trainer.num_sanity_val_steps = saved

    return restore


# -- (g) LightningCLI: the same config in a resumed run is not "a previous run" -------------------
_CLI_PATCHED = False


def tolerate_same_cli_config(resuming: Callable[[pl.Trainer], bool]) -> None:
    """Let LightningCLI's ``SaveConfigCallback`` continue a run whose config file is already there
    with the same content, when ``resuming(trainer)`` says a Resumable may continue this run.

    LightningCLI refuses to start where ``config.yaml`` exists, to protect a *previous* run's
    results; a resumed run writes into the directory of the run it continues (the execution and
    log directories are restored on purpose), so it would never start again. A different config
    is still refused, as LightningCLI does; the seed is left out of the comparison, because a
    resumed run restores its weights and every RNG from the checkpoint and LightningCLI draws a
    new random seed per process unless one is given. Applies only once LightningCLI is imported.
    """
    global _CLI_PATCHED
    if _CLI_PATCHED or "lightning.pytorch.cli" not in sys.modules:
        return
    from lightning.pytorch.cli import SaveConfigCallback

    original = SaveConfigCallback.setup

    def setup(self: Any, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.already_saved or self.overwrite or not self.save_to_log_dir or not resuming(trainer):
            return original(self, trainer, pl_module, stage)
        same = _same_cli_config(self, trainer)
        if not same:
            return original(self, trainer, pl_module, stage)
        self.overwrite = True  # identical bytes: writing them again changes nothing
        try:
            return original(self, trainer, pl_module, stage)
        finally:
            self.overwrite = False

    setup.__wrapped__ = original  # type: ignore[attr-defined]
    SaveConfigCallback.setup = setup  # type: ignore[method-assign]
    _CLI_PATCHED = True


def _same_cli_config(callback: Any, trainer: pl.Trainer) -> bool:
    import yaml
    from lightning.fabric.utilities.cloud_io import get_filesystem

    log_dir = trainer.log_dir  # every rank: it broadcasts
    same = False
    if trainer.is_global_zero and log_dir is not None:
        path = os.path.join(log_dir, callback.config_filename)
        try:
            fs = get_filesystem(log_dir)
            if fs.isfile(path):
                saved = yaml.safe_load(fs.cat_file(path))
                current = yaml.safe_load(callback.parser.dump(callback.config, skip_none=False))
                if isinstance(saved, dict) and isinstance(current, dict):
                    saved.pop("seed_everything", None)
                    current.pop("seed_everything", None)
                    same = saved == current
        except Exception:  # unreadable or unparsable: LightningCLI decides, as it always did
            same = False
    return bool(trainer.strategy.broadcast(same))


# -- (h) sharded strategies: FSDP with state_dict_type="sharded", ModelParallelStrategy ----------
def saves_sharded(trainer: pl.Trainer) -> bool:
    """Whether the strategy saves a checkpoint as a DCP folder (one shard per rank, written by every
    rank) rather than one file: ``FSDPStrategy(state_dict_type="sharded")`` and
    ``ModelParallelStrategy(save_distributed_checkpoint=True)`` (its default). Their state dicts
    then hold only each rank's shard, so no single rank can write the whole checkpoint."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        return getattr(strategy, "_state_dict_type", None) == "sharded"
    if isinstance(strategy, ModelParallelStrategy):
        return bool(getattr(strategy, "_save_distributed_checkpoint", False))
    return False


def sharded_metadata_file() -> str:
    """The file in a sharded checkpoint folder that holds everything but the model and optimizer
    shards (loops, callbacks, schedulers...): Lightning's ``meta.pt``, written by rank 0."""
    from lightning.fabric.utilities.load import _METADATA_FILENAME

    return str(_METADATA_FILENAME)


def sharded_dcp_state(trainer: pl.Trainer, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What the sharded strategy's own ``save_checkpoint`` hands to DCP, taken out of Lightning's
    checkpoint dict (which keeps the rest: Lightning's ``meta.pt``): the model shard under the key
    its ``load_checkpoint`` reads (``"model"`` for FSDP, ``"state_dict"`` for ModelParallel) and
    each optimizer's as ``optimizer_<i>``. Needed to hand the same dict to DCP's ``async_save``,
    which the strategies do not call."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    key = "state_dict" if isinstance(trainer.strategy, ModelParallelStrategy) else "model"
    state = {key: checkpoint.pop("state_dict")}
    state.update({f"optimizer_{i}": o for i, o in enumerate(checkpoint.pop("optimizer_states", []))})
    return state
