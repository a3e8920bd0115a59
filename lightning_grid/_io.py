"""Durable local writes: temp file in the same folder, fsync, rename, fsync the folder.

A reader (or a process restarted after SIGKILL) sees the old file or the complete new one, never a
prefix. Remote object stores publish an object atomically when its upload completes, so they need
no rename; the checkpoint store relies on a commit record for them instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

__all__ = ["atomic_writer", "atomic_write_bytes", "HashingWriter", "fsync_dir"]


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

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data)
        if view.nbytes >= self.PARALLEL_BYTES:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning_grid-hash")
            hashed = self._pool.submit(self._hash.update, view)
            try:
                self._target.write(view)
            finally:
                hashed.result()
        else:
            self._hash.update(view)
            self._target.write(view)
        self.size += view.nbytes
        return view.nbytes

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
