"""Checkpoint bytes written with ``O_DIRECT``: aligned writes from page-aligned staging buffers, a
padded last block cut back to the file's length, and the page cache used instead, with the same
bytes, wherever the file system or the file refuses.

No timing is asserted here: ``benchmarks/`` measures what bypassing the page cache is worth.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_grid import _io
from lightning_grid.checkpoints import CheckpointStore

ALIGN = _io.StreamWriter.DIRECT_ALIGN


def _direct_works(folder: str) -> bool:
    """Whether this file system takes an aligned ``O_DIRECT`` write (tmpfs before Linux 6.6 and
    some FUSE mounts refuse)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    import mmap
    import tempfile

    fd, path = tempfile.mkstemp(dir=folder)
    try:
        buffer = mmap.mmap(-1, ALIGN, flags=mmap.MAP_PRIVATE)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
        return os.writev(fd, [memoryview(buffer)]) == ALIGN
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(path)


@pytest.fixture(autouse=True)
def _needs_direct_io(tmp_path: Path) -> None:
    if not _direct_works(str(tmp_path)):
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")


class Recorder:
    """Wraps ``os.writev``: for each call, whether the file had ``O_DIRECT``, the length and the
    address of each buffer; optionally refuses direct writes the way a file system does."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, refuse_direct: bool = False) -> None:
        self.calls: list[tuple[bool, list[tuple[int, int]]]] = []
        self.refused = 0
        real = os.writev

        def writev(fd: int, buffers: list[Any]) -> int:
            direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
            shapes = [(memoryview(b).nbytes, _address(memoryview(b))) for b in buffers]
            self.calls.append((direct, shapes))
            if direct and refuse_direct:
                self.refused += 1
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(fd, buffers)

        monkeypatch.setattr(os, "writev", writev)

    @property
    def direct_calls(self) -> list[list[tuple[int, int]]]:
        return [shapes for direct, shapes in self.calls if direct]


def _address(view: memoryview) -> int:
    if view.readonly:
        return -1
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _write(path: Path, pieces: list[Any], **kwargs: Any) -> tuple[str, _io.StreamWriter]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        stream = _io.StreamWriter(fd, **kwargs)
        for piece in pieces:
            stream.write(piece)
        return stream.close(), stream
    finally:
        os.close(fd)


def _pieces() -> list[Any]:
    """Small read-only headers between large writable tensors, odd lengths everywhere."""
    gen = torch.Generator().manual_seed(3)
    big = torch.randn(70_001, generator=gen)  # 280 KB: memmove'd, spans many staging buffers
    small = torch.randn(5, generator=gen)
    return [b"PK\x03\x04header", memoryview(big.numpy()).cast("B"), b"", b"x" * 4097, small.numpy().tobytes()]


# 32 blocks: the 280 KB tensor is memmove'd across buffer boundaries, from offsets inside it.
@pytest.mark.parametrize("batch", [ALIGN, 3 * ALIGN + 100, 32 * ALIGN, 1 << 20])
def test_direct_writes_are_whole_aligned_blocks_and_the_file_is_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch: int
) -> None:
    monkeypatch.setattr(_io.StreamWriter, "BATCH_BYTES", batch)
    recorder = Recorder(monkeypatch)
    pieces = _pieces()
    digest, stream = _write(tmp_path / "out", pieces)
    expected = b"".join(bytes(p) for p in pieces)
    assert stream.direct
    assert (tmp_path / "out").read_bytes() == expected  # the padded last block was cut off
    assert digest == _io.checksum(expected)
    assert stream.size == len(expected)
    assert recorder.calls and all(direct for direct, _ in recorder.calls)
    for shapes in recorder.direct_calls:
        for length, address in shapes:
            assert length % ALIGN == 0 and address % ALIGN == 0
    assert len(expected) % ALIGN  # the test's payload does end in a partial block


def test_a_refused_direct_write_goes_through_the_page_cache_with_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that accepts the flag and then refuses the write (EINVAL): the first refusal
    turns the flag off and that buffer and the rest are written buffered, nothing lost or doubled."""
    monkeypatch.setattr(_io.StreamWriter, "BATCH_BYTES", 2 * ALIGN)
    recorder = Recorder(monkeypatch, refuse_direct=True)
    pieces = _pieces()
    digest, stream = _write(tmp_path / "out", pieces)
    expected = b"".join(bytes(p) for p in pieces)
    assert recorder.refused == 1 and not stream.direct
    assert (tmp_path / "out").read_bytes() == expected
    assert digest == _io.checksum(expected)
    assert [direct for direct, _ in recorder.calls[1:]] == [False] * (len(recorder.calls) - 1)


