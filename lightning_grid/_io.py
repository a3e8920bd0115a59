"""Durable local writes: temp file in the same folder, fsync, rename, fsync the folder.

A reader (or a process restarted after SIGKILL) sees the old file or the complete new one, never a
prefix. Remote object stores publish an object atomically when its upload completes, so they need
no rename; the checkpoint store relies on a commit record for them instead.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

from lightning_grid.errors import StoreFullError, StoreWriteError

__all__ = [
    "atomic_writer",
    "atomic_write_bytes",
    "HashingWriter",
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
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
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
