"""Re-sharding the rest of an epoch for a world of another size: the pure split (a table of small
cases, then the properties over many shapes), the epoch descriptions the checkpoint keeps, the RNG
choice, and the loader running a re-sharded epoch (and resuming exactly inside one)."""

from __future__ import annotations

import random
from collections import Counter
from itertools import product
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.trainer.connectors.data_connector import _parse_num_batches
from lightning.pytorch.trainer.states import RunningStage
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_grid.resumable import reshard, rng
from lightning_grid.resumable.dataloader import ResumableLoader

# old per-rank batches, consumed per old rank, new world size, batch size → new per-rank batches, repeated
CASES: list[tuple[str, list, list[int], int, int, list, int]] = [
    (
        "2 -> 1: the old global order, continued, in full batches",
        [[[0, 2], [4, 6], [8, 10]], [[1, 3], [5, 7], [9, 11]]],
        [1, 1],
        1,
        2,
        [[[4, 5], [6, 7], [8, 9], [10, 11]]],
        0,
    ),
    (
        "1 -> 2: dealt round-robin, the last step's batches smaller",
        [[[0, 1], [2, 3], [4, 5], [6, 7]]],
        [1],
        2,
        2,
        [[[2, 4], [6]], [[3, 5], [7]]],
        0,
    ),
    (
        "2 -> 3: sizes differ by at most one within the split",
        [[[0, 2], [4, 6], [8, 10]], [[1, 3], [5, 7], [9, 11]]],
        [1, 1],
        3,
        2,
        [[[4, 7], [9]], [[5, 8], [10]], [[6], [11]]],
        0,
    ),
    (
        "fewer samples than new ranks: one each, the first ones repeated (DistributedSampler's padding)",
        [[[0, 1], [2, 3]]],
        [1],
        3,
        2,
        [[[2]], [[3]], [[2]]],
        1,
    ),
    (
        "batch_size 1, remainder not divisible: a batch of two rather than a repeat or a skip",
        [[[0], [1], [2], [3], [4]]],
        [0],
        2,
        1,
        [[[0, 2], [3]], [[1], [4]]],
        0,
    ),
    (
        "a padded old epoch keeps its duplicate (each entry of the old list once)",
        [[[3, 0], [4]], [[1, 2], [3]]],  # DistributedSampler(5 samples, 2 ranks) pads with 3
        [1, 1],
        1,
        2,
        [[[4, 3]]],
        0,
    ),
    (
        "old ranks of unequal length (a re-sharded epoch): interleaved while they last",
        [[[0, 2], [4, 6, 8]], [[1, 3], [5]]],
        [1, 1],
        1,
        4,
        [[[4, 5, 6, 8]]],
        0,
    ),
    ("nothing left", [[[0, 1]], [[2, 3]]], [1, 1], 2, 2, [[], []], 0),
]


@pytest.mark.parametrize(("name", "old", "consumed", "world", "batch_size", "expected", "repeated"), CASES)
def test_reshard_table(
    name: str, old: list, consumed: list[int], world: int, batch_size: int, expected: list, repeated: int
) -> None:
    got = reshard.reshard(old, consumed, world, batch_size)
    assert got.batches == expected, name
    assert got.repeated == repeated
    assert got.remaining == sum(len(i) for b, c in zip(old, consumed) for i in b[c:])


def _distributed(
    n: int, world: int, batch_size: int, shuffle: bool = True, drop_last: bool = False, epoch: int = 0
) -> dict[str, Any]:
    return {
        "kind": "distributed",
        "dataset_len": n,
        "num_replicas": world,
        "shuffle": shuffle,
        "seed": 42,
        "drop_last": drop_last,
        "epoch": epoch,
        "batch_size": batch_size,
        "batch_drop_last": False,
        "epoch_batches": None,
    }


def _check(old: list, consumed: list[int], world: int, batch_size: int) -> reshard.Resharded:
    """Exactly once, equal batch counts, non-empty batches within batch_size (bar the documented edges)."""
    got = reshard.reshard(old, consumed, world, batch_size)
    rest = Counter(i for b, c in zip(old, consumed) for batch in b[c:] for i in batch)
    dealt = Counter(i for rank in got.batches for batch in rank for i in batch)
    counts = {len(rank) for rank in got.batches}
    assert len(counts) == 1, counts
    if got.remaining == 0:
        return got
    assert all(batch for rank in got.batches for batch in rank)
    if got.remaining >= world:
        assert dealt == rest and got.repeated == 0
        largest = max(len(batch) for rank in got.batches for batch in rank)
        assert largest <= (batch_size if batch_size > 1 else 2)
        assert counts == {reshard.steps_for(got.remaining, world, batch_size)}
    else:
        assert (
            set(dealt) == set(rest) and sum(dealt.values()) == world and got.repeated == world - got.remaining
        )
    return got