def test_after_a_refusal_the_page_cache_is_told_to_write_out_what_follows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Direct writes need no writeback hint; once the file system refuses them, every buffered
    write after that asks the kernel to start writing it out, as a buffered save does, so the
    final fsync does not begin the whole disk's worth of work."""
    monkeypatch.setattr(_io.StreamWriter, "BATCH_BYTES", 2 * ALIGN)
    hints: list[tuple[int, int]] = []

    def hint(fd: int, offset: int, length: int, flags: int) -> int:
        hints.append((offset, length))
        return 0

    monkeypatch.setattr(_io, "_SYNC_FILE_RANGE", hint)
    Recorder(monkeypatch, refuse_direct=True)
    pieces = _pieces()
    _, stream = _write(tmp_path / "out", pieces)
    size = sum(memoryview(p).nbytes for p in pieces)
    assert not stream.direct
    # Contiguous ranges from the first byte to the last: every buffered byte was hinted, once.
    assert hints[0][0] == 0 and sum(length for _, length in hints) == size
    assert all(a + n == b for (a, n), (b, _) in zip(hints, hints[1:]))


def test_direct_writes_ask_for_no_writeback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_io.StreamWriter, "BATCH_BYTES", ALIGN)  # the write thread's writes too
    hints: list[tuple[int, int]] = []
    monkeypatch.setattr(_io, "_SYNC_FILE_RANGE", lambda fd, offset, length, flags: hints.append(1) or 0)
    _, stream = _write(tmp_path / "out", _pieces())
    assert stream.direct and hints == []


def test_buffered_hints_are_for_the_file_positions_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer handed a descriptor already past a header asks for writeback of what it wrote,
    not of the header's range."""
    monkeypatch.setattr(_io.StreamWriter, "BATCH_BYTES", 2 * ALIGN)
    hints: list[tuple[int, int]] = []
    monkeypatch.setattr(
        _io, "_SYNC_FILE_RANGE", lambda fd, offset, length, flags: hints.append((offset, length)) or 0
    )
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"h" * 100)
        stream = _io.StreamWriter(fd, direct=False)
        stream.write(os.urandom(5 * ALIGN))
        stream.close()
    finally:
        os.close(fd)
    assert hints[0][0] == 100 and sum(n for _, n in hints) == 5 * ALIGN


def test_a_save_within_one_staging_buffer_starts_no_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fixed cost of a small save: no helper thread to start or hand over to."""
    started: list[str] = []
    real_start = threading.Thread.start

    def start(self: threading.Thread) -> None:
        started.append(self.name)
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    payload = os.urandom(_io.StreamWriter.BATCH_BYTES - 1)
    digest, stream = _write(tmp_path / "out", [payload])
    assert stream.direct and digest == _io.checksum(payload) and started == []


class FailingHash:
    """A hash that fails at its second buffer (a bug, or memory that went bad)."""

    def __init__(self) -> None:
        self.calls = 0

    def update(self, data: Any) -> None:
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("hash failed")

    def hexdigest(self) -> str:
        return ""


def test_a_failed_hash_stops_the_copying_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(_io._HASHES, "xxh3_128", FailingHash)
    monkeypatch.setattr(_io.StreamWriter, "BATCH_BYTES", ALIGN)
    copied: list[int] = []
    real_fill = _io._DirectStaging.fill
    monkeypatch.setattr(
        _io._DirectStaging,
        "fill",
        lambda self, source, offset: copied.append(1) or real_fill(self, source, offset),
    )
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    stream = _io.StreamWriter(fd)
    try:
        with pytest.raises(RuntimeError, match="hash failed"):
            stream.write(os.urandom(64 * ALIGN))
    finally:
        stream.abort()
        os.close(fd)
    assert len(copied) < 64 and not _helper_threads()


def test_a_short_direct_write_is_finished_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk takes part of a block (a nearly full disk does that): the next write would start
    unaligned, so the rest is written buffered; the file is still exact."""
    monkeypatch.setattr(_io.StreamWriter, "BATCH_BYTES", 4 * ALIGN)
    real = os.writev
    shortened = []

    def short_once(fd: int, buffers: list[Any]) -> int:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        if shortened or not flags & os.O_DIRECT:
            return real(fd, buffers)
        shortened.append(True)  # the disk took 1000 bytes of the first block, and no more
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        try:
            return real(fd, [memoryview(buffers[0])[:1000]])
        finally:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)

    monkeypatch.setattr(os, "writev", short_once)
    pieces = _pieces()
    digest, stream = _write(tmp_path / "out", pieces)
    expected = b"".join(bytes(p) for p in pieces)
    assert shortened and not stream.direct
    assert (tmp_path / "out").read_bytes() == expected
    assert digest == _io.checksum(expected)


