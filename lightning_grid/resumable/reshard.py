"""Continue an interrupted epoch on a different number of processes, each remaining sample once.

Why this exists: spot capacity often comes back short (or larger). A checkpoint cut by N processes
holds each one's position in its ``DistributedSampler`` list; a relaunch on M processes cannot give
rank ``r`` "its" list any more, and restarting the epoch would train its first part twice.

What "exactly once" means here
------------------------------
The interrupted epoch's sample list is the one the *old* samplers defined: the concatenation of
the N ranks' ``DistributedSampler`` lists (with ``drop_last=False`` it is padded by repeating its
first indices, so a padded sample is in it twice, exactly as an uninterrupted N-process epoch
would have trained it), cut to the batches the epoch had (``drop_last`` of the batch sampler,
``limit_train_batches``). Every entry of that list that no old rank had consumed is trained once
by exactly one new rank. Weights are not bit-identical to an uninterrupted run: batches differ.

How the remainder is ordered and split (:func:`reshard`)
-------------------------------------------------------
* Order: the old ranks' unconsumed samples, interleaved one at a time in rank order. For
  ``DistributedSampler`` lists this is the old sampler's own global order, continued.
* Batches per new rank: ``B = ceil(K / (M * batch_size))`` for ``K`` remaining samples, the
  fewest that keep every batch within ``batch_size``. DDP needs the same number of batches on
  every rank, so the remainder is cut into ``B`` consecutive global batches whose per-rank sizes
  differ by at most one, each dealt round-robin to the ranks as ``DistributedSampler`` deals its
  list. Batches may therefore be smaller than ``batch_size``.
* Edge cases: with ``batch_size=1`` and ``K`` not a multiple of ``M``, ``B = K // M`` and some
  batches hold two samples (nothing is repeated or dropped). With fewer samples than new ranks
  (``K < M``), every rank trains one batch of one sample and ranks ``K..M-1`` repeat the first
  ``M - K`` remaining samples, as ``DistributedSampler(drop_last=False)`` pads: those samples are
  trained twice, and the log says how many.

An epoch that was itself re-sharded is described by the description it was re-sharded from
(:func:`all_batches` rebuilds it), so a second preemption inside it resumes exactly on the same
number of processes, and is re-sharded again on another.

RNG (:func:`rng_for_rank`): new rank ``r`` takes old rank ``r``'s generators when that rank
existed; any other rank gets generators seeded from a value derived from the checkpoint and ``r``.
"""

from __future__ import annotations

import hashlib
import math
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import BatchSampler, DistributedSampler

from lightning_grid.resumable import rng

__all__ = [
    "CannotReshard",
    "Resharded",
    "ResizePlan",
    "all_batches",
    "describe_sampler",
    "plan_resize",
    "remainder",
    "reshard",
    "rng_for_rank",
    "shift_epoch_progress",
    "split",
    "steps_for",
]

Batches = list[list[int]]


class CannotReshard(Exception):
    """The interrupted epoch cannot be re-sharded; the message says why (for the warning)."""


@dataclass(frozen=True)
class Resharded:
    """The remainder of an epoch, split for a new world."""

    batches: list[Batches]  # per new rank, its batches: the same count on every rank
    remaining: int  # samples of the interrupted epoch not trained yet (K)
    repeated: int  # samples trained twice to give every rank a batch (only when K < world size)


# -- the pure part ---------------------------------------------------------------------------------
def remainder(old_batches: Sequence[Sequence[Sequence[int]]], consumed: Sequence[int]) -> list[int]:
    """What the old ranks had not trained, interleaved one sample at a time in rank order.

    Interleaving (rather than concatenating) keeps the old sampler's global order, so the new
    world trains the rest of the epoch in the order the old world would have.
    """
    rests = [[i for batch in batches[c:] for i in batch] for batches, c in zip(old_batches, consumed)]
    merged: list[int] = []
    for j in range(max((len(rest) for rest in rests), default=0)):
        merged.extend(rest[j] for rest in rests if j < len(rest))
    return merged


