"""The execution directory ⇄ the artifact store (any fsspec URL), incrementally.

A manifest beside the files records each file's size and modification time; unchanged files are
neither re-uploaded nor re-hashed. Restoring sets those times back, so the next sync after a
relaunch uploads only what the new attempt changed. The manifest is written last: a sync cut
short leaves the previous manifest, which still describes files that are all present.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from lightning_grid._io import atomic_write_bytes, fsync_dir
from lightning_grid.errors import StoreError, UsageError

__all__ = ["SyncStats", "has_snapshot", "manifest", "upload", "restore", "EXCLUDED"]

MANIFEST = "manifest.json"
#: Never copied into or out of an execution directory: caches and environments, not results.
EXCLUDED = frozenset(
    {
        ".git",
        ".venv",
        "venv",
        "__pycache__",
        "node_modules",
        ".lightning_grid",
        ".mypy_cache",
        ".ruff_cache",
        ".pytest_cache",
    }
)


@dataclass
class SyncStats:
    files: int = 0
    transferred: int = 0
    skipped: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def describe(self) -> str:
        return (
            f"{self.transferred} of {self.files} files, {self.bytes / 1e6:.1f} MB in {self.seconds:.2f}s"
            f" ({self.skipped} unchanged)"
        )


_PROGRESS_BYTES = 64 * 1024 * 1024


@contextmanager
def _progress(label: str, total: int) -> Iterator[Any]:
    """A progress bar for large syncs on a terminal; a no-op otherwise."""
    if total < _PROGRESS_BYTES or not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _open(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ValueError, ImportError) as exc:
        raise UsageError(f"cannot use artifact store {url!r}: {exc}") from exc
    return fs, root.rstrip("/")


def _walk(local_dir: str) -> dict[str, os.stat_result]:
    found: dict[str, os.stat_result] = {}
    for folder, dirs, files in os.walk(local_dir):
        dirs[:] = [d for d in dirs if d not in EXCLUDED]
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path) or name.startswith(".lightning_grid-"):
                continue
            rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
            found[rel] = os.stat(path)
    return found


def _load_manifest(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, dict[str, Any]]:
    try:
        return dict(json.loads(fs.cat_file(f"{root}/{MANIFEST}"))["files"])
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError) as exc:
        raise StoreError(f"the manifest at {root}/{MANIFEST} is unreadable: {exc}") from exc


def has_snapshot(url: str) -> bool:
    """Whether the store at ``url`` already holds an execution directory (its manifest)."""
    fs, root = _open(url)
    return bool(fs.exists(f"{root}/{MANIFEST}"))


def manifest(url: str) -> dict[str, dict[str, Any]]:
    """What the store at ``url`` holds: each file's size and modification time (empty: nothing yet)."""
    fs, root = _open(url)
    return _load_manifest(fs, root)


def upload(local_dir: str, url: str) -> SyncStats:
    """Make the store at ``url`` hold exactly the files of ``local_dir``."""
    start = time.monotonic()
    fs, root = _open(url)
    local = isinstance(fs, LocalFileSystem)
    old = _load_manifest(fs, root)
    current = _walk(local_dir)
    stats = SyncStats(files=len(current))
    manifest = {rel: {"size": st.st_size, "mtime_ns": st.st_mtime_ns} for rel, st in current.items()}
    changed = sorted(rel for rel in manifest if old.get(rel) != manifest[rel])
    stats.skipped = len(manifest) - len(changed)
    with _progress(f"saving to {url}", sum(current[rel].st_size for rel in changed)) as advance:
        if local:
            _upload_local(local_dir, root, changed, url, advance)
        else:
            for rel in changed:
                _upload_one(fs, os.path.join(local_dir, rel), f"{root}/files/{rel}", url)
                advance(current[rel].st_size)
        stats.transferred = len(changed)
        stats.bytes = sum(current[rel].st_size for rel in changed)
    data = json.dumps({"files": manifest, "time": time.time()}, sort_keys=True).encode()

    if local:
        atomic_write_bytes(f"{root}/{MANIFEST}", data)
    else:
        fs.pipe_file(f"{root}/{MANIFEST}", data)
    for rel in set(old) - set(manifest):
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(f"{root}/files/{rel}")
    stats.seconds = time.monotonic() - start
    return stats


