"""The periodic save's snapshot: private copies, in host buffers kept from one save to the next."""

from __future__ import annotations

import collections
from typing import Any

import pytest
import torch

from lightning_grid.resumable.snapshot import Snapshots

Point = collections.namedtuple("Point", "x y")


def test_snapshot_is_a_private_copy_and_plain_values_are_not_walked() -> None:
    rng_state = (3, tuple(range(625)), None)
    live = {"w": torch.ones(4), "rng": rng_state, "hist": [1, 2, 3], "p": Point(1, torch.zeros(2))}
    copies: list[Any] = []
    snapshot = Snapshots().take(live, copies)
    live["w"].add_(1)
    live["p"].y.add_(1)
    live["hist"].append(4)
    assert torch.equal(snapshot["w"], torch.ones(4))
    assert snapshot["rng"] == rng_state and snapshot["rng"][1] is rng_state[1]  # ints: not walked
    assert snapshot["hist"] == [1, 2, 3]
    assert type(snapshot["p"]) is Point and torch.equal(snapshot["p"].y, torch.zeros(2))
    assert copies == []  # nothing on a device: nothing to wait for


def test_the_next_snapshot_refills_the_same_buffers_with_the_new_values() -> None:
    snapshots = Snapshots()
    live = {"model": collections.OrderedDict(w=torch.arange(6.0).reshape(2, 3), b=torch.zeros(3))}
    first = snapshots.take(live)
    w_buffer, b_buffer = first["model"]["w"], first["model"]["b"]
    live["model"]["w"].mul_(-1)
    live["model"]["b"].add_(7)
    second = snapshots.take(live)
    assert type(second["model"]) is collections.OrderedDict
    assert second["model"]["w"].data_ptr() == w_buffer.data_ptr()  # the same memory, filled again
    assert second["model"]["b"].data_ptr() == b_buffer.data_ptr()
    assert torch.equal(second["model"]["w"], -torch.arange(6.0).reshape(2, 3))
    assert torch.equal(second["model"]["b"], torch.full((3,), 7.0))
    assert second["model"]["w"].data_ptr() != live["model"]["w"].data_ptr()  # still a copy


@pytest.mark.parametrize(
    "changed",
    [
        lambda t: t.double(),  # dtype
        lambda t: torch.zeros(5),  # shape
        lambda t: torch.zeros(3, 2).t(),  # strides (a transposed view: same shape as (2, 3))
    ],
    ids=["dtype", "shape", "strides"],
)
def test_a_tensor_that_changed_layout_gets_a_new_buffer_with_its_own_layout(changed: Any) -> None:
    snapshots = Snapshots()
    live = {"w": torch.ones(2, 3), "keep": torch.ones(4)}
    first = snapshots.take(live)
    live["w"] = changed(live["w"])
    second = snapshots.take(live)
    assert second["w"].data_ptr() != first["w"].data_ptr()
    assert second["w"].dtype == live["w"].dtype and second["w"].shape == live["w"].shape
    assert second["w"].stride() == live["w"].stride()  # as ``.to(copy=True)`` keeps them
    assert torch.equal(second["w"], live["w"])
    assert second["keep"].data_ptr() == first["keep"].data_ptr()


def test_tensors_the_checkpoint_no_longer_has_are_let_go_and_release_drops_all() -> None:
    snapshots = Snapshots()
    snapshots.take([torch.ones(3), torch.ones(4), torch.ones(5)])
    assert len(snapshots._buffers) == 3
    shorter = snapshots.take([torch.full((3,), 2.0)])
    assert len(snapshots._buffers) == 1 and torch.equal(shorter[0], torch.full((3,), 2.0))
    snapshots.release()
    assert snapshots._buffers == []
    again = snapshots.take([torch.full((3,), 5.0)])  # usable after a release
    assert torch.equal(again[0], torch.full((3,), 5.0))


def test_a_snapshot_survives_in_a_checkpoint_that_torch_loads_back(tmp_path: Any) -> None:
    """Shared tensors (tied weights) become separate copies, as with a clone: loading copies values."""
    shared = torch.randn(4, 4)
    live = {"a": shared, "b": shared, "sparse": torch.eye(3).to_sparse(), "int": torch.arange(3)}
    snapshot = Snapshots().take(live)
    torch.save(snapshot, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt")
    assert torch.equal(loaded["a"], shared) and torch.equal(loaded["b"], shared)
    assert torch.equal(loaded["sparse"].to_dense(), torch.eye(3)) and torch.equal(
        loaded["int"], torch.arange(3)
    )


@pytest.mark.gpu
def test_gpu_snapshot_does_not_block_and_sees_the_state_at_the_cut() -> None:
    """The periodic snapshot of CUDA tensors is queued, not waited for; a change queued after it
    on the same stream does not reach it."""
    live = {"w": torch.zeros(50_000_000, device="cuda")}
    copies: list[Any] = []
    snapshot = Snapshots().take(live, copies)
    live["w"].add_(1)  # queued after the copy
    assert len(copies) == 1
    for done in copies:
        done.synchronize()
    assert snapshot["w"].device.type == "cpu" and snapshot["w"].is_pinned()
    assert float(snapshot["w"].abs().sum()) == 0.0
