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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

from lightning_grid.errors import StoreFullError, StoreWriteError

__all__ = [
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
        self._hash = hashlib.sha256()
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
    def sha256(self) -> str:
        return self._hash.hexdigest()


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
    """Writes buffers to a file descriptor in order, in one pass: sha256 on a helper thread, the
    disk already busy while later bytes are still being copied in.

    ``write`` only queues a buffer (no copy); every ``BATCH_BYTES`` the queue goes out in one
    ``os.writev`` while the helper thread hashes the same buffers: ``writev`` and ``hashlib`` both
    release the GIL, so the hash costs (almost) no time on top of the write, and a checkpoint of
    many small tensors costs a handful of system calls and thread hand-overs rather than several
    per tensor. After each batch the kernel is asked to start writing it out
    (``sync_file_range``): left alone it starts only once 10 % of memory is dirty, so the final
    ``fsync`` would begin a disk's worth of work only after the last byte was copied in. That
    call is a hint; durability still comes from the caller's ``fsync``.

    A caller keeps every buffer it passed unchanged until ``flush``'s event is set (``flush``
    sends what is queued at once) or ``close`` returns. A save that fits in one batch is hashed
    on the calling thread after its one ``writev``: no helper thread to start or hand over to.
    """

    #: Bytes per ``writev`` (and per ``sync_file_range`` hint, and per hash task).
    BATCH_BYTES = 32 << 20
    #: At most this many buffers per ``writev`` (the kernel's IOV_MAX is 1024).
    MAX_BUFFERS = 512

    def __init__(self, fd: int, writeback: bool = True) -> None:
        self._fd = fd
        self._hash = hashlib.sha256()
        self._writeback = _SYNC_FILE_RANGE if writeback else None
        self._queued: list[memoryview] = []
        self._queued_bytes = 0
        self._hasher: _Hasher | None = None
        self._hashed: threading.Event | None = None  # set once all that was flushed is hashed
        self.size = 0  # bytes written so far

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` to be written (and hashed) after what was queued before it."""
        view = memoryview(data).cast("B")
        offset = 0
        while offset < view.nbytes:  # a large buffer goes out in batch-sized pieces
            piece = view[offset : offset + self.BATCH_BYTES - self._queued_bytes]
            self._queued.append(piece)
            self._queued_bytes += piece.nbytes
            offset += piece.nbytes
            if self._queued_bytes >= self.BATCH_BYTES or len(self._queued) >= self.MAX_BUFFERS:
                self.flush()

    def flush(self) -> threading.Event | None:
        """Write what is queued now; the event is set once everything written so far is hashed
        too (None: nothing was ever written)."""
        if not self._queued:
            return self._hashed
        buffers, self._queued, self._queued_bytes = self._queued, [], 0
        if self._hasher is None:
            self._hasher = _Hasher(self._hash)
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
        hint = self._writeback
        if hint is not None and self.size > start and hint(self._fd, start, self.size - start, _WRITE) != 0:
            self._writeback = None  # not supported here: the caller's fsync does it all

    def close(self) -> str:
        """Writes what is queued, waits for the hash of everything; its hex sha256."""
        if self._hasher is None:
            buffers, self._queued, self._queued_bytes = self._queued, [], 0
            self._write_all(list(buffers))
            for buffer in buffers:
                self._hash.update(buffer)
            return self._hash.hexdigest()
        try:
            self.flush()
        finally:
            self._hasher.stop()
        return self._hash.hexdigest()

    def abort(self) -> None:
        """After a failed write: nothing more is written; returns once no thread reads a buffer."""
        self._queued, self._queued_bytes = [], 0
        if self._hasher is not None:
            with contextlib.suppress(BaseException):
                self._hasher.stop()


class _Hasher:
    """One helper thread feeding buffers to one hash, in the order they were submitted."""

    def __init__(self, target: Any) -> None:
        self._target = target
        self._queue: queue.SimpleQueue[tuple[list[memoryview], threading.Event] | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lightning_grid-hash", daemon=True)
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
                    for buffer in buffers:
                        self._target.update(buffer)
            except BaseException as exc:  # reported by stop(), on the writing thread
                self._error = exc
            finally:
                done.set()

    def stop(self) -> None:
        """Waits until everything submitted is hashed; raises what the hash raised."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


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
