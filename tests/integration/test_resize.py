"""A relaunch on a different number of processes (spot capacity came back short, or larger): real
torchrun DDP runs on CPU (gloo), SIGTERM mid-epoch, relaunch with another ``--nproc-per-node``.

Within the interrupted epoch, what attempt 1 trained up to the cut plus what the relaunch trained
is exactly the epoch's sample list as the old ``DistributedSampler`` defined it (padding included),
each entry once; every new rank runs the same number of batches; the next epoch is the new world's
own ``DistributedSampler`` order; global_step continues from the checkpoint. Weights are not
compared: the batches differ from an uninterrupted run's, by design.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from torch.utils.data import DistributedSampler

from tests.helpers import REPO, child_env, write_synthetic_mnist

SCRIPT = REPO / "tests" / "scripts" / "ddp_ids.py"
SEED = 1234  # the script's seed_everything: Lightning's DistributedSampler seed
BATCH = 8


def _launch(
    world: int,
    data: Path,
    root: Path,
    attempt: int,
    kill_step: int = -1,
    kill_rank: int = 0,
    extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(world),
        str(SCRIPT),
        "--data-dir",
        str(data),
        "--root",
        str(root),
        "--attempt",
        str(attempt),
        "--batch-size",
        str(BATCH),
        "--seed",
        str(SEED),
        "--kill-step",
        str(kill_step),
        "--kill-rank",
        str(kill_rank),
        *extra,
    ]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _records(root: Path, attempt: int, world: int) -> list[list[dict]]:
    out = []
    for rank in range(world):
        path = root / f"ids-rank{rank}-attempt{attempt}.jsonl"
        out.append([json.loads(line) for line in path.read_text().splitlines()] if path.exists() else [])
    return out


def _sampler_list(n: int, world: int, rank: int, epoch: int) -> list[int]:
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=SEED)  # type: ignore[arg-type]
    sampler.set_epoch(epoch)
    return list(sampler)


def _epoch_ids(records: list[list[dict]], epoch: int) -> Counter[int]:
    return Counter(i for rank in records for r in rank if r["epoch"] == epoch for i in r["ids"])


def _data(tmp_path: Path, n: int) -> Path:
    data = tmp_path / "data"
    write_synthetic_mnist(str(data), n_train=n, n_test=0, seed=0)
    return data


def _check_resize(n: int, old: int, new: int, kill_step: int, kill_rank: int, tmp_path: Path) -> None:
    data, root = _data(tmp_path, n), tmp_path / "run"
    _launch(old, data, root, 1, kill_step, kill_rank)
    first = _records(root, 1, old)
    assert not (root / "done.json").exists()
    # Every old rank trained the head of its own list, the same number of batches (the cut).
    consumed = {len(rank) for rank in first}
    assert consumed == {kill_step + 1}
    for rank, records in enumerate(first):
        trained = [i for r in records for i in r["ids"]]
        assert trained == _sampler_list(n, old, rank, 0)[: len(trained)]

    proc = _launch(new, data, root, 2)
    second = _records(root, 2, new)
    output = proc.stdout + proc.stderr
    assert f"resuming a checkpoint written by {old} processes on {new}: the rest of epoch 0" in output
    assert output.count("is re-sharded, each trained once") == 1  # one line, from rank 0

    # The interrupted epoch: exactly the old samplers' lists (padding included), each entry once.
    expected = Counter(i for rank in range(old) for i in _sampler_list(n, old, rank, 0))
    assert _epoch_ids(first, 0) + _epoch_ids(second, 0) == expected
    rest = [[r for r in rank if r["epoch"] == 0] for rank in second]
    assert len({len(rank) for rank in rest}) == 1  # the same number of batches on every new rank
    assert all(0 < len(r["ids"]) <= BATCH for rank in rest for r in rank)

    # The next epoch: the new world's own DistributedSampler order, batch by batch.
    for rank, records in enumerate(second):
        batches = [r["ids"] for r in records if r["epoch"] == 1]
        order = _sampler_list(n, new, rank, 1)
        assert batches == [order[i : i + BATCH] for i in range(0, len(order), BATCH)]

    # global_step continues from the checkpoint, one step per batch, to the end of training.
    last = max(r["step"] for r in first[0])
    steps = [r["step"] for r in second[0]]
    assert steps == list(range(last + 1, last + 1 + len(steps)))
    assert all([r["step"] for r in rank] == steps for rank in second)
    done = json.loads((root / "done.json").read_text())
    assert done == {"global_step": steps[-1] + 1, "epoch": 2}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("old", "new", "n", "kill_step", "kill_rank"),
    [
        (2, 1, 96, 1, 1),  # capacity came back short
        (1, 2, 96, 4, 0),  # more capacity than before
        (2, 3, 96, 2, 0),  # a remainder that does not split into full batches
        (2, 3, 101, 2, 1),  # padding: the old epoch repeats one sample, the new world pads its own epochs
    ],
)
def test_relaunch_on_another_world_size_trains_each_sample_once(
    old: int, new: int, n: int, kill_step: int, kill_rank: int, tmp_path: Path
) -> None:
    _check_resize(n, old, new, kill_step, kill_rank, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("third", [2, 1])
def test_a_second_cut_inside_the_resharded_epoch(third: int, tmp_path: Path) -> None:
    """2 → 1, cut again in the re-sharded rest of the epoch, then → 2 (re-sharded again) or → 1
    (the same world: the re-sharded epoch is rebuilt and continued): still each sample once."""
    n, data, root = 96, _data(tmp_path, 96), tmp_path / "run"
    _launch(2, data, root, 1, kill_step=1, kill_rank=0)  # 2 batches of 8 per rank: 64 samples left
    _launch(1, data, root, 2, kill_step=4, kill_rank=0)  # 3 of the 8 re-sharded batches: 40 left
    proc = _launch(third, data, root, 3)
    output = proc.stdout + proc.stderr
    resharded = "resuming a checkpoint written by 1 processes on 2: the rest of epoch 0 (40 samples)"
    assert (resharded in output) == (third == 2)
    trained = _epoch_ids(_records(root, 1, 2), 0) + _epoch_ids(_records(root, 2, 1), 0)
    last = _records(root, 3, third)
    assert trained + _epoch_ids(last, 0) == Counter(range(n))
    assert len({len([r for r in rank if r["epoch"] == 0]) for rank in last}) == 1
    for rank, records in enumerate(last):
        order = _sampler_list(n, third, rank, 1)
        assert [r["ids"] for r in records if r["epoch"] == 1] == [
            order[i : i + BATCH] for i in range(0, len(order), BATCH)
        ]
    first_step = min(r["step"] for r in last[0])
    assert first_step == max(r["step"] for r in _records(root, 2, 1)[0]) + 1
    assert json.loads((root / "done.json").read_text())["epoch"] == 2


@pytest.mark.slow
def test_a_loader_without_distributed_sampler_keeps_the_old_warning_and_behaviour(tmp_path: Path) -> None:
    """No DistributedSampler (every rank shuffles the whole dataset itself): nothing to re-shard.
    The model and optimizer resume, the epoch's data restarts from its beginning (the trainer still
    counts the batches already run), and the warning says so."""
    data, root = _data(tmp_path, 96), tmp_path / "run"
    extra = ("--no-distributed-sampler",)
    _launch(2, data, root, 1, kill_step=1, kill_rank=0, extra=extra)
    proc = _launch(1, data, root, 2, extra=extra)
    output = proc.stdout + proc.stderr
    assert (
        "the checkpoint was written by 2 processes, this run has 1: the model and optimizer resume,"
        " the data order and RNG do not (the interrupted epoch's order is not a DistributedSampler's"
    ) in output
    assert "re-sharded" not in output
    second = _records(root, 2, 1)[0]
    assert [r["batch_idx"] for r in second if r["epoch"] == 0] == list(range(2, 96 // BATCH))
    assert second[0]["step"] == 2
    assert json.loads((root / "done.json").read_text())["epoch"] == 2
