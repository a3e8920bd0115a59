"""The execution directory ⇄ the artifact store (any fsspec URL), incrementally.

A manifest beside the files records each file's size, modification time and mode bits;
unchanged files are neither re-uploaded nor re-hashed. Restoring sets those times and modes back
(a ``run.sh`` stays executable), so the next sync after a relaunch uploads only what the new
attempt changed. The manifest is written last: a sync cut short leaves the previous manifest,
which still describes files that are all present.

Symbolic links are kept as links: the manifest records the link's text, and upload never follows
one (a link to ``/data`` uploads nothing of ``/data``). The store's files are never followed as
links either, and a manifest is data from a shared place: every name in it is checked before
anything is written, and restore writes nothing outside its target folder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import posixpath
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from lightning_grid._io import atomic_write_bytes, fsync_dir
from lightning_grid.errors import ManifestError, StoreError, UsageError

__all__ = ["SyncStats", "has_snapshot", "manifest", "upload", "restore", "EXCLUDED", "STORE_TAG"]

log = logging.getLogger("lightning_grid")

MANIFEST = "manifest.json"
#: Marks a folder as (part of) an artifact store, as ``CACHEDIR.TAG`` marks caches: a sync never
#: copies a tagged folder. A store placed inside a script's own folder would otherwise capture
#: every earlier experiment into each new one (1, 2, 4, 8 … copies).
STORE_TAG = ".lightning_grid-store"
#: File names a sync never copies (our own files beside the user's: logs, notices, the tag).
_PRIVATE_PREFIX = ".lightning_grid-"
#: Mode bits restored: permissions only. A set-user-ID bit from a store is not honoured.
_RESTORED_MODE_BITS = 0o777
_MAX_MTIME_NS = 2**63 - 1
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
    #: Entries not restored because the store held a symbolic link where a file belongs (each one
    #: was also logged as a warning): worth an event in the experiment's story.
    refused: list[str] = field(default_factory=list)
    #: Folders inside the synced one that were not uploaded because they hold an artifact store.
    stores_skipped: list[str] = field(default_factory=list)

    def describe(self) -> str:
        text = (
            f"{self.transferred} of {self.files} files, {self.bytes / 1e6:.1f} MB in {self.seconds:.2f}s"
            f" ({self.skipped} unchanged)"
        )
        if self.stores_skipped:
            text += f"; artifact store folders not copied: {', '.join(self.stores_skipped)}"
        if self.refused:
            text += f"; refused (a link in the store): {', '.join(self.refused)}"
        return text


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


@dataclass
class _Tree:
    """What a walk of the execution directory found: regular files and symbolic links."""

    files: dict[str, os.stat_result] = field(default_factory=dict)
    links: dict[str, tuple[str, os.stat_result]] = field(default_factory=dict)
    stores: list[str] = field(default_factory=list)


def _rel(path: str, local_dir: str) -> str:
    return os.path.relpath(path, local_dir).replace(os.sep, "/")


def _walk(local_dir: str, skip: frozenset[str] = frozenset()) -> _Tree:
    """Regular files and links under ``local_dir``; never enters a linked folder, an excluded one,
    one in ``skip`` (real paths) or one tagged as an artifact store. FIFOs, sockets and devices are
    not files a run produces: they are left out."""
    tree = _Tree()
    for folder, dirs, files in os.walk(
        local_dir
    ):  # followlinks=False: a linked folder is listed, not entered
        kept = []
        for name in dirs:
            path = os.path.join(folder, name)
            if name in EXCLUDED:
                continue
            if os.path.islink(path):
                files.append(name)  # recorded as a link below
            elif os.path.realpath(path) in skip or os.path.lexists(os.path.join(path, STORE_TAG)):
                tree.stores.append(_rel(path, local_dir))
            else:
                kept.append(name)
        dirs[:] = kept
        for name in files:
            if name.startswith(_PRIVATE_PREFIX):
                continue
            path = os.path.join(folder, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                tree.links[_rel(path, local_dir)] = (os.readlink(path), st)
            elif stat.S_ISREG(st.st_mode):
                tree.files[_rel(path, local_dir)] = st
    return tree


# -- the manifest: data from a shared place, checked before anything is written -------------------
def _name_problem(rel: Any) -> str | None:
    if not isinstance(rel, str) or not rel:
        return "is not a file name"
    if "\x00" in rel:
        return "contains a NUL byte"
    if rel.startswith("/"):
        return "is an absolute path: it would land outside the execution directory"
    if "\\" in rel:
        return "contains a backslash"
    parts = rel.split("/")
    if ".." in parts:
        return "contains '..': it would land outside the execution directory"
    if any(part in ("", ".") for part in parts):
        return "is not a normalised relative path"
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return "is not an object"
    mtime = entry.get("mtime_ns")
    if not isinstance(mtime, int) or isinstance(mtime, bool) or not 0 <= mtime <= _MAX_MTIME_NS:
        return f"has a bad mtime_ns {mtime!r}"
    if "link" in entry:
        target = entry["link"]
        if not isinstance(target, str) or not target or "\x00" in target:
            return f"has a bad link target {target!r}"
        return None
    if "size" not in entry:
        return "has no size"
    if not _is_int(entry["size"]) or entry["size"] < 0:
        return f"has a bad size {entry['size']!r}"
    mode = entry.get("mode", 0)
    if not _is_int(mode) or not 0 <= mode <= 0o7777:
        return f"has a bad mode {mode!r}"
    return None


def _parse_manifest(data: bytes, where: str) -> dict[str, dict[str, Any]]:
    """The ``files`` of a manifest, every name and entry checked; ``ManifestError`` naming the
    manifest and the bad entry otherwise (never a KeyError or TypeError from deep inside restore)."""
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise ManifestError(f"the manifest {where} is unreadable: {exc}", where) from exc
    files = document.get("files") if isinstance(document, dict) else None
    if not isinstance(files, dict):
        raise ManifestError(f"the manifest {where} is malformed: it has no 'files' object", where)
    for rel, entry in files.items():
        problem = _name_problem(rel) or _entry_problem(entry)
        if problem is not None:
            raise ManifestError(f"the manifest {where} is malformed: entry {rel!r} {problem}", where, rel)
    for rel in files:
        parts = rel.split("/")
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i])
            if folder in files:
                raise ManifestError(
                    f"the manifest {where} is malformed: entry {folder!r} is a file or link and also the"
                    f" folder of entry {rel!r}",
                    where,
                    rel,
                )
    return dict(files)


def _manifest_location(url: str) -> str:
    return f"{url.rstrip('/')}/{MANIFEST}"


def _load_manifest(fs: fsspec.AbstractFileSystem, root: str, url: str) -> dict[str, dict[str, Any]]:
    try:
        data = fs.cat_file(f"{root}/{MANIFEST}")
    except FileNotFoundError:
        return {}
    return _parse_manifest(data, _manifest_location(url))


def has_snapshot(url: str) -> bool:
    """Whether the store at ``url`` already holds an execution directory (its manifest)."""
    fs, root = _open(url)
    return bool(fs.exists(f"{root}/{MANIFEST}"))


def manifest(url: str) -> dict[str, dict[str, Any]]:
    """What the store at ``url`` holds: each entry's size, modification time, mode bits (and, for a
    symbolic link, its ``link`` text). Empty: nothing yet."""
    fs, root = _open(url)
    return _load_manifest(fs, root, url)


# -- upload ------------------------------------------------------------------------------------------
def _within(path: str, folder: str) -> bool:
    return path != folder and os.path.commonpath([path, folder]) == folder


def _tag_store(root: str) -> None:
    """Tags a local store's folder (and, in the launcher's layout ``<artifacts>/<name>/execdir``, the
    experiment's folder, which holds its checkpoints too) so that no sync ever copies it."""
    folders = [root]
    if os.path.basename(root) == "execdir":
        folders.append(os.path.dirname(root))
    for folder in folders:
        tag = os.path.join(folder, STORE_TAG)
        if not os.path.lexists(tag):
            os.makedirs(folder, exist_ok=True)
            atomic_write_bytes(
                tag, b"lightning-grid artifact store: never copied by an execution directory sync\n"
            )