def steps_for(remaining: int, world_size: int, batch_size: int) -> int:
    """The batches each new rank runs: the fewest that keep batches within ``batch_size`` and
    non-empty (see the module docstring for ``batch_size=1`` and ``remaining < world_size``)."""
    if remaining <= 0:
        return 0
    if remaining < world_size:
        return 1
    return min(math.ceil(remaining / (world_size * batch_size)), remaining // world_size)


def split(merged: Sequence[int], world_size: int, steps: int) -> tuple[list[Batches], int]:
    """Deal ``merged`` to ``world_size`` ranks in ``steps`` batches each; returns the batches and
    how many samples were repeated (only when there are fewer samples than ranks).

    Step ``i`` takes the next consecutive run of ``merged`` and deals it round-robin, as
    ``DistributedSampler`` deals its list; run lengths are chosen so that every batch of the
    split differs from every other by at most one sample.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    total = len(merged)
    if total == 0:
        return [[] for _ in range(world_size)], 0
    if total < world_size:
        if steps != 1:
            raise ValueError(f"{total} samples for {world_size} ranks allow one batch each, not {steps}")
        return [[[merged[r % total]]] for r in range(world_size)], world_size - total
    slots = world_size * steps
    if steps < 1 or slots > total:
        raise ValueError(
            f"{total} samples cannot fill {steps} non-empty batches on each of {world_size} ranks"
        )
    base, extra = divmod(total, slots)
    out: list[Batches] = [[] for _ in range(world_size)]
    start = 0
    for step in range(steps):
        larger = min(max(extra - step * world_size, 0), world_size)  # ranks 0..larger-1 get base + 1
        chunk = merged[start : start + world_size * base + larger]
        start += len(chunk)
        for rank in range(world_size):
            out[rank].append(list(chunk[rank::world_size]))
    return out, 0


def reshard(
    old_batches: Sequence[Sequence[Sequence[int]]],
    consumed: Sequence[int],
    world_size: int,
    batch_size: int,
    steps: int | None = None,
) -> Resharded:
    """The rest of an epoch for ``world_size`` ranks: each old rank's batches past its ``consumed``
    count, merged in the old global order, split into the same number of batches on every new
    rank (``steps``, default :func:`steps_for`'s)."""
    if len(old_batches) != len(consumed):
        raise ValueError(f"{len(old_batches)} old ranks but {len(consumed)} consumed counts")
    merged = remainder(old_batches, consumed)
    if steps is None:
        steps = steps_for(len(merged), world_size, batch_size)
    batches, repeated = split(merged, world_size, steps)
    return Resharded(batches, len(merged), repeated)


# -- describing an epoch ---------------------------------------------------------------------------
def describe_sampler(loader: Any, epoch_batches: int | float | None) -> dict[str, Any] | None:
    """A description of the epoch ``loader`` is iterating, from which every rank's batches can be
    rebuilt (:func:`all_batches`); None when its order is not a plain ``DistributedSampler``'s.

    Plain values only: the checkpoint must load with ``torch.load(weights_only=True)``.
    """
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if type(sampler) is not DistributedSampler or type(batch_sampler) is not BatchSampler:
        return None
    if batch_sampler.sampler is not sampler:
        return None
    limit = None if epoch_batches is None or math.isinf(epoch_batches) else int(epoch_batches)
    return {
        "kind": "distributed",
        "dataset_len": len(sampler.dataset),  # type: ignore[arg-type]
        "num_replicas": int(sampler.num_replicas),
        "shuffle": bool(sampler.shuffle),
        "seed": int(sampler.seed),
        "drop_last": bool(sampler.drop_last),
        "epoch": int(sampler.epoch),
        "batch_size": int(batch_sampler.batch_size),
        "batch_drop_last": bool(batch_sampler.drop_last),
        "epoch_batches": limit,
    }


def root_of(order: dict[str, Any]) -> dict[str, Any]:
    """The sampler description an epoch (re-sharded any number of times) started from."""
    while order["kind"] == "resharded":
        order = order["source"]
    return order


def all_batches(order: dict[str, Any]) -> list[Batches]:
    """Every rank's batches for the epoch ``order`` describes (see :func:`describe_sampler`)."""
    if order["kind"] == "resharded":
        source = all_batches(order["source"])
        return reshard(
            source, order["consumed"], order["num_replicas"], order["batch_size"], order["steps"]
        ).batches
    if order["kind"] != "distributed":
        raise ValueError(f"unknown epoch order {order['kind']!r}")
    size = order["batch_size"]
    out = []
    for indices in _sampler_lists(order):
        count = len(indices) // size if order["batch_drop_last"] else math.ceil(len(indices) / size)
        if order["epoch_batches"] is not None:
            count = min(count, order["epoch_batches"])
        out.append([indices[b * size : (b + 1) * size] for b in range(count)])
    return out


class _Sized:
    """Stands in for the dataset: a ``DistributedSampler`` only asks for its length."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length


def _sampler(order: dict[str, Any], rank: int) -> DistributedSampler:
    sampler: DistributedSampler = DistributedSampler(
        _Sized(order["dataset_len"]),  # type: ignore[arg-type]
        num_replicas=order["num_replicas"],
        rank=rank,
        shuffle=order["shuffle"],
        seed=order["seed"],
        drop_last=order["drop_last"],
    )
    sampler.set_epoch(order["epoch"])
    return sampler


def _sampler_lists(order: dict[str, Any]) -> list[list[int]]:
    """Each old rank's ``DistributedSampler`` list: one global list sliced, as torch's sampler
    does, when that agrees with torch's own first and last ranks; torch's sampler per rank if not
    (a torch release that changed the algorithm), at the cost of one permutation per rank."""
    world = order["num_replicas"]
    indices = _global_order(order, world)
    lists = [indices[r::world] for r in range(world)]
    if all(lists[r] == list(_sampler(order, r)) for r in {0, world - 1}):
        return lists
    return [list(_sampler(order, r)) for r in range(world)]


def _global_order(order: dict[str, Any], world: int) -> list[int]:
    length = order["dataset_len"]
    if order["shuffle"]:
        generator = torch.Generator()
        generator.manual_seed(order["seed"] + order["epoch"])
        indices: list[int] = torch.randperm(length, generator=generator).tolist()
    else:
        indices = list(range(length))
    if order["drop_last"] and length % world:
        return indices[: math.ceil((length - world) / world) * world]  # the tail is dropped
    total = math.ceil(length / world) * world
    if indices and total > length:
        indices += (indices * math.ceil((total - length) / length))[: total - length]
    return indices


# -- resuming on a different world -----------------------------------------------------------------
@dataclass(frozen=True)
class ResizePlan:
    """What one new rank does with the rest of the interrupted epoch."""

    batches: Batches  # this rank's batches
    order: dict[str, Any]  # the description of the re-sharded epoch (saved in later checkpoints)
    offset: int  # the trainer's batch index of the first of them
    epoch: int
    remaining: int
    repeated: int
    steps: int
    largest: int  # the largest batch of any rank

    def message(self, old_world: int, new_world: int) -> str:
        """The one line rank 0 logs."""
        text = (
            f"lightning_grid: resuming a checkpoint written by {old_world} processes on {new_world}: the rest of"
            f" epoch {self.epoch} ({self.remaining} samples) is re-sharded, each trained once; weights will not"
            f" be bit-identical to an uninterrupted run ({self.steps} batches per process, of up to"
            f" {self.largest} samples"
        )
        if self.repeated:
            text += (
                f"; fewer samples remain than processes, so {self.repeated} of them are trained twice, as"
                " DistributedSampler pads"
            )
        return text + ")"


def plan_resize(
    loader: Any,
    states: Sequence[dict[str, Any]],
    world_size: int,
    rank: int,
    limit_batches: int | float,
    accumulate: int = 1,
) -> ResizePlan:
    """This rank's share of the rest of the interrupted epoch; raises :class:`CannotReshard`.

    ``states`` are the old ranks' position states of this train loader, ``loader`` the loader of
    this run. The trainer counts batches up to its epoch length: the re-sharded batches are placed
    at the end of it (``offset``), aligned to ``accumulate`` where the samples allow it, so that
    gradient-accumulation windows keep their boundaries.
    """
    orders = [state.get("order") for state in states]
    if not orders or any(order is None for order in orders):
        raise CannotReshard(
            "the interrupted epoch's order is not a DistributedSampler's, or the checkpoint predates re-sharding"
        )
    order: dict[str, Any] = orders[0]  # type: ignore[assignment]
    if order["num_replicas"] != len(states):
        raise CannotReshard(f"the checkpoint's loader order is for {order['num_replicas']} processes")
    dataset_len = root_of(order)["dataset_len"]
    if len(loader.dataset) != dataset_len:
        raise CannotReshard(
            f"the dataset has {len(loader.dataset)} samples, the checkpoint's had {dataset_len}"
        )
    consumed = [int(state["consumed"]) for state in states]
    merged = remainder(all_batches(order), consumed)
    batch_size = int(loader.batch_size or 1)
    steps = steps_for(len(merged), world_size, batch_size)
    epoch_length = _epoch_length(len(loader), limit_batches)
    if steps > epoch_length:
        raise CannotReshard(
            f"the rest of the epoch needs {steps} batches per process, an epoch here has {epoch_length}"
        )
    if not merged:
        raise CannotReshard("nothing of the interrupted epoch remains")
    offset = epoch_length - steps
    aligned = offset - offset % max(accumulate, 1)
    if aligned != offset and world_size * (epoch_length - aligned) <= len(merged):
        offset, steps = aligned, epoch_length - aligned  # a few more, smaller batches
    batches, repeated = split(merged, world_size, steps)
    resharded = {
        "kind": "resharded",
        "source": order,
        "consumed": consumed,
        "num_replicas": world_size,
        "batch_size": batch_size,
        "steps": steps,
        "offset": offset,
    }
    epoch = int(root_of(order)["epoch"])
    largest = max((len(b) for rank_batches in batches for b in rank_batches), default=0)
    return ResizePlan(batches[rank], resharded, offset, epoch, len(merged), repeated, steps, largest)


def _epoch_length(length: int, limit: int | float) -> int:
    """Batches the trainer runs per epoch for a loader of ``length``, as Lightning's
    ``_parse_num_batches`` computes it from ``limit_train_batches``."""
    if isinstance(limit, int):
        return min(length, limit)
    return int(length * limit)


def shift_epoch_progress(trainer: Any, batch_index: int) -> None:
    """Make the trainer's next training batch index ``batch_index`` (its restored progress counts
    the old ranks' batches). A private Lightning structure, like those in ``_lightning``: the loop
    progress restored from the checkpoint, before the epoch loop resets from it."""
    current = trainer.fit_loop.epoch_loop.batch_progress.current
    delta = batch_index - current.ready
    current.ready += delta
    current.started += delta
    current.processed += delta
    current.completed += delta


# -- RNG -------------------------------------------------------------------------------------------
def rng_for_rank(states: Sequence[dict[str, Any]], rank: int) -> dict[str, Any]:
    """The generators new rank ``rank`` continues with: old rank ``rank``'s when it existed (its
    CUDA states only where this machine has as many devices), else states seeded from a value
    derived from the checkpoint's rank-0 generator and ``rank``: deterministic, different per
    rank. CUDA generators of such a rank keep the state the script seeded."""
    if rank < len(states):
        state = dict(states[rank])
        cuda = state.get("cuda")
        if cuda is not None and not (torch.cuda.is_available() and len(cuda) == torch.cuda.device_count()):
            del state["cuda"]
        return state
    return _derived_rng(states[0], rank)


def _derived_rng(base: dict[str, Any], rank: int) -> dict[str, Any]:
    digest = hashlib.sha256(bytes(base["torch"].numpy().tobytes()) + rank.to_bytes(8, "little")).digest()
    seed = int.from_bytes(digest[:8], "little") & (2**63 - 1)
    state: dict[str, Any] = {
        "python": random.Random(seed).getstate(),
        "torch": torch.Generator().manual_seed(seed).get_state(),
    }
    np = sys.modules.get("numpy")
    if "numpy" in base and np is not None:
        state["numpy"] = rng.numpy_state(np.random.RandomState(seed % 2**32).get_state())
    return state
