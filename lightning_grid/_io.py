"""Durable local writes: temp file in the same folder, fsync, rename, fsync the folder.

A reader (or a process restarted after SIGKILL) sees the old file or the complete new one, never a
prefix. Remote object stores publish an object atomically when its upload completes, so they need
no rename; the checkpoint store relies on a commit record for them instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import queue
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

import xxhash

from lightning_grid.errors import StoreFullError, StoreWriteError

__all__ = [
    "CHECKSUM",
    "checksum",
    "new_hash",
    "labelled_hash",
    "split_checksum",
    "checksum_stream",
    "atomic_writer",
    "atomic_file",
    "atomic_write_bytes",
    "HashingWriter",
    "StreamWriter",
    "fsync_dir",
    "describe_os_error",
    "write_error",
    "private_user_dir",
]

log = logging.getLogger("lightning_grid")

#: errno values that mean "no room": the disk is full or the user's quota is spent.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


#: The checksum new commit records carry. It guards against torn, truncated and rotted files and
#: wrong copies, not against someone who can write the store (they can write the record too), so
#: a fast non-cryptographic 128-bit hash does the job: XXH3-128 hashes 1 GB in 0.12 s here,
#: sha256 (with the CPU's SHA extensions) in 1.05 s, and both release the GIL. At 1 GB/s of disk,
#: sha256 was what a large save waited for; on two vCPUs, what a periodic save took from training.
CHECKSUM = "xxh3_128"

#: Algorithms a commit record may name: records written before the twelfth session say sha256.
_HASHES: dict[str, Any] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}


def new_hash(algorithm: str | None = None) -> Any:
    """A hash object (``update``/``hexdigest``) for ``algorithm`` (default ``CHECKSUM``); ValueError
    for one this version does not know (a record from a newer lightning-grid)."""
    try:
        return _HASHES[algorithm or CHECKSUM]()
    except KeyError:
        raise ValueError(f"unknown checksum algorithm {algorithm!r}") from None


def labelled_hash() -> tuple[str, Any]:
    """(``CHECKSUM`` now, a new hash object for it): what a writer labels its digest with."""
    return CHECKSUM, new_hash(CHECKSUM)


def checksum(data: bytes | bytearray | memoryview, algorithm: str | None = None) -> str:
    """``"<algorithm>:<hex>"``, the form commit records carry (default algorithm: ``CHECKSUM``)."""
    algorithm = algorithm or CHECKSUM
    digest = new_hash(algorithm)
    digest.update(data)
    return f"{algorithm}:{digest.hexdigest()}"


def checksum_stream(handle: IO[bytes], algorithm: str | None = None) -> tuple[str, int]:
    """(``checksum``'s form, bytes read) for what ``handle`` has left, read 8 MB at a time: a
    sharded checkpoint's files are digested, and verified on resume, without holding one in memory."""
    algorithm = algorithm or CHECKSUM
    digest = new_hash(algorithm)
    size = 0
    while chunk := handle.read(8 << 20):
        digest.update(chunk)
        size += len(chunk)
    return f"{algorithm}:{digest.hexdigest()}", size


def split_checksum(value: str) -> tuple[str, str]:
    """``"xxh3_128:ab…"`` → ``("xxh3_128", "ab…")``; ValueError for anything else."""
    algorithm, sep, hexdigest = value.partition(":")
    if not sep or not algorithm or not hexdigest:
        raise ValueError(f"not a checksum: {value[:40]!r}")
    if algorithm not in _HASHES:
        raise ValueError(
            f"its checksum algorithm {algorithm[:40]!r} is unknown to this version (written by a newer"
            " lightning-grid?)"
        )
    return algorithm, hexdigest


def describe_os_error(exc: OSError) -> str:
    """``no space left on device (ENOSPC)``: the words and the symbol a user can search for."""
    if exc.errno is None:
        return str(exc)
    symbol = errno.errorcode.get(exc.errno, str(exc.errno))
    return f"{(exc.strerror or os.strerror(exc.errno)).lower()} ({symbol})"


def write_error(exc: OSError, path: str, what: str) -> StoreWriteError:
    """The typed error for a failed write of ``path``: ``StoreFullError`` for a full disk or quota,
    ``StoreWriteError`` otherwise; both carry the path and errno and say what was lost."""
    kind = StoreFullError if exc.errno in FULL_ERRNOS else StoreWriteError
    return kind(f"{what} {path} failed: {describe_os_error(exc)}", path=path, errno=exc.errno)


def fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse to open or fsync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str, mode: str = "wb") -> Iterator[IO[Any]]:
    with atomic_file(path) as fd, os.fdopen(fd, mode, closefd=False) as handle:
        yield handle
        handle.flush()


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[int]:
    """The protocol under ``atomic_writer``, for a raw file descriptor: temp file, fsync, rename,
    folder fsync.

    For writers that issue their own large ``os.write`` calls: a buffered file object would add
    nothing but a check per call, and ``sync_file_range`` needs the descriptor anyway."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        try:
            yield fd
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_writer(path) as handle:
        handle.write(data)


class HashingWriter:
    """A write-only file object that hashes and counts what passes through, in one pass.

    A large chunk is hashed on a helper thread while this thread writes it: ``hashlib`` and the
    ``write`` system call both release the GIL, so on two cores the hash costs (almost) nothing
    on top of the write. Each ``write`` returns only once its chunk is hashed, because the caller
    (``torch.save``) may reuse or free the buffer right after.
    """

    #: Chunks at least this big are hashed in parallel with their write; smaller ones inline.
    PARALLEL_BYTES = 1 << 20

    def __init__(self, target: IO[bytes]) -> None:
        self._target = target
        self._algorithm, self._hash = labelled_hash()
        self.size = 0
        self._pool: ThreadPoolExecutor | None = None
        #: The first OSError the target raised. ``torch.save`` turns it into a RuntimeError
        #: ("unexpected pos …") that no longer says the disk is full; the caller reports this instead.
        self.error: OSError | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data)
        if view.nbytes >= self.PARALLEL_BYTES:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning_grid-hash")
            hashed = self._pool.submit(self._hash.update, view)
            try:
                self._write(view)
            finally:
                hashed.result()
        else:
            self._hash.update(view)
            self._write(view)
        self.size += view.nbytes
        return view.nbytes

    def _write(self, view: memoryview) -> None:
        try:
            self._target.write(view)
        except OSError as exc:
            if self.error is None:
                self.error = exc
            raise

    def flush(self) -> None:
        self._target.flush()

    def close(self) -> None:
        """Stops the helper thread (the target stays open: it belongs to the caller)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> HashingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def checksum(self) -> str:
        return f"{self._algorithm}:{self._hash.hexdigest()}"