def upload(local_dir: str, url: str) -> SyncStats:
    """Make the store at ``url`` hold exactly the files and links of ``local_dir``.

    A local store inside ``local_dir`` (and any folder tagged as a store) is not copied into
    itself."""
    start = time.monotonic()
    fs, root = _open(url)
    local = isinstance(fs, LocalFileSystem)
    skip: frozenset[str] = frozenset()
    if local:
        store, base = os.path.realpath(root), os.path.realpath(local_dir)
        if store == base or _within(base, store):
            raise UsageError(f"the artifact store {url} cannot hold {local_dir}, the folder it saves")
        if _within(store, base):
            skip = frozenset({store})
        try:
            _tag_store(root)
        except OSError as exc:
            raise StoreError(f"could not write to the artifact store {url}: {exc}") from exc
    try:
        old = _load_manifest(fs, root, url)
    except ManifestError as exc:
        # Our own output, damaged: copy everything again and trust nothing it names.
        log.warning("lightning_grid: %s; uploading every file again", exc)
        old = {}
    tree = _walk(local_dir, skip)
    for rel in tree.stores:
        log.warning(
            "lightning_grid: not copying %s: it holds an artifact store", os.path.join(local_dir, rel)
        )
    current = tree.files
    stats = SyncStats(files=len(current) + len(tree.links), stores_skipped=list(tree.stores))
    manifest: dict[str, dict[str, Any]] = {
        rel: {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "mode": stat.S_IMODE(st.st_mode)}
        for rel, st in current.items()
    }
    for rel, (target, st) in tree.links.items():
        manifest[rel] = {"link": target, "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def same_bytes(rel: str) -> bool:
        before = old.get(rel)
        if before is None or "link" in before:
            return False
        return bool(
            before["size"] == manifest[rel]["size"] and before["mtime_ns"] == manifest[rel]["mtime_ns"]
        )

    # A change of mode bits alone is recorded in the manifest; the bytes are not sent again.
    changed = sorted(rel for rel in current if not same_bytes(rel))
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
    # Stored bytes nothing refers to any more: files gone, or now links.
    for rel in {rel for rel, entry in old.items() if "link" not in entry} - set(current):
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(f"{root}/files/{rel}")
    stats.seconds = time.monotonic() - start
    return stats


def _open_regular(path: str) -> int:
    """A descriptor of the regular file at ``path``; never follows a link there (ELOOP)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", path)
    return fd


def _upload_one(fs: fsspec.AbstractFileSystem, src: str, dst: str, url: str) -> None:
    try:
        with os.fdopen(_open_regular(src), "rb") as handle, fs.open(dst, "wb") as out:
            shutil.copyfileobj(handle, out, 8 << 20)
    except OSError as exc:
        raise StoreError(f"could not upload {src} to {url}: {exc}") from exc


def _copy_file(src: str, dst_fd: int) -> None:
    """Copy in the kernel where it can (copy_file_range, then sendfile), else through a buffer."""
    with os.fdopen(_open_regular(src), "rb") as handle:
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
            advance(os.path.getsize(tmp))
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


# -- restore -----------------------------------------------------------------------------------------
def _safe_destination(base: str, rel: str) -> str:
    """Where ``rel`` goes under ``base`` (a real path): its folder resolved, its own name not (a link
    already there is replaced, never followed)."""
    problem = _name_problem(rel)
    if problem is not None or posixpath.normpath(rel) != rel:
        raise StoreError(f"refusing to restore {rel!r}: it would land outside the execution directory")
    parts = rel.split("/")
    folder = os.path.realpath(os.path.join(base, *parts[:-1]))
    if folder != base and not _within(folder, base):
        raise StoreError(f"refusing to restore {rel!r}: it would land outside the execution directory")
    return os.path.join(folder, parts[-1])


def _make_folder(base: str, dest: str, rel: str) -> str:
    """Creates ``dest``'s folder and checks, now, that it is still inside ``base`` (no link on the way)."""
    folder = os.path.dirname(dest)
    os.makedirs(folder, exist_ok=True)
    real = os.path.realpath(folder)
    if real != base and not _within(real, base):
        raise StoreError(f"refusing to restore {rel!r}: its folder leads outside the execution directory")
    return real


def _local_source(files_root: str, rel: str) -> str | None:
    """The stored file of ``rel`` in a local store, or None when a link is anywhere on its path
    (the store's folder was tampered with: following it would copy some other file in)."""
    src = os.path.join(files_root, *rel.split("/"))
    if os.path.realpath(src) != src or os.path.islink(src):
        return None
    return src


def restore(url: str, local_dir: str) -> SyncStats:
    """Fill ``local_dir`` with what the store holds (with the recorded modification times and modes)."""
    start = time.monotonic()
    fs, root = _open(url)
    manifest = _load_manifest(fs, root, url)  # checked whole before anything is written
    os.makedirs(local_dir, exist_ok=True)
    base = os.path.realpath(local_dir)
    destinations = {rel: _safe_destination(base, rel) for rel in manifest}
    local = isinstance(fs, LocalFileSystem)
    files_root = os.path.realpath(f"{root}/files") if local else ""
    umask = os.umask(0)
    os.umask(umask)
    files = sorted(rel for rel, entry in manifest.items() if "link" not in entry)
    links = sorted(rel for rel, entry in manifest.items() if "link" in entry)
    stats = SyncStats(files=len(manifest))
    with _progress(f"restoring from {url}", sum(int(manifest[rel]["size"]) for rel in files)) as advance:
        for rel in files:
            entry = manifest[rel]
            dest = destinations[rel]
            try:
                folder = _make_folder(base, dest, rel)
                if local:
                    src = _local_source(files_root, rel)
                    if src is None:
                        log.warning(
                            "lightning_grid: not restoring %s: the artifact store %s holds a symbolic link"
                            " there, which is never followed",
                            rel,
                            url,
                        )
                        stats.refused.append(rel)
                        continue
                    reader: Any = os.fdopen(_open_regular(src), "rb")
                else:
                    reader = fs.open(f"{root}/files/{rel}", "rb")
                mode = int(entry.get("mode", 0o666 & ~umask)) & _RESTORED_MODE_BITS
                with reader:
                    _write_restored(
                        reader, os.path.join(folder, os.path.basename(dest)), mode, entry["mtime_ns"]
                    )
            except OSError as exc:
                raise StoreError(f"could not restore {rel} from {url}: {exc}") from exc
            stats.transferred += 1
            stats.bytes += int(entry["size"])
            advance(int(entry["size"]))
        # Links last: no file above was written through one.
        for rel in links:
            entry = manifest[rel]
            dest = destinations[rel]
            try:
                folder = _make_folder(base, dest, rel)
                path = os.path.join(folder, os.path.basename(dest))
                if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
                    os.unlink(path)
                os.symlink(entry["link"], path)
                with contextlib.suppress(NotImplementedError, OSError):
                    os.utime(path, ns=(entry["mtime_ns"], entry["mtime_ns"]), follow_symlinks=False)
            except OSError as exc:
                raise StoreError(f"could not restore the link {rel} from {url}: {exc}") from exc
            stats.transferred += 1
    stats.seconds = time.monotonic() - start
    return stats


def _write_restored(reader: Any, path: str, mode: int, mtime_ns: int) -> None:
    """Bytes to a temp file beside ``path``, mode and times set, then renamed over whatever is at
    ``path`` (a link there is replaced, not written through)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(reader, out, 8 << 20)
            os.fchmod(out.fileno(), mode)
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
