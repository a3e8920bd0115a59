"""The streamed checkpoint writer: the same archive as ``torch.save``, hashed in one pass, never
committed when torn; and the snapshot a periodic save writes from.

No timing is asserted here: the benchmarks measure speed (``python -m benchmarks``).
"""

from __future__ import annotations

import collections
import errno
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_grid import _io
from lightning_grid import checkpoints as ckpt
from lightning_grid.checkpoints import CheckpointStore
from lightning_grid.errors import StoreFullError
from tests.helpers import child_env

Point = collections.namedtuple("Point", "x y")


def _varied() -> dict[str, Any]:
    """Tensors of every shape of trouble: views, shared storages, odd sizes, empty, 0-dim,
    non-contiguous, several dtypes, a Parameter, plain values and containers around them."""
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(300_001, generator=gen)  # spans several write chunks in the tests below
    return {
        "state_dict": collections.OrderedDict(
            weight=torch.nn.Parameter(torch.randn(7, 5, generator=gen)),
            bias=torch.randn(5, generator=gen).to(torch.bfloat16),
            view=big[10:20],  # shares big's storage: saved once, as in torch.save
            transposed=torch.randn(4, 6, generator=gen).t(),
        ),
        "big": big,
        "empty": torch.empty(0),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "ints": torch.arange(13, dtype=torch.int16),
        "flags": torch.tensor([True, False, True]),
        "complex": torch.randn(3, dtype=torch.complex64, generator=gen),
        "half": torch.randn(9, generator=gen).half(),
        "nested": [{"momentum": torch.ones(3)}, (1, 2.5, "x", None), Point(1, torch.zeros(2))],
        "epoch": 4,
        "name": "run",
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.stride() == b.stride()
            and torch.equal(a, b)
        )
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _records(data: bytes) -> dict[str, bytes]:
    reader = torch._C.PyTorchFileReader(io.BytesIO(data))
    return {name: bytes(reader.get_record(name)) for name in reader.get_all_records()}


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Write and kick writeback in small pieces, so a small checkpoint crosses many boundaries."""
    monkeypatch.setattr(_io.StreamWriter, "BATCH_BYTES", 4099)
    monkeypatch.setattr(_io.StreamWriter, "MAX_BUFFERS", 3)


@pytest.mark.usefixtures("small_chunks")
def test_streamed_archive_is_torch_saves_record_for_record(tmp_path: Path) -> None:
    obj = _varied()
    path = tmp_path / "x.ckpt"
    digest, size = ckpt._serialise(obj, str(path), "saving")
    ours = path.read_bytes()
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    theirs = buffer.getvalue()
    assert size == len(ours) == len(theirs)
    mine, reference = _records(ours), _records(theirs)
    assert list(mine) == list(reference)
    # Every record is the same bytes, except the id torch draws at random for each save.
    assert {n for n in mine if mine[n] != reference[n]} <= {n for n in mine if n.endswith("serialization_id")}
    reader, ref_reader = (torch._C.PyTorchFileReader(io.BytesIO(d)) for d in (ours, theirs))
    assert all(reader.get_record_offset(n) == ref_reader.get_record_offset(n) for n in mine)
    loaded = torch.load(io.BytesIO(ours), weights_only=False)
    assert _same(obj, loaded)
    # Storage sharing survives, as with torch.save.
    assert (
        loaded["state_dict"]["view"].untyped_storage().data_ptr()
        == loaded["big"].untyped_storage().data_ptr()
    )


@pytest.mark.usefixtures("small_chunks")
def test_single_pass_hash_is_the_checksum_of_the_committed_file(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "ck"))
    for reason in ("periodic", "preempted"):
        record = store.save(_varied(), 3, reason=reason)
        data = (tmp_path / "ck" / record.name).read_bytes()
        assert record.size == len(data)
        assert record.checksum == _io.checksum(data)
    found = store.latest_valid()
    assert found is not None
    assert _same(_varied(), store.load_bytes(found[1]))


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
@pytest.mark.parametrize("batch", [1000, 1 << 20])
def test_stream_writer_hash_and_bytes_survive_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch: int, direct: bool
) -> None:
    """``writev`` may write less than asked, even part of a buffer: the rest goes round again,
    hashed once; with one batch (hashed on the calling thread) and with many (on the helper)."""
    real_writev = os.writev
    monkeypatch.setattr(_io.StreamWriter, "BATCH_BYTES", batch)
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)

    def short(f: int, buffers: list[Any]) -> int:
        return real_writev(f, [bytes(memoryview(buffers[0])[:333])])

    payload = [os.urandom(5000), b"", bytearray(b"abc"), memoryview(os.urandom(2500))]
    try:
        monkeypatch.setattr(os, "writev", short)
        stream = _io.StreamWriter(fd, direct=direct)
        for piece in payload:
            stream.write(piece)
        digest = stream.close()
    finally:
        monkeypatch.setattr(os, "writev", real_writev)
        os.close(fd)
    expected = b"".join(bytes(p) for p in payload)
    assert path.read_bytes() == expected
    assert digest == _io.checksum(expected)
    assert stream.size == len(expected)


def test_a_torn_write_is_never_committed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills part-way through the payload: no commit record, no temp file, a typed error
    naming the cause, and the previous checkpoint stays the one to resume from."""
    store = CheckpointStore(str(tmp_path / "ck"))
    first = store.save({"w": torch.zeros(10)}, 1)
    real_writev = os.writev
    written = 0

    def fills_up(fd: int, buffers: list[Any]) -> int:
        nonlocal written
        if written > 600_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real_writev(fd, buffers)
        written += n
        return n

    monkeypatch.setattr(_io.StreamWriter, "BATCH_BYTES", 1 << 16)
    monkeypatch.setattr(os, "writev", fills_up)
    with pytest.raises(StoreFullError, match="ENOSPC"):
        store.save({"w": torch.ones(1_000_000)}, 2, reason="preempted")
    monkeypatch.setattr(os, "writev", real_writev)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == sorted(
        [first.name, first.name + ".commit.json"]
    )
    found = store.latest_valid()
    assert found is not None and found[0].name == first.name


