"""Make an ordinary ``torch.utils.data.DataLoader`` resume mid-epoch, bit-exactly, without replaying data.

Why this exists: a plain ``DataLoader(shuffle=True)`` draws its shuffle seed from the global RNG at
the start of every epoch, its workers reseed from a base seed drawn at ``iter()``, and random
augmentation inside ``__getitem__`` advances whichever RNG the producing process owns (the main
process with ``num_workers=0``, each worker otherwise). None of that is in a Lightning checkpoint,
and Lightning's fetcher has already produced the next batch when a checkpoint is taken. So we:

* record the RNG state (global + the loader's generators) at the moment the epoch's sampler starts,
  and, on resume, replay only the *index* lists up to the resume position (no data is loaded);
* record, in the producing process, the RNG state just before and just after each batch is built
  ("stamps", carried back with the batch and stripped before Lightning sees it), and, on resume,
  hand the producer of each re-built batch the exact state it had the first time;
* keep batch ``b`` on worker ``b % num_workers`` so persistent workers end the epoch where they did.

Each saved position also describes the epoch's order (:mod:`lightning_grid.resumable.reshard`), so
that a relaunch on a different number of processes can re-shard the rest of the epoch.

The user's loader is never iterated: we iterate an internal loader built from its attributes.
"""

from __future__ import annotations

import inspect
import signal
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data._utils.pin_memory import pin_memory as _pin_memory

from lightning_grid.resumable import reshard, rng

__all__ = ["ResumableLoader", "can_make_resumable", "shield_workers"]

# Stamps kept beyond the ones strictly needed: Lightning's fetcher holds at most a couple of batches.
_STAMP_SLACK = 16


class _IndexBatch(list):
    """One batch of indices, with its position in the epoch and (on resume) the RNG state to build it with.

    A list subclass so that datasets and fetchers that expect a list of indices still get one; it
    travels to workers through the index queue, attributes included.
    """

    def __init__(self, indices: Iterable[int], position: int, rng_state: dict[str, Any] | None) -> None:
        super().__init__(indices)
        self.position = position
        self.rng_state = rng_state


class _Items(list):
    """Samples fetched for one batch, with the producer's RNG state from before the fetch."""

    def __init__(self, items: Iterable[Any], position: int, before: dict[str, Any]) -> None:
        super().__init__(items)
        self.position = position
        self.before = before


class _Stamped:
    """A collated batch with its stamps; never reaches the user's code."""

    __slots__ = ("batch", "position", "before", "after")

    def __init__(self, batch: Any, position: int, before: dict[str, Any], after: dict[str, Any]) -> None:
        self.batch = batch
        self.position = position
        self.before = before
        self.after = after

    def pin_memory(self, *args: Any) -> _Stamped:
        # The pin-memory thread calls this instead of recursing into an unknown type.
        return _Stamped(_pin_memory(self.batch, *args), self.position, self.before, self.after)


class _StampingDataset(Dataset):
    """Wraps the user's map-style dataset: applies a requested RNG state, records the state it started from."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> _Items:
        requested = getattr(indices, "rng_state", None)
        if requested is not None:
            rng.restore(requested)
        before = rng.capture(include_cuda=False)
        plain = list(indices)
        inner = getattr(self.dataset, "__getitems__", None)
        items = inner(plain) if callable(inner) else [self.dataset[i] for i in plain]
        return _Items(items, getattr(indices, "position", -1), before)


class _StampingCollate:
    """Wraps the user's collate_fn: the batch comes back with its before/after RNG stamps."""

    def __init__(self, collate_fn: Any) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: Any) -> Any:
        if not isinstance(items, _Items):
            return self.collate_fn(items)
        batch = self.collate_fn(list(items))
        return _Stamped(batch, items.position, items.before, rng.capture(include_cuda=False))


@dataclass
class _EpochOrder:
    """An epoch whose batches are not the sampler's: the rest of an epoch re-sharded for this world."""

    batches: list[list[int]]  # this rank's batches, in order
    order: dict[str, Any]  # their description (reshard.all_batches rebuilds every rank's), with "offset"