def _upload_one(fs: fsspec.AbstractFileSystem, src: str, dst: str, url: str) -> None:
    try:
        fs.put_file(src, dst)
    except OSError as exc:
        raise StoreError(f"could not upload {src} to {url}: {exc}") from exc


def _copy_file(src: str, dst_fd: int) -> None:
    """Copy in the kernel where it can (copy_file_range, then sendfile), else through a buffer."""
    with open(src, "rb") as handle:
        fd = handle.fileno()
        size = os.fstat(fd).st_size
        done = 0
        for name in ("copy_file_range", "sendfile"):
            call = getattr(os, name, None)
            if call is None:
                continue
            try:
                while done < size:
                    if name == "sendfile":
                        n = call(dst_fd, fd, done, size - done)
                    else:
                        n = call(fd, dst_fd, size - done, done, done)
                    if n == 0:
                        break
                    done += n
                return
            except OSError as exc:
                if done or exc.errno not in (
                    errno.EXDEV,
                    errno.ENOSYS,
                    errno.EINVAL,
                    errno.EOPNOTSUPP,
                    errno.EBADF,
                ):
                    raise
        handle.seek(done)
        os.lseek(dst_fd, done, os.SEEK_SET)
        while chunk := handle.read(1 << 20):
            os.write(dst_fd, chunk)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _upload_local(local_dir: str, root: str, changed: list[str], url: str, advance: Any) -> None:
    """Copy every changed file to a temporary name, make them all durable at once, then rename.

    Each file still replaces its predecessor atomically and is durable before it does (a reader,
    or the previous manifest, never sees a prefix), but the fsyncs run together, in parallel,
    after the copies: one journal commit serves many files instead of one commit per file.
    """
    staged: list[tuple[str, str]] = []
    try:
        for rel in changed:
            src = os.path.join(local_dir, rel)
            dst = f"{root}/files/{rel}"
            folder = os.path.dirname(dst)
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dst)}.", suffix=".tmp", dir=folder)
            staged.append((tmp, dst))
            try:
                _copy_file(src, fd)
            finally:
                os.close(fd)
            advance(os.path.getsize(src))
        if staged:
            with ThreadPoolExecutor(max_workers=min(16, len(staged))) as pool:
                list(pool.map(_fsync_path, [tmp for tmp, _ in staged]))
        for tmp, dst in staged:
            os.replace(tmp, dst)
        staged_dirs = {os.path.dirname(dst) for _, dst in staged}
    except BaseException as exc:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            raise StoreError(f"could not upload {local_dir} to {url}: {exc}") from exc
        raise
    for folder in sorted(staged_dirs):
        fsync_dir(folder)


def _safe_destination(local_dir: str, rel: str) -> str:
    normal = posixpath.normpath(rel)
    if rel.startswith("/") or normal.startswith("..") or normal in (".", "") or "\\" in rel:
        raise StoreError(f"refusing to restore {rel!r}: it would land outside the execution directory")
    dest = os.path.realpath(os.path.join(local_dir, *normal.split("/")))
    base = os.path.realpath(local_dir)
    if os.path.commonpath([dest, base]) != base:
        raise StoreError(f"refusing to restore {rel!r}: it would land outside the execution directory")
    return dest


def restore(url: str, local_dir: str) -> SyncStats:
    """Fill ``local_dir`` with what the store holds (with the recorded modification times)."""
    start = time.monotonic()
    fs, root = _open(url)
    manifest = _load_manifest(fs, root)
    os.makedirs(local_dir, exist_ok=True)
    destinations = {rel: _safe_destination(local_dir, rel) for rel in manifest}  # all checked first
    stats = SyncStats(files=len(manifest))
    with _progress(f"restoring from {url}", sum(int(e["size"]) for e in manifest.values())) as advance:
        for rel, entry in sorted(manifest.items()):
            dest = destinations[rel]
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            try:
                fs.get_file(f"{root}/files/{rel}", dest)
            except OSError as exc:
                raise StoreError(f"could not restore {rel} from {url}: {exc}") from exc
            os.utime(dest, ns=(entry["mtime_ns"], entry["mtime_ns"]))
            stats.transferred += 1
            stats.bytes += int(entry["size"])
            advance(int(entry["size"]))
    stats.seconds = time.monotonic() - start
    return stats
