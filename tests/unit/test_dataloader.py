"""The resumable loader on its own, the torchdata way: run k steps and take the state, finish →
expected; a new loader loads the state and finishes → must equal expected. No Lightning here: a
small consumer plays Lightning's part (one batch prefetched, RNG drawn by each training step)."""

from __future__ import annotations

import random
from collections import deque
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_grid.resumable import rng
from lightning_grid.resumable.dataloader import ResumableLoader, can_make_resumable


class Noisy(Dataset):
    """Augmentation from all three global RNGs, like real pipelines."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(i), float(torch.rand(1)), random.random(), float(np.random.rand())])


def _loader(workers: int, persistent: bool, generator: bool = False) -> ResumableLoader:
    kwargs: dict[str, Any] = {"batch_size": 4, "shuffle": True, "num_workers": workers}
    if workers:
        kwargs["persistent_workers"] = persistent
    if generator:
        kwargs["generator"] = torch.Generator().manual_seed(5)
    return ResumableLoader(DataLoader(Noisy(), **kwargs))


def _epoch(
    loader: ResumableLoader, out: list, stop_after: int | None = None, resume_rng: dict | None = None
) -> dict | None:
    it = iter(loader)
    buffer: deque = deque()

    def fetch() -> None:
        try:
            buffer.append(next(it))
        except StopIteration:
            pass

    fetch()
    step = 0
    while buffer:
        batch = buffer.popleft()
        fetch()
        if resume_rng is not None:
            if not loader.main_rng_applied:
                rng.restore(resume_rng)
            resume_rng = None
        out.append((batch.clone(), float(torch.rand(1))))  # the "training step" draws too
        step += 1
        if stop_after is not None and step == stop_after:
            main = rng.capture()
            return {"loader": loader.position_state(step, main), "rng": main}
    return None


def _same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (xa, ra), (xb, rb) in zip(a, b):
        assert torch.equal(xa, xb) and ra == rb


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@pytest.mark.parametrize("workers,persistent", [(0, False), (2, False), (2, True), (3, True)])
@pytest.mark.parametrize("cut", [1, 4, 9])
@pytest.mark.parametrize("cut_epoch", [0, 1])
def test_resume_continues_exactly(workers: int, persistent: bool, cut: int, cut_epoch: int) -> None:
    _seed_all(0)
    expected: list = []
    reference = _loader(workers, persistent)
    for _ in range(3):
        _epoch(reference, expected)
    reference.close()

    _seed_all(0)
    first = _loader(workers, persistent)
    got: list = []
    for _ in range(cut_epoch):
        _epoch(first, got)
    state = _epoch(first, got, stop_after=cut)
    assert state is not None
    first.close()

    _seed_all(12345)  # a new process: different RNG
    second = _loader(workers, persistent)
    second.load_position_state(state["loader"])
    _epoch(second, got, resume_rng=state["rng"])
    for _ in range(cut_epoch + 1, 3):
        _epoch(second, got)
    second.close()
    _same(expected, got)


def test_shared_generator_next_epoch_order_survives_resume() -> None:
    _seed_all(0)
    expected: list = []
    ref = _loader(0, False, generator=True)
    for _ in range(2):
        _epoch(ref, expected)
    _seed_all(0)
    first = _loader(0, False, generator=True)
    got: list = []
    state = _epoch(first, got, stop_after=3)
    assert state is not None
    second = _loader(0, False, generator=True)
    second.load_position_state(state["loader"])
    _epoch(second, got, resume_rng=state["rng"])
    _epoch(second, got)
    _same(expected, got)


def test_resume_does_not_load_consumed_samples() -> None:
    seen: list[int] = []

    class Counting(Dataset):
        def __len__(self) -> int:
            return 40

        def __getitem__(self, i: int) -> int:
            seen.append(i)
            return i

    first = ResumableLoader(DataLoader(Counting(), batch_size=4, shuffle=True))
    state = _epoch(first, [], stop_after=8)
    assert state is not None
    seen.clear()
    second = ResumableLoader(DataLoader(Counting(), batch_size=4, shuffle=True))
    second.load_position_state(state["loader"])
    list(second)
    # Batch 8 had been prefetched (rebuilt), then 9: 2 batches of 4, nothing before them.
    assert len(seen) == 8


def test_what_can_and_cannot_be_made_resumable() -> None:
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(3))

    assert can_make_resumable(DataLoader(Noisy(), batch_size=2))
    assert not can_make_resumable(DataLoader(Stream(), batch_size=2))
    assert not can_make_resumable(DataLoader(Noisy(), batch_size=None))
    assert not can_make_resumable([1, 2, 3])


def test_loader_mismatch_is_explained() -> None:
    state = _epoch(_loader(0, False), [], stop_after=2)
    assert state is not None
    with pytest.raises(ValueError, match="num_workers=0"):
        _loader(2, False).load_position_state(state["loader"])


def test_attributes_come_from_the_users_loader() -> None:
    dl = DataLoader(Noisy(), batch_size=4, shuffle=True)
    wrapped = ResumableLoader(dl)
    assert wrapped.dataset is dl.dataset and wrapped.batch_size == 4 and len(wrapped) == 10
    assert wrapped.sampler is dl.sampler