def test_a_file_at_an_unaligned_position_is_written_buffered(tmp_path: Path) -> None:
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"12345")
        stream = _io.StreamWriter(fd)
        assert not stream.direct
        stream.write(b"abc" * 5000)
        stream.close()
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        os.close(fd)
    assert path.read_bytes() == b"12345" + b"abc" * 5000


@pytest.mark.parametrize("value", ["0", "off", " False "])
def test_buffered_when_the_user_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(_io.DIRECT_IO_ENV, value)
    recorder = Recorder(monkeypatch)
    store = CheckpointStore(str(tmp_path / "ck"))
    record = store.save({"w": torch.randn(50_000)}, 1)
    assert recorder.calls and not recorder.direct_calls
    assert record.checksum == _io.checksum((tmp_path / "ck" / record.name).read_bytes())
    monkeypatch.setenv(_io.DIRECT_IO_ENV, "1")
    store.save({"w": torch.randn(50_000)}, 2)
    assert recorder.direct_calls


def test_a_failed_direct_write_returns_the_staging_buffers_and_stops_hashing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_io.StreamWriter, "BATCH_BYTES", ALIGN)
    monkeypatch.setattr(_io, "_POOL", _io._BufferPool())
    real = os.writev
    calls = []

    def fails_third(fd: int, buffers: list[Any]) -> int:
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, buffers)

    monkeypatch.setattr(os, "writev", fails_third)
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    stream = _io.StreamWriter(fd)
    try:
        with pytest.raises(OSError, match="No space"):
            for piece in _pieces():
                stream.write(piece)
        stream.abort()
    finally:
        os.close(fd)
    assert len(calls) == 3  # nothing was written after the disk said it was full
    assert len(_io._POOL._free) == 2  # both staging buffers are back, for the next save
    assert not _helper_threads()


def _helper_threads() -> list[str]:
    """The writer's own helper threads still running (other tests' threads have other names)."""
    ours = {"lightning_grid-hash", "lightning_grid-write"}
    return [t.name for t in threading.enumerate() if t.name in ours and t.is_alive()]


