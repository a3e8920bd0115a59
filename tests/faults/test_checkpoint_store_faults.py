"""Hostile input to the checkpoint store: commit records that name files outside the folder, and a
spool folder someone else planted. Real files on the local filesystem; a real (unreachable) S3
endpoint where a remote store must fail."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import tempfile
import time
from pathlib import Path

import pytest
import torch

from lightning_grid.checkpoints import CheckpointStore
from lightning_grid.errors import StoreError
from tests.helpers import unreachable_s3_store

HOSTILE_NAMES = [
    "../../x.ckpt",
    "/ABSOLUTE/x.ckpt",  # replaced by the victim's absolute path
    "x\x00.ckpt",
    "x\n.ckpt",
    "..",
    "sub/../../../x.ckpt",
]


def _plant_record(folder: Path, file_name: str, name: str, data: bytes, when: float) -> None:
    """A commit record as another process (or a bad actor) could leave one in a shared folder."""
    record = {
        "name": name,
        "step": 99,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "time": when,
        "reason": "periodic",
        "meta": {},
    }
    (folder / file_name).write_text(json.dumps(record))


@pytest.mark.parametrize("hostile", HOSTILE_NAMES, ids=repr)
def test_commit_record_names_never_leave_the_folder(
    tmp_path: Path, hostile: str, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "a" / "b" / "store"
    store = CheckpointStore(str(folder))
    first = store.save({"w": torch.ones(2)}, step=1)
    newest = store.save({"w": torch.zeros(2)}, step=2)
    victim = tmp_path / "a" / "x.ckpt"  # where ../../x.ckpt lands
    secret = b"not yours to read or delete"
    victim.write_bytes(secret)
    name = str(victim) if hostile.startswith("/ABSOLUTE") else hostile
    # One planted record newer than everything (a resume would read it), one older (prune would delete it).
    _plant_record(folder, "ckpt-0000000099-9.ckpt.commit.json", name, secret, time.time() + 3600)
    _plant_record(folder, "ckpt-0000000098-8.ckpt.commit.json", name, secret, 1.0)

    with caplog.at_level(logging.WARNING, logger="lightning_grid"):
        committed = store.committed()
        found = store.latest_valid()
    assert [r.name for r in committed] == [newest.name, first.name]
    assert found is not None and found[0] == newest and found[1] != secret
    assert "ckpt-0000000099-9.ckpt.commit.json" in caplog.text, caplog.text
    assert "ckpt-0000000098-8.ckpt.commit.json" in caplog.text, caplog.text

    store.prune(keep=1)
    store.remove_uncommitted(older_than_s=0)
    assert victim.read_bytes() == secret
    assert [r.name for r in store.committed()] == [newest.name]


def test_record_naming_another_payload_is_ignored(tmp_path: Path) -> None:
    """A record whose ``name`` is not the payload beside it (copied, or planted to make prune delete
    a file it does not own) counts for nothing."""
    store = CheckpointStore(str(tmp_path / "store"))
    keep = store.save({"w": 1}, step=1)
    data = (tmp_path / "store" / keep.name).read_bytes()
    _plant_record(tmp_path / "store", "ckpt-0000000050-5.ckpt.commit.json", keep.name, data, 1.0)
    assert [r.name for r in store.committed()] == [keep.name]
    store.prune(keep=1)
    assert (tmp_path / "store" / keep.name).exists()


@pytest.mark.parametrize("planted", ["symlink-old-name", "symlink-user-name", "other-users-dir"])
def test_spool_is_private_and_never_follows_a_planted_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, planted: str
) -> None:
    pytest.importorskip("s3fs")
    shared_tmp = tmp_path / "tmp"  # stands for /tmp: world-writable and sticky
    shared_tmp.mkdir(mode=0o1777)
    os.chmod(shared_tmp, 0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(shared_tmp))
    victim = tmp_path / "victim"
    victim.mkdir()
    if planted == "symlink-old-name":  # the fixed name used before: anyone could create it first
        (shared_tmp / "lightning_grid_spool").symlink_to(victim)
    elif planted == "symlink-user-name":
        (shared_tmp / f"lightning_grid-spool-{os.geteuid()}").symlink_to(victim)
    else:
        other = shared_tmp / f"lightning_grid-spool-{os.geteuid()}"
        other.mkdir(mode=0o777)
        os.chmod(other, 0o777)
        os.chown(other, 12345, 12345) if os.geteuid() == 0 else None

    with pytest.raises(StoreError) as info:
        unreachable_s3_store(retries=0).save({"w": torch.ones(4)}, step=3)

    assert list(victim.iterdir()) == [], "the spool followed a planted link"
    kept = Path(str(info.value).rsplit("the checkpoint is kept at ", 1)[1])
    assert kept.exists() and torch.load(kept)["w"].sum() == 4
    spool = kept.parent.parent  # <spool>/<one folder per store URL>/<checkpoint>
    for folder in (spool, kept.parent):
        st = os.lstat(folder)
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
        assert stat.S_IMODE(st.st_mode) == 0o700
    assert os.path.realpath(kept) == str(kept), "the spool path goes through a link"
    assert spool.parent == shared_tmp


def test_a_checkpoint_spooled_while_the_store_was_down_is_uploaded_when_it_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the checkpoint saved while the object store was unreachable stayed in the spool and
    was never used; the next run resumed from an older one. Now the next run on this machine
    uploads and commits it first (and only for the store it was saved for)."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    down = unreachable_s3_store(retries=0)
    with pytest.raises(StoreError):
        down.save({"w": torch.full((4,), 7.0)}, step=9, reason="preempted")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"key": "x", "secret": "y", "client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
        import s3fs

        s3fs.S3FileSystem(**options).mkdir("bucket")
        other = CheckpointStore("s3://bucket/other-run", storage_options=options)
        assert other.recover_spooled() == []  # never another store's checkpoint
        back = CheckpointStore("s3://bucket/run", storage_options=options)
        assert [r.step for r in back.recover_spooled()] == [9]
        record, data = back.latest_valid() or (None, b"")
        assert record is not None and record.step == 9 and record.reason == "preempted"
        assert CheckpointStore.load_bytes(data)["w"].sum() == 28
        assert back.recover_spooled() == []  # the spool was emptied
    finally:
        server.stop()