def _sync_file_range() -> Any:
    """libc's ``sync_file_range`` (Linux), or None: Python's ``os`` does not offer it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _sync_file_range()
_WRITE = 2  # SYNC_FILE_RANGE_WRITE: start writeback of the range's dirty pages; do not wait for it


class StreamWriter:
    """Writes buffers to a file descriptor in order, in one pass: the checksum on a helper thread, the
    disk already busy while later bytes are still being copied in.

    Where the file system takes ``O_DIRECT`` (ext4, xfs, btrfs…), the bytes bypass the page cache:
    each buffer is copied into one of two page-aligned staging buffers (``ctypes.memmove``, which
    releases the GIL) and every full one goes to the disk straight from there, on a write thread,
    while the caller fills the other one and a hash thread hashes it. A buffered write
    instead has the kernel find a free page-cache page for every 4 KB, and on a VM whose host has
    taken back memory the guest freed (``virtio_balloon``) that costs more than the copy: 1 GB
    took 0.3 to 11 s of CPU time buffered on the same disk in the same minute, 0.25 s direct (see
    docs/benchmarks.md). Direct writes also leave the page cache to the training data. The last,
    partial block is written padded and the file cut back to its length. A file system or file
    that refuses ``O_DIRECT`` (tmpfs before 6.6, some FUSE and network file systems) is written
    buffered instead, from the first refusal on: the bytes are the same.

    Buffered (``direct=False``, or refused): ``write`` only queues a buffer (no copy); every
    ``BATCH_BYTES`` the queue goes out in one ``os.writev`` while the helper thread hashes the
    same buffers: ``writev`` and the hash both release the GIL, so the hash costs (almost) no
    time on top of the write, and a checkpoint of many small tensors costs a handful of system
    calls and thread hand-overs rather than several per tensor. After each batch the kernel is
    asked to start writing it out (``sync_file_range``): left alone it starts only once 10 % of
    memory is dirty, so the final ``fsync`` would begin a disk's worth of work only after the
    last byte was copied in. That call is a hint; durability still comes from the caller's
    ``fsync``.

    A caller keeps every buffer it passed unchanged until ``flush``'s event is set (``flush``
    sends what is queued at once; direct, the buffers were copied by the time ``write`` returned)
    or ``close`` returns. A save that fits in one batch is hashed on the calling thread after its
    one write: no helper thread to start or hand over to.
    """

    #: Bytes per write (and per ``sync_file_range`` hint, and per hash task); direct, the size of
    #: each staging buffer, rounded down to whole ``DIRECT_ALIGN`` blocks.
    BATCH_BYTES = 32 << 20
    #: At most this many buffers per ``writev`` (the kernel's IOV_MAX is 1024).
    MAX_BUFFERS = 512
    #: Try ``O_DIRECT`` where the file system allows it (a class attribute, for benchmarks' A/B;
    #: users switch it off with ``LIGHTNING_GRID_DIRECT_IO=0``).
    DIRECT = True
    #: Offsets, lengths and buffer addresses of direct writes are multiples of this: the largest
    #: logical block size in use (4 KB sectors); a device needing more refuses, and is written buffered.
    DIRECT_ALIGN = 4096

    def __init__(self, fd: int, writeback: bool = True, direct: bool | None = None) -> None:
        self._fd = fd
        self._algorithm, self._hash = labelled_hash()
        self._writeback = _SYNC_FILE_RANGE if writeback else None
        self._writeback_wanted = self._writeback  # back on if a direct write is refused midway
        self._queued: list[memoryview] = []
        self._queued_bytes = 0
        self._hasher: _InOrder | None = None
        self._writer: _InOrder | None = None  # direct: full staging buffers go to the disk from here
        self._hashed: threading.Event | None = None  # set once all that was flushed is hashed
        self.size = 0  # bytes written so far
        # Where the file position was: writeback hints are for start + offset, and a direct
        # write's padded tail is cut at start + size.
        try:
            self._start = os.lseek(fd, 0, os.SEEK_CUR)
        except OSError:  # a pipe: no positions, no hints (sync_file_range refuses it too)
            self._start = 0
        self._staging: _DirectStaging | None = None
        if direct is None:
            direct = self.DIRECT and _direct_io_allowed()
        if direct and _set_direct(fd, True, self.DIRECT_ALIGN):
            try:
                self._staging = _DirectStaging(
                    max(self.DIRECT_ALIGN, self.BATCH_BYTES // self.DIRECT_ALIGN * self.DIRECT_ALIGN)
                )
            except (OSError, MemoryError) as exc:  # no memory for staging: buffered, not a failed save
                log.warning(
                    "lightning_grid: writing this checkpoint through the page cache: no memory for"
                    " the O_DIRECT staging buffers (%s)",
                    exc,
                )
                _set_direct(fd, False, self.DIRECT_ALIGN)
            else:
                self._writeback = None  # nothing is left dirty in the page cache

    @property
    def direct(self) -> bool:
        """Whether the bytes went to the disk without the page cache (all of them, so far)."""
        return self._staging is not None and self._staging.direct

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` to be written (and hashed) after what was queued before it."""
        view = memoryview(data).cast("B")
        if self._staging is not None:
            self._copy_in(view)
            return
        offset = 0
        while offset < view.nbytes:  # a large buffer goes out in batch-sized pieces
            piece = view[offset : offset + self.BATCH_BYTES - self._queued_bytes]
            self._queued.append(piece)
            self._queued_bytes += piece.nbytes
            offset += piece.nbytes
            if self._queued_bytes >= self.BATCH_BYTES or len(self._queued) >= self.MAX_BUFFERS:
                self.flush()

    def _copy_in(self, view: memoryview) -> None:
        staging = self._staging
        assert staging is not None
        offset = 0
        while offset < view.nbytes:
            offset += staging.fill(view, offset)
            if staging.full:
                self._send_staged()

    def _send_staged(self) -> None:
        """The current staging buffer to the hash thread and the write thread; the other buffer
        takes the next bytes meanwhile. Written here, on the caller's thread, the copy of one
        buffer and the write of the other would add up: 0.17 s and 0.6 s per GB."""
        staging = self._staging
        assert staging is not None
        if self._hasher is None:
            self._hasher = _InOrder(self._hash_buffers, "lightning_grid-hash")
        if self._writer is None:
            self._writer = _InOrder(self._write_direct_all, "lightning_grid-write")
        view = staging.current()
        self._hashed = self._hasher.submit([view])
        staging.busy(self._hashed, self._writer.submit([view]))
        staging.swap()
        self._writer.raise_failure()  # a full disk stops the copying at the next buffer
        self._hasher.raise_failure()

    def _hash_buffers(self, buffers: list[memoryview]) -> None:
        for buffer in buffers:
            self._hash.update(buffer)

    def _write_direct_all(self, buffers: list[memoryview]) -> None:
        for buffer in buffers:
            self._write_direct(buffer)

    def _write_direct(self, view: memoryview) -> None:
        """``view`` (a staging buffer's bytes) at the end of the file; a last partial block is
        written padded with zeros, and cut off at ``close``. Full buffers are written on the write
        thread, the last one on the caller's once that thread is done: one writer at a time."""
        staging = self._staging
        assert staging is not None
        align = self.DIRECT_ALIGN
        real = view.nbytes
        out = staging.padded(real, align) if staging.direct and real % align else view
        done = 0
        while done < real:
            try:
                written = os.writev(self._fd, [out[done:]])
            except OSError as exc:
                if exc.errno != errno.EINVAL or not staging.direct:
                    raise
                # Refused (an alignment this file system wants, or no O_DIRECT at all after
                # all): the rest goes through the page cache; the bytes are the same.
                _set_direct(self._fd, False, align)
                staging.direct = False
                self._writeback = self._writeback_wanted
                out = view
                continue
            done += written
        if not staging.direct:
            self._hint_writeback(self._start + self.size, real)
        self.size += real

    def flush(self) -> threading.Event | None:
        """Write what is queued now; the event is set once everything written so far is hashed
        too (None: nothing was ever written). Direct, what was passed is copied already (the
        event is set) and a partial staging buffer waits for more: the disk takes whole blocks."""
        if self._staging is not None:
            return _DONE
        if not self._queued:
            return self._hashed
        buffers, self._queued, self._queued_bytes = self._queued, [], 0
        if self._hasher is None:
            self._hasher = _InOrder(self._hash_buffers, "lightning_grid-hash")
        self._hashed = self._hasher.submit(buffers)  # hashed in order: this one is the last
        self._write_all(buffers)
        return self._hashed

    def _write_all(self, buffers: list[memoryview]) -> None:
        start = self.size
        while buffers:
            written = os.writev(self._fd, buffers)  # a short write goes round again
            self.size += written
            while buffers and written >= buffers[0].nbytes:
                written -= buffers[0].nbytes
                buffers = buffers[1:]
            if buffers and written:
                buffers = [buffers[0][written:], *buffers[1:]]
        self._hint_writeback(self._start + start, self.size - start)

    def _hint_writeback(self, offset: int, length: int) -> None:
        """Ask the kernel to start writing out what was just written through the page cache."""
        hint = self._writeback
        if hint is not None and length > 0 and hint(self._fd, offset, length, _WRITE) != 0:
            self._writeback = None  # not supported here: the caller's fsync does it all

    def close(self) -> str:
        """Writes what is queued, waits for the hash of everything; its checksum (``checksum``'s form)."""
        if self._staging is not None:
            self._close_direct()
        elif self._hasher is None:
            buffers, self._queued, self._queued_bytes = self._queued, [], 0
            self._write_all(list(buffers))
            for buffer in buffers:
                self._hash.update(buffer)
        else:
            try:
                self.flush()
            finally:
                self._stop_hasher()
        return f"{self._algorithm}:{self._hash.hexdigest()}"

    def _stop_hasher(self) -> None:
        """Waits for the hash thread, once (``abort`` after ``close`` finds none), and raises what
        the hash raised."""
        hasher, self._hasher = self._hasher, None
        if hasher is not None:
            hasher.stop()

    def _stop_writer(self) -> None:
        """Waits until every full staging buffer is written, once; raises what a write raised."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.stop()

    def _close_direct(self) -> None:
        staging = self._staging
        assert staging is not None
        try:
            self._stop_writer()
            tail = staging.current()
            if tail.nbytes:
                if self._hasher is None:  # all of it in one buffer: hashed here, no helper thread
                    self._hash.update(tail)
                else:
                    self._hashed = self._hasher.submit([tail])
                    staging.busy(self._hashed)
                padded = staging.direct and tail.nbytes % self.DIRECT_ALIGN
                self._write_direct(tail)
                if padded:
                    os.ftruncate(self._fd, self._start + self.size)
            self._stop_hasher()
        finally:
            self.abort()  # after a failure too: no thread reads a buffer once they are given back

    def abort(self) -> None:
        """After a failed write: nothing more is written; returns once no thread reads a buffer.
        The staging buffers go back to the pool, and the descriptor is left without ``O_DIRECT``,
        as the caller gave it."""
        self._queued, self._queued_bytes = [], 0
        with contextlib.suppress(BaseException):
            self._stop_writer()
        with contextlib.suppress(BaseException):
            self._stop_hasher()
        if self._staging is not None:
            self._staging.release()
            if self._staging.direct:
                _set_direct(self._fd, False, self.DIRECT_ALIGN)


#: Set to 0 (or false, no, off) to write checkpoints through the page cache: for a file system
#: that takes ``O_DIRECT`` but is slow with it (some network file systems serve each direct
#: write as one synchronous round trip).
DIRECT_IO_ENV = "LIGHTNING_GRID_DIRECT_IO"


def _direct_io_allowed() -> bool:
    return os.environ.get(DIRECT_IO_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


#: An event that is already set: "nothing to wait for".
_DONE = threading.Event()
_DONE.set()


def _set_direct(fd: int, on: bool, align: int) -> bool:
    """Turn ``O_DIRECT`` on or off for ``fd`` (Linux lets ``fcntl`` change it on an open file);
    whether it is on now. Only a regular file at an aligned position is written direct."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        import fcntl

        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        if on and (not stat.S_ISREG(os.fstat(fd).st_mode) or os.lseek(fd, 0, os.SEEK_CUR) % align):
            return False
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | flag) if on else (flags & ~flag))
        return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & flag)
    except OSError:
        return False