def test_saves_reuse_the_same_staging_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh mapping pays a page fault per 4 KB at every save; the pool keeps two buffers."""
    monkeypatch.setattr(_io, "_POOL", _io._BufferPool())
    made: list[_io._Aligned] = []

    class Counted(_io._Aligned):
        def __init__(self, size: int) -> None:
            super().__init__(size)
            made.append(self)

    monkeypatch.setattr(_io, "_Aligned", Counted)
    recorder = Recorder(monkeypatch)
    store = CheckpointStore(str(tmp_path / "ck"))
    state = {"w": torch.randn(100_000)}
    for step in (1, 2, 3):
        store.save(state, step, reason="periodic")
    assert len(recorder.direct_calls) >= 3
    assert len(made) == 2  # the first save's two buffers, and no others
    found = store.latest_valid()
    assert found is not None and found[0].step == 3
    assert torch.equal(store.load_bytes(found[1])["w"], state["w"])


def test_the_pool_keeps_two_buffers_of_the_size_in_use() -> None:
    pool = _io._BufferPool()
    first, second, third = pool.take(ALIGN), pool.take(ALIGN), pool.take(ALIGN)
    assert first.address % ALIGN == 0 and len({first.address, second.address, third.address}) == 3
    for buffer in (first, second, third):
        pool.give(buffer)
    assert len(pool._free) == pool.KEEP == 2
    again = {pool.take(ALIGN).address, pool.take(ALIGN).address}
    assert again == {second.address, first.address}
    pool.give(first)
    assert pool.take(2 * ALIGN).size == 2 * ALIGN and not pool._free  # a stale size is dropped


def test_bytes_read_back_at_once_go_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A remote store's spool file is uploaded right after it is written, and a store inside a
    launched run's working directory is copied by the launcher right after the exit: both are
    written buffered, where the reader finds them. A local store elsewhere is written direct."""
    from lightning_grid.contract import ENV_EXPERIMENT

    state = {"w": torch.randn(50_000)}
    recorder = Recorder(monkeypatch)
    remote = CheckpointStore(f"memory://direct-io-{uuid.uuid4().hex}", spool_dir=str(tmp_path / "spool"))
    record = remote.save(state, 1)
    assert recorder.calls and not recorder.direct_calls
    assert record.checksum == _io.checksum(remote.fs.cat_file(f"{remote.root}/{record.name}"))

    workdir = tmp_path / "execdir"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    monkeypatch.setenv(ENV_EXPERIMENT, "exp")
    recorder.calls.clear()
    CheckpointStore("ckpts").save(state, 2)  # the script's own folder, in the execution directory
    assert recorder.calls and not recorder.direct_calls
    CheckpointStore(str(tmp_path / "artifacts" / "exp" / "checkpoints")).save(state, 3)  # the launcher's
    assert recorder.direct_calls
    recorder.calls.clear()
    monkeypatch.delenv(ENV_EXPERIMENT)
    CheckpointStore("ckpts").save(state, 4)  # not launched: nothing copies it
    assert recorder.direct_calls


class SlowHash:
    """XXH3-128 that takes its time before reading each buffer: a staging buffer refilled before
    its hash is done would be hashed with the next bytes, and the checksum would not match."""

    def __init__(self) -> None:
        self._inner = _io.xxhash.xxh3_128()

    def update(self, data: Any) -> None:
        time.sleep(0.005)
        self._inner.update(data)

    def hexdigest(self) -> str:
        return str(self._inner.hexdigest())


def test_a_staging_buffer_is_refilled_only_once_its_hash_is_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(_io._HASHES, "xxh3_128", SlowHash)
    monkeypatch.setattr(_io.StreamWriter, "BATCH_BYTES", ALIGN)
    pieces = [os.urandom(ALIGN * 7 + 5), os.urandom(3 * ALIGN)]
    digest, _ = _write(tmp_path / "out", pieces)
    assert digest == _io.checksum(b"".join(pieces))


def test_the_next_buffer_is_filled_while_the_last_one_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy into one staging buffer and the direct write of the other overlap: each full
    buffer's write is held here until the caller has copied bytes into the other buffer after
    sending this one, which it could not do if it waited for the write. The last, partial buffer
    is written by the caller, after every full one."""
    monkeypatch.setattr(_io.StreamWriter, "BATCH_BYTES", ALIGN)
    events: list[tuple[str, int]] = []  # ("sent" | "fill", staging buffer address), in order
    changed = threading.Condition()

    def note(kind: str, staging: Any) -> None:
        with changed:
            events.append((kind, staging._buffers[staging._slot].address))
            changed.notify_all()

    real_fill, real_busy = _io._DirectStaging.fill, _io._DirectStaging.busy

    def fill(self: Any, source: memoryview, offset: int) -> int:
        note("fill", self)
        return real_fill(self, source, offset)

    def busy(self: Any, *done: threading.Event) -> None:
        note("sent", self)
        real_busy(self, *done)

    monkeypatch.setattr(_io._DirectStaging, "fill", fill)
    monkeypatch.setattr(_io._DirectStaging, "busy", busy)

    def filled_since_sent(address: int) -> bool:
        sent = [i for i, event in enumerate(events) if event == ("sent", address)]
        return bool(sent) and any(kind == "fill" and where != address for kind, where in events[sent[-1] :])

    real = os.writev
    writes: list[tuple[str, int, bool]] = []

    def writev(fd: int, buffers: list[Any]) -> int:
        name = threading.current_thread().name
        overlapped = False
        if name == "lightning_grid-write":
            with changed:
                overlapped = changed.wait_for(lambda: filled_since_sent(_address(memoryview(buffers[0]))), 5)
        writes.append((name, memoryview(buffers[0]).nbytes, overlapped))
        return real(fd, buffers)

    monkeypatch.setattr(os, "writev", writev)
    payload = os.urandom(5 * ALIGN + 123)
    digest, stream = _write(tmp_path / "out", [payload])
    assert stream.direct and (tmp_path / "out").read_bytes() == payload
    assert digest == _io.checksum(payload)
    *full, last = writes
    assert [(name, size) for name, size, _ in full] == [("lightning_grid-write", ALIGN)] * 5
    assert all(overlapped for _, _, overlapped in full)
    assert last[0] == threading.current_thread().name and last[1] == ALIGN  # 123 bytes, padded


def test_a_staging_buffer_is_refilled_only_once_its_write_is_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow disk: the caller, copying ahead, must wait for a buffer's write before it fills it
    again, or the file would hold the next buffer's bytes twice."""
    monkeypatch.setattr(_io.StreamWriter, "BATCH_BYTES", ALIGN)
    real = os.writev

    def slow(fd: int, buffers: list[Any]) -> int:
        time.sleep(0.01)
        return real(fd, buffers)

    monkeypatch.setattr(os, "writev", slow)
    pieces = [os.urandom(ALIGN * 9 + 5), os.urandom(3 * ALIGN)]
    digest, _ = _write(tmp_path / "out", pieces)
    assert (tmp_path / "out").read_bytes() == b"".join(pieces)
    assert digest == _io.checksum(b"".join(pieces))