_KILLED_WRITER = """
import os, sys, torch
from lightning_grid.checkpoints import CheckpointStore
real_writev = os.writev
def write_then_die(fd, buffers):
    n = real_writev(fd, buffers)
    os.kill(os.getpid(), 9)
    return n
os.writev = write_then_die
CheckpointStore(sys.argv[1]).save({"w": torch.ones(2_000_000)}, 2)
"""


def test_killed_mid_write_leaves_the_previous_checkpoint_in_force(tmp_path: Path) -> None:
    """SIGKILL while the payload is being written: whatever is on disk, only the earlier
    checkpoint is committed, and it verifies."""
    store = CheckpointStore(str(tmp_path / "ck"))
    first = store.save({"w": torch.zeros(10)}, 1)
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, str(tmp_path / "ck")], env=child_env(), timeout=120
    )
    assert killed.returncode == -9
    assert [r.name for r in store.committed()] == [first.name]
    found = store.latest_valid()
    assert found is not None and found[0].name == first.name


def test_falls_back_to_torch_save_without_skip_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch < 2.6 (no ``skip_data``): torch.save writes it all, hashed the same way."""
    monkeypatch.delattr(torch.serialization, "skip_data")
    assert ckpt._layout(_varied()) is None
    store = CheckpointStore(str(tmp_path / "ck"))
    record = store.save(_varied(), 1, reason="preempted")
    data = (tmp_path / "ck" / record.name).read_bytes()
    assert record.checksum == _io.checksum(data)
    assert _same(_varied(), store.load_bytes(data))


def test_an_unrecognised_layout_falls_back_to_torch_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the holes torch leaves cannot be matched to storages, nothing is guessed."""
    monkeypatch.setattr(ckpt, "_capturing_pickle", lambda found: ckpt.pickle)
    assert ckpt._layout(_varied()) is None
    path = tmp_path / "x.ckpt"
    digest, _ = ckpt._serialise(_varied(), str(path), "saving")
    assert digest == _io.checksum(path.read_bytes())
    assert _same(_varied(), torch.load(path, weights_only=False))


@pytest.mark.parametrize("chunk", [1, 1000, 4096, 8198, 1 << 20])
@pytest.mark.usefixtures("small_chunks")
def test_staged_copies_write_every_byte_in_order(tmp_path: Path, chunk: int) -> None:
    """The chunked device → host path (two buffers taking turns), run here on CPU storages."""
    gen = torch.Generator().manual_seed(1)
    storages = [torch.randn(n, generator=gen).untyped_storage() for n in (1, 2500, 1001)]
    path = tmp_path / "staged"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        stream = _io.StreamWriter(fd)
        staging = ckpt._Staging(max(s.nbytes() for s in storages), chunk_bytes=chunk)
        for storage in storages:
            staging.write(storage, stream)
        digest = stream.close()
    finally:
        os.close(fd)
    expected = b"".join(bytes(s) for s in storages)
    assert path.read_bytes() == expected
    assert digest == _io.checksum(expected)


@pytest.mark.gpu
def test_gpu_checkpoint_streams_through_staging_and_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CUDA storages go to the file a chunk at a time, copied on a side stream; the archive is
    torch.save's (records equal), keeps its cuda location tags, and hashes like the file."""
    monkeypatch.setattr(ckpt._Staging, "CHUNK_BYTES", 1 << 20)
    obj = {
        "w": torch.randn(3_000_000, device="cuda"),  # 12 MB: 12 chunks
        "b": torch.randn(7, device="cuda").half(),
        "cpu": torch.arange(5),
    }
    path = tmp_path / "gpu.ckpt"
    digest, _ = ckpt._serialise(obj, str(path), "saving")
    ours = path.read_bytes()
    assert digest == _io.checksum(ours)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    mine, reference = _records(ours), _records(buffer.getvalue())
    assert {n for n in mine if mine[n] != reference.get(n)} <= {
        n for n in mine if n.endswith("serialization_id")
    }
    loaded = torch.load(io.BytesIO(ours), weights_only=False)
    assert loaded["w"].is_cuda and torch.equal(loaded["w"], obj["w"])
    assert torch.equal(
        torch.load(io.BytesIO(ours), map_location="cpu", weights_only=False)["b"], obj["b"].cpu()
    )