class _DirectStaging:
    """Two page-aligned buffers that take turns: one is filled while the other's bytes are written
    and hashed, each on a helper thread; a buffer is filled again only once both are done with it.

    The buffers come from a small per-process pool and go back to it on ``release``: a fresh
    anonymous mapping pays a page fault per 4 KB on first touch, every save (the same cost the
    direct write avoids in the page cache); kept, they cost their size in resident memory."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.direct = True
        self._buffers = [_POOL.take(capacity), _POOL.take(capacity)]
        self._busy: list[tuple[threading.Event, ...]] = [(), ()]
        self._slot = 0
        self._fill = 0

    @property
    def full(self) -> bool:
        return self._fill == self.capacity

    def current(self) -> memoryview:
        """The bytes the current buffer holds."""
        return self._buffers[self._slot].view[: self._fill]

    def padded(self, real: int, align: int) -> memoryview:
        """The current buffer's first ``real`` bytes rounded up to whole blocks, with zeros (not
        an earlier save's bytes) in the padding, which ``close`` cuts off. Only for the last,
        partial buffer: on the caller's thread, whose current buffer it is."""
        view = self._buffers[self._slot].view
        end = -(-real // align) * align
        view[real:end] = bytes(end - real)
        return view[:end]

    def fill(self, source: memoryview, offset: int) -> int:
        """Copy from ``source[offset:]`` into the current buffer as far as it has room; how much."""
        buffer = self._buffers[self._slot]
        count = min(source.nbytes - offset, self.capacity - self._fill)
        address = _address(source) if count >= _MEMMOVE_BYTES else None
        if address is not None:
            ctypes.memmove(buffer.address + self._fill, address + offset, count)  # without the GIL
        else:
            buffer.view[self._fill : self._fill + count] = source[offset : offset + count]
        self._fill += count
        return count

    def busy(self, *events: threading.Event) -> None:
        """The current buffer is in use until every one of ``events`` is set."""
        self._busy[self._slot] = events

    def swap(self) -> None:
        """Take the other buffer, once every thread is done with what it held."""
        self._slot ^= 1
        self._fill = 0
        for event in self._busy[self._slot]:
            event.wait()

    def release(self) -> None:
        for events in self._busy:
            for event in events:
                event.wait()
        buffers, self._buffers = self._buffers, []
        for buffer in buffers:
            _POOL.give(buffer)


#: Copies at least this big go through ``ctypes.memmove`` without the GIL; smaller ones are
#: slice assignments (a ctypes call costs more than copying a header).
_MEMMOVE_BYTES = 64 << 10


def _address(view: memoryview) -> int | None:
    """The address of a writable, contiguous buffer's first byte (None: read-only, like
    ``bytes``, or empty)."""
    if view.readonly or not view.nbytes or not view.c_contiguous:
        return None
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):
        return None


