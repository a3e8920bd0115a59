"""The execution directory ⇄ the artifact store (any fsspec URL), incrementally.

A manifest beside the files records each file's size and modification time; unchanged files are
neither re-uploaded nor re-hashed. Restoring sets those times back, so the next sync after a
relaunch uploads only what the new attempt changed. The manifest is written last: a sync cut
short leaves the previous manifest, which still describes files that are all present.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from lightning_grid._io import atomic_write_bytes, atomic_writer
from lightning_grid.errors import StoreError, UsageError

__all__ = ["SyncStats", "has_snapshot", "upload", "restore", "EXCLUDED"]

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
        for rel in changed:
            _upload_one(fs, local, os.path.join(local_dir, rel), f"{root}/files/{rel}", url)
            stats.transferred += 1
            stats.bytes += current[rel].st_size
            advance(current[rel].st_size)
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


def _upload_one(fs: fsspec.AbstractFileSystem, local: bool, src: str, dst: str, url: str) -> None:
    try:
        if local:
            with open(src, "rb") as handle, atomic_writer(dst) as out:
                shutil.copyfileobj(handle, out, 1 << 20)
        else:
            fs.put_file(src, dst)
    except OSError as exc:
        raise StoreError(f"could not upload {src} to {url}: {exc}") from exc


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