@pytest.mark.parametrize("n", [1, 7, 24, 25, 97])
@pytest.mark.parametrize("old_world", [1, 2, 3])
@pytest.mark.parametrize("new_world", [1, 2, 3, 5])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_reshard_properties(n: int, old_world: int, new_world: int, batch_size: int) -> None:
    old = reshard.all_batches(_distributed(n, old_world, batch_size))
    for consumed in range(len(old[0]) + 1):
        _check(old, [consumed] * old_world, new_world, batch_size)


@pytest.mark.parametrize(
    ("n", "world", "batch_size", "shuffle", "drop_last"),
    list(product([1, 5, 24, 25, 31], [1, 2, 3, 4], [1, 4], [True, False], [True, False])),
)
def test_all_batches_are_distributed_samplers(
    n: int, world: int, batch_size: int, shuffle: bool, drop_last: bool
) -> None:
    order = _distributed(n, world, batch_size, shuffle, drop_last, epoch=3)
    for rank, batches in enumerate(reshard.all_batches(order)):
        sampler = DistributedSampler(
            range(n),  # type: ignore[arg-type]
            num_replicas=world,
            rank=rank,
            shuffle=shuffle,
            seed=42,
            drop_last=drop_last,
        )
        sampler.set_epoch(3)
        indices = list(sampler)
        assert batches == [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]


def test_all_batches_honour_the_epoch_limit_and_batch_drop_last() -> None:
    order = {**_distributed(30, 2, 4), "batch_drop_last": True}
    assert [len(b) for b in reshard.all_batches(order)] == [3, 3]  # 15 per rank: 3 full batches
    order = {**_distributed(30, 2, 4), "epoch_batches": 2}
    assert [[len(x) for x in b] for b in reshard.all_batches(order)] == [[4, 4], [4, 4]]


def test_a_resharded_epoch_resharded_again_is_still_exactly_once() -> None:
    first = _distributed(50, 2, 4)
    second = {
        "kind": "resharded",
        "source": first,
        "consumed": [2, 2],
        "num_replicas": 3,
        "batch_size": 4,
        "steps": reshard.steps_for(50 - 16, 3, 4),
        "offset": 0,
    }
    lists = reshard.all_batches(second)
    assert lists == reshard.reshard(reshard.all_batches(first), [2, 2], 3, 4).batches
    third = _check(lists, [1, 1, 1], 2, 4)
    trained = Counter(i for b in reshard.all_batches(first) for batch in b[:2] for i in batch)
    trained += Counter(i for b in lists for batch in b[:1] for i in batch)
    trained += Counter(i for rank in third.batches for batch in rank for i in batch)
    assert trained == Counter(range(50))


def test_rng_for_rank_takes_the_old_rank_or_a_derived_seed() -> None:
    import numpy  # noqa: F401  (the state carries numpy's generator, as in a script that uses it)

    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        states.append(rng.capture())
    assert torch.equal(reshard.rng_for_rank(states, 1)["torch"], states[1]["torch"])
    derived = [reshard.rng_for_rank(states, r) for r in (2, 3)]
    again = reshard.rng_for_rank(states, 2)
    assert torch.equal(derived[0]["torch"], again["torch"]) and derived[0]["python"] == again["python"]
    assert not torch.equal(derived[0]["torch"], derived[1]["torch"])
    assert not torch.equal(derived[0]["torch"], states[0]["torch"])
    rng.restore(derived[1])  # a valid state for every generator
    first = (float(torch.rand(1)), random.random(), float(np.random.rand()))
    rng.restore(derived[1])
    assert first == (float(torch.rand(1)), random.random(), float(np.random.rand()))


class _Noisy(Dataset):
    def __len__(self) -> int:
        return 30

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(i), float(torch.rand(1))])


def _loader(world: int, rank: int) -> ResumableLoader:
    sampler = DistributedSampler(_Noisy(), num_replicas=world, rank=rank, shuffle=True, seed=42)
    return ResumableLoader(DataLoader(_Noisy(), batch_size=4, sampler=sampler))


def _resharded_for(rank: int) -> tuple[list[list[int]], dict[str, Any]]:
    """Rank ``rank`` of 2, continuing an epoch that 3 ranks left after 1 batch each."""
    old = _distributed(30, 3, 4)
    steps = reshard.steps_for(30 - 12, 2, 4)
    order = {
        "kind": "resharded",
        "source": old,
        "consumed": [1, 1, 1],
        "num_replicas": 2,
        "batch_size": 4,
        "steps": steps,
        "offset": 8 - steps,  # 8 batches in this world's epoch
    }
    return reshard.all_batches(order)[rank], order