class _Aligned:
    """An anonymous mapping (page-aligned, as ``O_DIRECT`` needs) and its address."""

    def __init__(self, size: int) -> None:
        import mmap

        # Private: a shared mapping would be the same memory in a process forked after a save
        # (DDP's fork start method, a fork-based pool), and two processes saving at once would
        # write each other's bytes, hashed as their own.
        self.map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
        self.view = memoryview(self.map)
        address = _address(self.view)
        assert address is not None, "an anonymous mapping is writable and contiguous"
        self.address = address
        self.size = size


class _BufferPool:
    """Staging buffers kept between saves: at most ``KEEP`` of them, of the last size asked for."""

    KEEP = 2

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[_Aligned] = []

    def take(self, size: int) -> _Aligned:
        with self._lock:
            while self._free:
                buffer = self._free.pop()
                if buffer.size == size:
                    return buffer
        return _Aligned(size)

    def give(self, buffer: _Aligned) -> None:
        with self._lock:
            if len(self._free) < self.KEEP:
                self._free.append(buffer)


_POOL = _BufferPool()


def _empty_pool_after_fork() -> None:
    """A forked child starts with a pool of its own: no buffers, and a lock nobody holds (the
    parent's writer thread may have held it at the fork)."""
    global _POOL
    _POOL = _BufferPool()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_empty_pool_after_fork)