@dataclass
class _Plan:
    """How the first iteration after a resume must run."""

    start: int  # first position to produce (aligned down to a worker-cycle boundary)
    first_yield: int  # first position handed to the training loop
    sampler_rng: dict[str, Any]  # RNG state when the original iteration first called iter(sampler)
    fresh: bool  # whether the original iteration created its workers (and drew a base seed)
    base_rng: dict[str, Any] | None  # RNG state right before the base seed of the current workers
    position_rng: dict[int, dict[str, Any]] = field(default_factory=dict)  # num_workers == 0
    slot_rng: dict[int, dict[str, Any]] = field(default_factory=dict)  # num_workers > 0, by worker slot
    sampler_epoch: int | None = None  # the sampler's set_epoch value in the interrupted epoch


def _epoch_of(loader: Any) -> int | None:
    """The epoch the loader's sampler was told (``set_epoch``), for samplers that have one."""
    for owner in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        epoch = getattr(owner, "epoch", None)
        if callable(getattr(owner, "set_epoch", None)) and isinstance(epoch, int):
            return epoch
    return None


def _set_epoch(loader: Any, epoch: int) -> None:
    """``set_epoch`` on the loader's sampler and batch sampler, as Lightning does at an epoch's start."""
    seen: set[int] = set()
    for owner in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        set_epoch = getattr(owner, "set_epoch", None)
        if callable(set_epoch) and id(owner) not in seen:
            seen.add(id(owner))
            set_epoch(epoch)


class _ResumableBatchSampler:
    """Yields the user's index batches as :class:`_IndexBatch`; on resume, skips by indices only.

    ``iter()`` is passed straight through to the user's sampler, at the same moment and as often as
    the DataLoader calls it (torch calls it twice for a multi-process iterator; torchdata's sampler
    draws its permutation right then), so an uninterrupted run draws what it always drew.
    """

    def __init__(self, inner: Iterable[list[int]], owner: ResumableLoader) -> None:
        self.inner = inner
        self.owner = owner
        self.sampler = getattr(inner, "sampler", None)

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[_IndexBatch]:
        owner = self.owner
        plan = owner._active_plan
        first_call, owner._first_sampler_call = owner._first_sampler_call, False
        if plan is not None and plan.sampler_epoch is not None:
            # Lightning builds the resumed epoch's iterator before it calls set_epoch (its data
            # set-up runs ahead of the epoch's start): the interrupted epoch's number goes first,
            # or a DistributedSampler would replay epoch 0's shuffle.
            _set_epoch(owner.loader, plan.sampler_epoch)
        if plan is None:
            if not first_call:
                return self._batches(owner._epoch_iter(), 0, None)
            before = owner._capture_sampler_rng()
            it = owner._epoch_iter()
            owner._sampler_rng = before
            owner._recorded_fresh = owner._iteration_fresh
            if owner._iteration_fresh:
                owner._base_rng = owner._capture_sampler_rng()  # the base seed is drawn next
            return self._batches(it, 0, None)
        owner._sampler_rng, owner._base_rng, owner._recorded_fresh = (
            plan.sampler_rng,
            plan.base_rng,
            plan.fresh,
        )
        if plan.fresh:
            # The original iteration was built like this one: replaying from its first iter() call
            # reproduces the base seed, the shuffle and everything in between.
            if first_call:
                owner._restore_sampler_rng(plan.sampler_rng)
            return self._batches(owner._epoch_iter(), plan.start, None)
        # The original reused persistent workers (no base seed drawn); this iteration starts new ones.
        owner._restore_sampler_rng(plan.sampler_rng)
        it = owner._epoch_iter()
        after_iter = owner._capture_sampler_rng()
        if plan.base_rng is not None:
            owner._restore_sampler_rng(plan.base_rng)  # same base seed as the original workers
        return self._batches(it, plan.start, after_iter)

    def _batches(
        self, it: Iterator[list[int]], start: int, rng_at_first_next: dict[str, Any] | None
    ) -> Iterator[_IndexBatch]:
        owner = self.owner
        if rng_at_first_next is not None:
            owner._restore_sampler_rng(rng_at_first_next)
        try:
            # Walks past consumed batches: index lists only, no data is loaded.
            for _ in range(start):
                next(it)
        except StopIteration:
            return
        position = start
        for indices in it:
            yield _IndexBatch(indices, position, owner._rng_for(position))
            position += 1


