"""Contract tests for CheckpointStore, written once and run on every fsspec backend we claim."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from pathlib import Path

import fsspec
import pytest
import torch

from lightning_grid.checkpoints import PREEMPTED_MARKER, CheckpointStore
from lightning_grid.errors import CorruptCheckpointError, StoreError, StoreUnwritableError
from tests.helpers import unreachable_s3_store


class StoreContract:
    """Subclasses provide ``url``; every behaviour below must hold on that backend."""

    @pytest.fixture
    def store(self, url: str) -> CheckpointStore:
        return CheckpointStore(url, retries=1, backoff_s=0.01)

    def _fs_path(self, store: CheckpointStore, name: str) -> str:
        return f"{store.root}/{name}"

    def test_save_commit_and_load_round_trip(self, store: CheckpointStore) -> None:
        payload = {"w": torch.arange(10.0), "step": 7}
        record = store.save(payload, step=7, reason="preempted", meta={"epoch": 0})
        assert record.step == 7 and record.size > 0 and record.checksum.startswith("xxh3_128:")
        found = store.latest_valid()
        assert found is not None
        got_record, data = found
        assert got_record == record
        loaded = store.load_bytes(data)
        assert torch.equal(loaded["w"], payload["w"]) and loaded["step"] == 7

    def test_most_recently_written_wins(self, store: CheckpointStore) -> None:
        # An older, longer run left step 10; this run restarted and wrote step 5 after it.
        for step in (3, 10, 5):
            store.save({"step": step}, step=step)
        found = store.latest_valid()
        assert found is not None and found[0].step == 5
        assert [r.step for r in store.committed()] == [5, 10, 3]
        store.prune(keep=1)
        assert [r.step for r in store.committed()] == [5]  # the checkpoint just written survives

    def test_uncommitted_payload_is_never_trusted(self, store: CheckpointStore) -> None:
        store.save({"step": 1}, step=1)
        # A writer killed after the payload but before its commit record.
        store.fs.pipe_file(self._fs_path(store, "ckpt-0000000099-1.ckpt"), b"partial bytes")
        found = store.latest_valid()
        assert found is not None and found[0].step == 1
        store.remove_uncommitted()
        assert store.fs.exists(
            self._fs_path(store, "ckpt-0000000099-1.ckpt")
        )  # young: may be another writer's
        store.remove_uncommitted(older_than_s=0)
        assert not store.fs.exists(self._fs_path(store, "ckpt-0000000099-1.ckpt"))

    def test_corrupt_newest_falls_back_with_warning_naming_both(self, store: CheckpointStore, caplog) -> None:
        good = store.save({"step": 1}, step=1)
        bad = store.save({"step": 2}, step=2)
        data = store.fs.cat_file(self._fs_path(store, bad.name))
        store.fs.pipe_file(self._fs_path(store, bad.name), data[: len(data) // 2])  # truncated
        with caplog.at_level(logging.WARNING, logger="lightning_grid"):
            found = store.latest_valid()
        assert found is not None and found[0] == good
        message = caplog.text
        assert bad.name in message and good.name in message

    def test_records_from_before_the_xxh3_checksum_still_verify(self, store: CheckpointStore) -> None:
        """A store written by an earlier version (``"sha256": "<hex>"`` in its records) resumes:
        its checkpoints verify, a flipped bit is still caught, and new saves go beside them."""
        old = store.save({"w": torch.arange(5.0)}, step=3)
        data = store.fs.cat_file(self._fs_path(store, old.name))
        legacy = json.loads(old.to_json())
        del legacy["checksum"]
        legacy["sha256"] = hashlib.sha256(data).hexdigest()
        store.fs.pipe_file(self._fs_path(store, old.name + ".commit.json"), json.dumps(legacy).encode())
        found = store.latest_valid()
        assert found is not None and found[0].checksum == f"sha256:{legacy['sha256']}"
        assert torch.equal(store.load_bytes(found[1])["w"], torch.arange(5.0))
        new = store.save({"w": torch.ones(2)}, step=4)
        assert [r.step for r in store.committed()] == [4, 3] and new.checksum.startswith("xxh3_128:")
        flipped = bytearray(data)
        flipped[len(flipped) // 2] ^= 0x01
        store.fs.pipe_file(self._fs_path(store, old.name), bytes(flipped))
        with pytest.raises(CorruptCheckpointError, match="sha256"):
            store.read_verified(found[0])

    def test_a_record_naming_an_unknown_checksum_is_not_trusted(
        self, store: CheckpointStore, caplog: pytest.LogCaptureFixture
    ) -> None:
        good = store.save({"w": torch.zeros(3)}, step=1)
        newer = store.save({"w": torch.ones(3)}, step=2)
        raw = json.loads(newer.to_json())
        raw["checksum"] = "blake3:" + "0" * 64  # a newer version's algorithm, say
        store.fs.pipe_file(self._fs_path(store, newer.name + ".commit.json"), json.dumps(raw).encode())
        with caplog.at_level(logging.WARNING, logger="lightning_grid"):
            found = store.latest_valid()
        assert found is not None and found[0] == good
        assert "blake3" in caplog.text

    def test_flipped_bit_is_detected(self, store: CheckpointStore) -> None:
        record = store.save({"w": torch.zeros(100)}, step=4)
        data = bytearray(store.fs.cat_file(self._fs_path(store, record.name)))
        data[len(data) // 2] ^= 0x01
        store.fs.pipe_file(self._fs_path(store, record.name), bytes(data))
        with pytest.raises(CorruptCheckpointError, match="xxh3_128"):
            store.read_verified(record)
        assert store.latest_valid() is None

    def test_prune_keeps_newest(self, store: CheckpointStore) -> None:
        for step in range(1, 6):
            store.save({"step": step}, step=step)
        store.prune(keep=2)
        assert [r.step for r in store.committed()] == [5, 4]
        names = store.fs.ls(store.root, detail=False)
        assert sum(n.endswith(".ckpt") for n in names) == 2

    def test_marker_round_trip(self, store: CheckpointStore) -> None:
        assert store.read_marker() is None
        store.write_marker({"step": 12, "checkpoint": "x"})
        assert store.read_marker() == {"step": 12, "checkpoint": "x"}
        assert json.loads(store.fs.cat_file(self._fs_path(store, PREEMPTED_MARKER)))["step"] == 12
        store.clear_marker()
        assert store.read_marker() is None

    def test_before_commit_runs_between_bytes_and_record(self, store: CheckpointStore) -> None:
        seen: list[int] = []

        def check() -> None:
            seen.append(len(store.committed()))

        store.save({"a": 1}, step=1, before_commit=check)
        assert seen == [0] and len(store.committed()) == 1

    def test_writable_check_passes(self, store: CheckpointStore) -> None:
        store.check_writable()


class TestLocalStore(StoreContract):
    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        return str(tmp_path / "ckpts")

    def test_no_temp_files_left_behind(self, store: CheckpointStore, tmp_path: Path) -> None:
        store.save({"a": torch.ones(3)}, step=1)
        leftovers = [p.name for p in (tmp_path / "ckpts").iterdir() if p.name.endswith(".tmp")]
        assert leftovers == []

    def test_unwritable_location_is_a_clear_error(self, tmp_path: Path) -> None:
        blocker = tmp_path / "file"
        blocker.write_text("not a folder")
        with pytest.raises(StoreUnwritableError, match=str(blocker / "sub")):
            CheckpointStore(str(blocker / "sub")).check_writable()


class TestMemoryStore(StoreContract):
    @pytest.fixture
    def url(self) -> str:
        return f"memory://lg-{uuid.uuid4().hex}"


def test_unreachable_remote_store_keeps_local_copy_and_says_where(tmp_path: Path) -> None:
    pytest.importorskip("s3fs")
    store = unreachable_s3_store(retries=1, spool_dir=str(tmp_path / "spool"))
    with pytest.raises(StoreError) as info:
        store.save({"w": torch.ones(4)}, step=3)
    message = str(info.value)
    assert "after 2 tries" in message and str(tmp_path / "spool") in message
    # one folder per store URL, with the payload and its commit record (for the next run to upload)
    kept = [p for p in (tmp_path / "spool").rglob("*.ckpt")]
    assert len(kept) == 1 and torch.load(kept[0])["w"].sum() == 4
    assert kept[0].with_name(kept[0].name + ".commit.json").exists()


def test_unknown_scheme_is_a_store_error() -> None:
    with pytest.raises(StoreError, match="nosuchscheme"):
        CheckpointStore("nosuchscheme://x/y")


def test_memory_fs_is_real_fsspec() -> None:
    # Guards the contract suite itself: the memory backend must be fsspec's, not a stand-in.
    assert type(fsspec.filesystem("memory")).__module__.startswith("fsspec.")