class _InOrder:
    """One helper thread doing ``work`` on lists of buffers in the order they were submitted (the
    hash's updates; direct writes): after the first error it does nothing more, and the submitter
    raises that error."""

    def __init__(self, work: Callable[[list[memoryview]], None], name: str) -> None:
        self._work = work
        self._queue: queue.SimpleQueue[tuple[list[memoryview], threading.Event] | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, buffers: list[memoryview]) -> threading.Event:
        done = threading.Event()
        self._queue.put((list(buffers), done))
        return done

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            buffers, done = item
            try:
                if self._error is None:
                    self._work(buffers)
            except BaseException as exc:  # raised by raise_failure() or stop(), on the submitter's thread
                self._error = exc
            finally:
                done.set()

    def raise_failure(self) -> None:
        """Raise the error of work done so far, if any (without waiting for what is queued)."""
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Waits until everything submitted is done; raises the first error."""
        self._queue.put(None)
        self._thread.join()
        self.raise_failure()


def private_user_dir(name: str, base: str | None = None) -> str:
    """A folder only this user can write: ``<base>/<name>-<uid>`` (``base``: the temp folder).

    A fixed, shared name in a world-writable folder is a trap: whoever creates it first owns
    everyone's saves, and a symbolic link planted there redirects them. The per-user folder is
    created 0700 and used only when it is a real folder (not a link: ``lstat``, never followed),
    owned by this user and writable by nobody else; otherwise a fresh private ``mkdtemp`` folder
    is used and a warning says why.
    """
    base = base or tempfile.gettempdir()
    uid = os.geteuid()
    path = os.path.join(base, f"{name}-{uid}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)  # never follows a link planted at ``path``
    problem = _not_private(path, uid)
    if problem is None:
        return path
    fresh = tempfile.mkdtemp(prefix=f"{name}-{uid}-", dir=base)
    log.warning("lightning_grid: not using %s (%s); using %s instead", path, problem, fresh)
    return fresh


def _not_private(path: str, uid: int) -> str | None:
    """Why ``path`` is not a private folder of ``uid`` (None: it is, now)."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return describe_os_error(exc)
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a folder"
    if st.st_uid != uid:
        return f"it belongs to uid {st.st_uid}"
    if st.st_mode & 0o022:
        return f"others can write to it (mode {stat.S_IMODE(st.st_mode):o})"
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)  # ours and nobody else could write to it: just make it private
    return None
