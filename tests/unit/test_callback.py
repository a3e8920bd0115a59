"""The callback in-process: set-up order, argument checks, the entry point's instance."""

from __future__ import annotations

import threading
from datetime import timedelta

import lightning.pytorch as pl
import pytest
import torch

from lightning_grid import Resumable, Trainer
from lightning_grid.contract import ENV_CHECKPOINTS, ENV_RESUMABLE
from lightning_grid.resumable.factory import callbacks_factory
from tests.unit.test_lightning_internals import Tiny, _loader, _trainer


class SetupSeen(pl.Callback):
    def __init__(self) -> None:
        self.stages: list[str] = []

    def setup(self, trainer, pl_module, stage):
        self.stages.append(stage)


def test_every_callback_is_set_up_and_resumable_runs_last(tmp_path) -> None:
    before, after = SetupSeen(), SetupSeen()
    resumable = Resumable(dirpath=tmp_path / "ckpts")
    trainer = _trainer(tmp_path, [before, resumable, after])
    trainer.fit(Tiny(), _loader())
    assert before.stages == after.stages == ["fit"]
    assert trainer.callbacks[-1] is resumable


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"every_n_train_steps": -1}, "every_n_train_steps"),
        ({"every_n_seconds": -1}, "every_n_seconds"),
        ({"train_time_interval": timedelta(seconds=-1)}, "train_time_interval"),
        ({"train_time_interval": timedelta(minutes=5), "every_n_seconds": 60}, "not both"),
        ({"keep": 0}, "keep"),
    ],
)
def test_bad_arguments_are_named(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        Resumable(**kwargs)


def test_periodic_saves_are_spelled_as_model_checkpoint_spells_them() -> None:
    """``train_time_interval=timedelta`` beside ``every_n_train_steps``, and 0 or None meaning off."""
    assert Resumable(train_time_interval=timedelta(minutes=10)).every_n_seconds == 600.0
    assert Resumable(every_n_seconds=30).every_n_seconds == 30
    off = [Resumable(every_n_train_steps=0, every_n_seconds=0), Resumable(train_time_interval=timedelta(0))]
    for resumable in off:
        assert resumable.every_n_train_steps is None and resumable.every_n_seconds is None


def test_entry_point_is_silent_without_the_launcher(monkeypatch) -> None:
    monkeypatch.delenv(ENV_RESUMABLE, raising=False)
    assert callbacks_factory() == []


def test_entry_point_instance_stands_down_for_the_users_own(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(ENV_RESUMABLE, "1")
    monkeypatch.setenv(ENV_CHECKPOINTS, str(tmp_path / "launcher-ckpts"))
    mine = Resumable(dirpath=tmp_path / "mine")
    trainer = _trainer(tmp_path, [mine])
    ours = [cb for cb in trainer.callbacks if isinstance(cb, Resumable)]
    assert len(ours) == 2  # Lightning loaded the entry point
    trainer.fit(Tiny(), _loader())
    active = [cb for cb in trainer.callbacks if isinstance(cb, Resumable) and cb._active]
    assert active == [mine]


def test_drop_in_trainer_adds_one_resumable(tmp_path) -> None:
    trainer = Trainer(default_root_dir=tmp_path, max_epochs=1, logger=False, enable_progress_bar=False)
    assert sum(isinstance(cb, Resumable) for cb in trainer.callbacks) == 1
    own = Resumable(keep=5)
    trainer = Trainer(default_root_dir=tmp_path, max_epochs=1, logger=False, callbacks=[own])
    assert trainer.resumable is own


def test_time_based_periodic_saves_keep_the_newest(tmp_path) -> None:
    from lightning_grid.checkpoints import CheckpointStore

    resumable = Resumable(dirpath=tmp_path / "ckpts", every_n_seconds=1e-6, keep=2)
    trainer = _trainer(tmp_path, [resumable], max_epochs=2)
    trainer.fit(Tiny(), _loader(32))
    records = CheckpointStore(str(resumable.store.url)).committed()
    # The newest is the final checkpoint committed when training ended (a rerun trains nothing).
    assert len(records) == 2 and [r.reason for r in records] == ["final", "periodic"]
    assert records[0].step > records[1].step


class WritersSeen(pl.Callback):
    """At every batch start: the writer threads alive, and what the last periodic save wrote from."""

    def __init__(self, resumable: Resumable) -> None:
        self.resumable = resumable
        self.threads: set[int] = set()  # the Resumable's own writer thread(s)
        self.started: set[int] = set()  # any writer thread started during the fit
        self.before = self._writers()  # other tests' idle writers may still be alive in this process
        self.buffers: list[tuple[int, ...]] = []

    @staticmethod
    def _writers() -> set[int]:
        from lightning_grid.resumable.background import THREAD_NAME

        return {t.native_id for t in threading.enumerate() if t.name == THREAD_NAME and t.native_id}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        thread = self.resumable._background._thread
        if thread is not None and thread.native_id:
            self.threads.add(thread.native_id)
        self.started |= self._writers() - self.before
        kept = tuple(b.data_ptr() for b in self.resumable._snapshots._buffers)
        if kept and (not self.buffers or self.buffers[-1] != kept):
            self.buffers.append(kept)


def test_periodic_saves_share_one_writer_thread_and_one_set_of_snapshot_buffers(tmp_path) -> None:
    """A thread started per save cost the training thread ~5 ms each, fresh snapshot memory ~3 ms
    more (docs/benchmarks.md): every save of a fit goes through one thread and refills one copy;
    each is still committed and restores the state it was cut at; the copy is let go at the end."""
    from lightning_grid.checkpoints import CheckpointStore

    resumable = Resumable(dirpath=tmp_path / "ckpts", every_n_train_steps=2, keep=100)
    seen = WritersSeen(resumable)
    trainer = _trainer(tmp_path, [seen, resumable], max_epochs=1)
    trainer.fit(Tiny(), _loader(256))
    store = CheckpointStore(str(resumable.store.url))
    periodic = [r for r in store.committed() if r.reason == "periodic"]  # newest first
    assert len(periodic) >= 3  # a save that finds the previous one still writing is skipped
    assert len(seen.threads) == 1 and seen.started == seen.threads  # one writer thread for every save
    assert len(seen.buffers) == 1  # the same host buffers for every snapshot
    assert resumable._snapshots._buffers == []  # released once training ended
    for record in periodic:  # each snapshot holds its own step's state, not a later one's
        state = CheckpointStore.load_bytes(store.read_verified(record))
        assert state["global_step"] == record.step
    oldest, newest = (CheckpointStore.load_bytes(store.read_verified(r)) for r in (periodic[-1], periodic[0]))
    assert any(
        not torch.equal(oldest["state_dict"][k], newest["state_dict"][k]) for k in oldest["state_dict"]
    )