def _run(loader: ResumableLoader, offset: int, stop_after: int | None = None) -> tuple[list, dict | None]:
    out = []
    for step, batch in enumerate(loader, start=1):
        out.append((batch.clone(), float(torch.rand(1))))
        if step == stop_after:
            main = rng.capture()
            return out, {"loader": loader.position_state(offset + step, main, 8), "rng": main}
    return out, None


def test_loader_runs_a_resharded_epoch_then_its_own_sampler() -> None:
    batches, order = _resharded_for(1)
    loader = _loader(2, 1)
    loader.load_resharded(batches, order)
    got, _ = _run(loader, order["offset"])
    assert [b[:, 0].long().tolist() for b, _ in got] == batches
    loader.sampler.set_epoch(1)
    got, _ = _run(loader, 0)
    expected = list(loader.sampler)
    assert [i for b, _ in got for i in b[:, 0].long().tolist()] == expected


def test_a_cut_inside_a_resharded_epoch_resumes_exactly_on_the_same_world() -> None:
    batches, order = _resharded_for(0)
    torch.manual_seed(0)
    reference = _loader(2, 0)
    reference.load_resharded(batches, order)
    expected, _ = _run(reference, order["offset"])

    torch.manual_seed(0)
    first = _loader(2, 0)
    first.load_resharded(batches, order)
    got, state = _run(first, order["offset"], stop_after=2)
    assert state is not None and state["loader"]["consumed"] == 2 and state["loader"]["order"] == order

    torch.manual_seed(999)  # a new process
    second = _loader(2, 0)
    second.load_position_state(state["loader"], rank=0)
    it = iter(second)
    rng.restore(state["rng"])
    rest = [(batch.clone(), float(torch.rand(1))) for batch in it]
    got += rest
    assert len(got) == len(expected)
    for (xa, ra), (xb, rb) in zip(expected, got):
        assert torch.equal(xa, xb) and ra == rb


# -- the Lightning structures the resize path relies on (pinned, as tests/unit/test_lightning_internals.py does)
@pytest.mark.parametrize("length", [1, 7, 40])
@pytest.mark.parametrize("limit", [1.0, 0.5, 0.25, 3, 100])
def test_epoch_length_is_lightnings(length: int, limit: int | float) -> None:
    if isinstance(limit, float) and int(length * limit) == 0:
        return  # Lightning refuses such a limit
    assert reshard._epoch_length(length, limit) == _parse_num_batches(RunningStage.TRAINING, length, limit)


def test_shift_epoch_progress_moves_the_next_batch_index() -> None:
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    current = trainer.fit_loop.epoch_loop.batch_progress.current
    current.ready = current.started = current.processed = 5
    current.completed = 4  # as saved at a train batch end
    reshard.shift_epoch_progress(trainer, 2)
    assert (current.ready, current.started, current.processed, current.completed) == (2, 2, 2, 1)
    assert trainer.fit_loop.epoch_loop.batch_idx == 1  # the next batch is index 2


def _states(order: dict[str, Any], consumed: int) -> list[dict[str, Any]]:
    return [{"order": order, "consumed": consumed} for _ in range(order["num_replicas"])]


def test_plan_resize_places_the_rest_at_the_end_of_the_epoch() -> None:
    loader = _loader(2, 1)  # 30 samples, 15 per rank: 4 batches of 4 per epoch here
    plan = reshard.plan_resize(loader, _states(_distributed(30, 3, 4), 1), 2, 1, 1.0)
    assert (plan.remaining, plan.steps, plan.offset, plan.repeated) == (18, 3, 1, 0)
    assert plan.batches == reshard.all_batches(plan.order)[1]
    assert plan.order["source"] == _distributed(30, 3, 4) and plan.order["offset"] == 1
    # Accumulating 2 batches per step: the windows keep their boundaries (one more, smaller batch).
    plan = reshard.plan_resize(loader, _states(_distributed(30, 3, 4), 1), 2, 1, 1.0, accumulate=2)
    assert (plan.steps, plan.offset) == (4, 0)
    assert "(18 samples) is re-sharded, each trained once" in plan.message(3, 2)


@pytest.mark.parametrize(
    ("states", "limit", "why"),
    [
        ([{"order": None, "consumed": 1}], 1.0, "not a DistributedSampler's"),
        (_states(_distributed(31, 2, 4), 1), 1.0, "the dataset has 30 samples"),
        (_states(_distributed(30, 1, 4), 1), 2, "needs 4 batches per process, an epoch here has 2"),
    ],
)
def test_plan_resize_says_why_it_cannot(states: list, limit: int | float, why: str) -> None:
    with pytest.raises(reshard.CannotReshard, match=why):
        reshard.plan_resize(_loader(2, 0), states, 2, 0, limit)