class ResumableLoader:
    """Stands in for a user's DataLoader inside Lightning's CombinedLoader.

    Iterates an internal DataLoader with the same dataset, sampler, collate function, workers and
    generator, so an uninterrupted run draws exactly the random numbers the user's loader would.
    """

    # Its position is saved by the callback (see position_state), not by the user's loader's
    # state_dict, which __getattr__ would hand to Lightning.
    tracks_own_position = True

    def __init__(self, loader: DataLoader, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        if not can_make_resumable(loader):
            raise TypeError(f"cannot make {type(loader).__name__} resumable")
        self.loader = loader
        self.num_workers: int = loader.num_workers
        self._persistent = bool(loader.persistent_workers and loader.num_workers > 0)
        self._batch_sampler = _ResumableBatchSampler(loader.batch_sampler, self)  # type: ignore[arg-type]
        self._internal = shield_workers(_build_internal_loader(loader, self._batch_sampler), signals)
        self._workers_alive = False
        self._active_plan: _Plan | None = None
        self._pending_plan: _Plan | None = None
        self._pending_order: _EpochOrder | None = None
        self._order: _EpochOrder | None = None  # this iteration's, when not the sampler's
        self._pending_slot_rng: dict[int, dict[str, Any]] = {}
        self._sampler_rng: dict[str, Any] | None = None
        self._base_rng: dict[str, Any] | None = None
        self._recorded_fresh = True
        self._iteration_fresh = True
        self._first_sampler_call = True
        self._stamps: deque[tuple[int, dict[str, Any], dict[str, Any]]] = deque(
            maxlen=2 * max(1, self.num_workers) + _STAMP_SLACK
        )
        self._last_after: dict[int, dict[str, Any]] = {}
        self._received = -1  # highest position received this epoch
        self.main_rng_applied = False

    # -- what Lightning and user code see -------------------------------------------------------
    def __len__(self) -> int:
        return len(self.loader)

    @property
    def _iterator(self) -> Any:
        # Lightning's teardown shuts workers down through this attribute: point it at ours.
        return self._internal._iterator

    @_iterator.setter
    def _iterator(self, value: Any) -> None:
        self._internal._iterator = value
        if value is None:
            self._workers_alive = False

    def close(self) -> None:
        """Stop the workers now rather than whenever the garbage collector gets to them."""
        iterator = self._internal._iterator
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._iterator = None

    def __getattr__(self, name: str) -> Any:
        # dataset, batch_size, sampler, batch_sampler, ...: the user's loader answers.
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        plan = self._pending_plan
        self._pending_plan = None
        self._active_plan = plan
        self._order, self._pending_order = self._pending_order, None
        self._stamps.clear()
        self._received = -1
        self._iteration_fresh = not (self._persistent and self._workers_alive)
        self._first_sampler_call = True
        if plan is not None:
            self._pending_slot_rng = dict(plan.slot_rng)
        elif self._iteration_fresh:
            self._pending_slot_rng = {}  # fresh workers start from their own seeds
        if self._iteration_fresh:
            self._last_after.clear()
        iterator = iter(self._internal)
        self._workers_alive = self._persistent
        first_yield = plan.first_yield if plan is not None else 0
        return self._unstamp(iterator, first_yield)

    def _unstamp(self, iterator: Iterator[Any], first_yield: int) -> Iterator[Any]:
        for item in iterator:
            if not isinstance(item, _Stamped):  # pragma: no cover - collate bypassed by a custom fetcher
                yield item
                continue
            self._received = item.position
            self._stamps.append((item.position, item.before, item.after))
            if self.num_workers:
                self._last_after[item.position % self.num_workers] = item.after
            if item.position >= first_yield:
                yield item.batch
        self._active_plan = None

    def _epoch_iter(self) -> Iterator[list[int]]:
        """The index batches of this iteration: the user's batch sampler's, or a re-sharded epoch's."""
        if self._order is not None:
            return iter([list(batch) for batch in self._order.batches])
        return iter(self._batch_sampler.inner)

    # -- RNG bookkeeping ---------------------------------------------------------------------------
    def _generators(self) -> list[torch.Generator]:
        batch_sampler = getattr(self.loader, "batch_sampler", None)
        owners = (
            self.loader,
            batch_sampler,
            getattr(self.loader, "sampler", None),
            getattr(batch_sampler, "sampler", None),
        )
        found: dict[int, torch.Generator] = {}
        for owner in owners:
            gen = getattr(owner, "generator", None)
            if isinstance(gen, torch.Generator):
                found[id(gen)] = gen  # one generator shared by several owners is saved once
        return list(found.values())

    def _capture_sampler_rng(self) -> dict[str, Any]:
        return {
            "global": rng.capture(include_cuda=False),
            "generators": [g.get_state() for g in self._generators()],
        }

    def _restore_sampler_rng(self, state: dict[str, Any]) -> None:
        rng.restore(state["global"])
        for gen, gen_state in zip(self._generators(), state["generators"]):
            gen.set_state(gen_state)

    def _rng_for(self, position: int) -> dict[str, Any] | None:
        plan = self._active_plan
        if self.num_workers == 0:
            if plan is None:
                return None
            state = plan.position_rng.get(position)
            if state is not None and position == max(plan.position_rng):
                # The training process's own RNG state: from here on it is what the original run had.
                self.main_rng_applied = True
            return state
        return self._pending_slot_rng.pop(position % self.num_workers, None)

    # -- checkpointing ----------------------------------------------------------------------------
    def position_state(
        self, consumed: int, main_rng: dict[str, Any], epoch_batches: int | float | None = None
    ) -> dict[str, Any]:
        """The loader's position after ``consumed`` batches of this epoch were trained on.

        ``main_rng`` is the training process's RNG state at the checkpoint: with ``num_workers=0``
        it must be in place when the first batch that was not yet fetched gets built.
        ``epoch_batches`` is how many batches the trainer runs per epoch (``limit_train_batches``):
        with the epoch's order it defines the epoch's samples, should the run resume on a different
        number of processes. In a re-sharded epoch the trainer counts from the order's offset.
        """
        if self._order is not None:
            consumed -= int(self._order.order["offset"])
            order: dict[str, Any] | None = self._order.order
        else:
            order = reshard.describe_sampler(self.loader, epoch_batches)
        stamps = {pos: (before, after) for pos, before, after in self._stamps}
        state: dict[str, Any] = {
            "version": 2,
            "consumed": consumed,
            "order": order,
            "num_workers": self.num_workers,
            "sampler_rng": self._sampler_rng,
            "sampler_epoch": _epoch_of(self.loader),
            "fresh": self._recorded_fresh,
            "base_rng": self._base_rng,
        }
        if self.num_workers == 0:
            position_rng = {
                pos: stamps[pos][0] for pos in range(consumed, self._received + 1) if pos in stamps
            }
            position_rng[max(consumed, self._received + 1)] = main_rng
            state["position_rng"] = position_rng
            state["start"] = consumed
        else:
            n = self.num_workers
            start = consumed - consumed % n
            slot_rng: dict[int, dict[str, Any]] = {}
            for slot in range(n):
                position = start + slot
                if position <= self._received and position in stamps:
                    slot_rng[slot] = stamps[position][0]
                elif slot in self._last_after:
                    slot_rng[slot] = self._last_after[slot]
            state["slot_rng"] = slot_rng
            state["start"] = start
        return state

    def load_position_state(self, state: dict[str, Any], rank: int | None = None) -> None:
        """Arm the next ``iter()`` to continue exactly where :meth:`position_state` was taken, by
        the same rank (``rank``: this process's global rank, default its sampler's) of a world of
        the same size."""
        if state.get("num_workers") != self.num_workers:
            raise ValueError(
                f"the checkpoint's train loader had num_workers={state.get('num_workers')}, this one has"
                f" {self.num_workers}: resuming exactly needs the same value"
            )
        order = state.get("order")
        if order is not None and order["kind"] == "resharded":
            if rank is None:
                rank = int(getattr(self.loader.sampler, "rank", 0))
            self._pending_order = _EpochOrder(reshard.all_batches(order)[rank], order)
        if state.get("sampler_rng") is None:
            return
        self._pending_plan = _Plan(
            sampler_epoch=state.get("sampler_epoch"),
            start=int(state["start"]),
            first_yield=int(state["consumed"]),
            sampler_rng=state["sampler_rng"],
            fresh=bool(state.get("fresh", True)),
            base_rng=state.get("base_rng"),
            position_rng=dict(state.get("position_rng", {})),
            slot_rng=dict(state.get("slot_rng", {})),
        )
        self.main_rng_applied = False

    def load_resharded(self, batches: list[list[int]], order: dict[str, Any]) -> None:
        """Make the next ``iter()`` yield ``batches`` (this rank's share of the rest of an epoch
        that a world of another size started; see :func:`reshard.plan_resize`), then the sampler's
        own epochs again. No RNG state is replayed: the batches differ from any earlier run's."""
        self._pending_order = _EpochOrder([list(b) for b in batches], order)
        self._pending_plan = None
        self.main_rng_applied = False


class _ShieldedWorkerInit:
    """Workers ignore the stop signals.

    A machine that is shutting down signals every process, DataLoader workers included; a worker
    that dies makes the main process raise in the middle of the step it is finishing. The main
    process stops its workers itself once the checkpoint is written.
    """

    def __init__(self, inner: Any, signals: tuple[int, ...]) -> None:
        self.inner = inner
        self.signals = signals

    def __call__(self, worker_id: int) -> None:
        for sig in self.signals:
            signal.signal(sig, signal.SIG_IGN)
        if self.inner is not None:
            self.inner(worker_id)


def shield_workers(loader: Any, signals: tuple[int, ...] = (signal.SIGTERM,)) -> Any:
    """Make the workers ``loader`` starts from now on ignore ``signals``; returns ``loader``."""
    if isinstance(loader, DataLoader) and loader.num_workers > 0:
        current = loader.worker_init_fn
        if not isinstance(current, _ShieldedWorkerInit):
            loader.worker_init_fn = _ShieldedWorkerInit(current, signals)
    return loader


def can_make_resumable(loader: Any) -> bool:
    """Map-style datasets with automatic batching in order: the common case we can resume exactly."""
    if not isinstance(loader, DataLoader):
        return False
    if isinstance(loader.dataset, IterableDataset) or loader.batch_sampler is None:
        return False
    if getattr(loader, "in_order", True) is False:
        return False
    # A subclass that changes how iteration works would be bypassed; StatefulDataLoader only adds state.
    return type(loader).__iter__ is DataLoader.__iter__ or _is_torchdata(loader)


def _is_torchdata(loader: DataLoader) -> bool:
    # torchdata's StatefulDataLoader draws its seeds differently from torch's DataLoader, so its
    # stand-in must be a StatefulDataLoader too, or an uninterrupted run would change.
    return type(loader).__module__.split(".")[0] == "torchdata"


def _build_internal_loader(loader: DataLoader, batch_sampler: _ResumableBatchSampler) -> DataLoader:
    kwargs: dict[str, Any] = {
        "batch_sampler": batch_sampler,
        "num_workers": loader.num_workers,
        "collate_fn": _StampingCollate(loader.collate_fn),
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
        "persistent_workers": loader.persistent_workers,
    }
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    cls = type(loader) if _is_torchdata(loader) else DataLoader
    accepted = inspect.signature(cls.__init__).parameters
    if "pin_memory_device" in accepted and str(getattr(loader, "pin_memory_device", None) or ""):
        kwargs["pin_memory_device"] = loader.pin_memory_device
    if "in_order" in accepted:
        kwargs["in_order"] = True
    return cls(_StampingDataset(loader.dataset), **kwargs)