def test_a_failed_last_write_leaves_no_thread_no_buffer_and_no_o_direct(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills at the padded last block: the error reaches the caller, the hash thread is
    gone and both staging buffers are back before ``close`` returns, and the caller's descriptor
    is as it gave it (without ``O_DIRECT``)."""
    monkeypatch.setitem(_io._HASHES, "xxh3_128", SlowHash)
    monkeypatch.setattr(_io.StreamWriter, "BATCH_BYTES", ALIGN)
    monkeypatch.setattr(_io, "_POOL", _io._BufferPool())
    real = os.writev

    def full_at_the_tail(fd: int, buffers: list[Any]) -> int:
        if memoryview(buffers[0]).nbytes < ALIGN * 2 and os.fstat(fd).st_size >= 3 * ALIGN:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, buffers)

    monkeypatch.setattr(os, "writev", full_at_the_tail)
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    try:
        stream = _io.StreamWriter(fd)
        stream.write(os.urandom(3 * ALIGN + 10))
        with pytest.raises(OSError, match="No space"):
            stream.close()
        assert not _helper_threads()
        assert len(_io._POOL._free) == 2
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        os.close(fd)


def test_a_forked_child_has_staging_memory_of_its_own(tmp_path: Path) -> None:
    """After a fork (DDP's fork start method, a fork-based pool), the child must not write into
    the parent's staging buffers: its pool starts empty, and the mappings are private."""
    parent_buffer = _io._POOL.take(ALIGN)
    parent_buffer.view[:4] = b"mine"
    _io._POOL.give(parent_buffer)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running the parent's cleanup
        try:
            empty = not _io._POOL._free
            parent_buffer.view[:4] = b"kid!"
            os.write(write, b"1" if empty else b"0")
        finally:
            os._exit(0)
    os.close(write)
    report = os.read(read, 1)
    os.close(read)
    os.waitpid(pid, 0)
    assert report == b"1"  # the child's pool was empty
    assert bytes(parent_buffer.view[:4]) == b"mine"  # and its write did not reach this process


def test_no_memory_for_staging_writes_buffered_instead_of_failing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A preemption save under memory pressure (``ulimit -v``, strict overcommit) must not fail
    for want of 64 MB of staging: it goes through the page cache, with a warning."""
    monkeypatch.setattr(_io, "_POOL", _io._BufferPool())

    def no_memory(size: int) -> None:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(_io, "_Aligned", no_memory)
    recorder = Recorder(monkeypatch)
    pieces = _pieces()
    with caplog.at_level("WARNING", logger="lightning_grid"):
        digest, stream = _write(tmp_path / "out", pieces)
    assert not stream.direct and recorder.calls and not recorder.direct_calls
    assert (tmp_path / "out").read_bytes() == b"".join(bytes(p) for p in pieces)
    assert digest == _io.checksum(b"".join(bytes(p) for p in pieces))
    assert "page cache" in caplog.text
