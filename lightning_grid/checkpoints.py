"""Checkpoints on any fsspec URL: atomic, checksummed, and trusted only once committed.

Layout under the store URL::

    ckpt-0000001234-1732531234567.ckpt              the torch.save payload
    ckpt-0000001234-1732531234567.ckpt.commit.json  its commit record: step, checksum, size, time
    PREEMPTED.json                                  marker: "preempted and checkpointed at step N"

A payload counts only after its commit record exists, and the record is written only after the
payload is durable (fsync + rename locally; a completed upload remotely). Discovery therefore never
trusts a half-written file, and a SIGKILL at any instant leaves the previous checkpoint in force.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import json
import logging
import os
import pickle
import re
import threading
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from lightning_grid._io import (
    HashingWriter,
    StreamWriter,
    atomic_file,
    atomic_write_bytes,
    atomic_writer,
    checksum,
    checksum_stream,
    describe_os_error,
    fsync_dir,
    private_user_dir,
    split_checksum,
    write_error,
)
from lightning_grid.contract import ENV_EXPERIMENT
from lightning_grid.errors import (
    CorruptCheckpointError,
    StoreError,
    StoreUnreachableError,
    StoreUnwritableError,
)

__all__ = ["CheckpointStore", "CommitRecord", "PREEMPTED_MARKER", "COMPLETED_MARKER", "save_file"]

log = logging.getLogger(__name__)

PREEMPTED_MARKER = "PREEMPTED.json"
COMPLETED_MARKER = "COMPLETED.json"
_COMMIT_SUFFIX = ".commit.json"
_PAYLOAD_SUFFIX = ".ckpt"
#: What a payload's name may be: one plain file name in the store's folder. A commit record is data
#: read from a shared folder, so its ``name`` (``../../x``, ``/etc/x``, a NUL or newline) is never
#: trusted to stay inside it.
_SAFE_PAYLOAD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.ckpt")
#: Temp files a killed writer leaves (atomic_writer's ``.<name>.<random>.tmp``).
_SAFE_TEMP = re.compile(r"\.ckpt-[A-Za-z0-9._-]*\.tmp")
# -- folder checkpoints (sharded strategies, see lightning_grid.resumable.sharded) -----------------
#: A folder checkpoint: one folder directly in the store's folder, written by every rank.
_SAFE_FOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.dcp")
#: A file inside it (DCP writes ``.metadata`` and ``__<rank>_<n>.distcp``, Lightning ``meta.pt``).
_SAFE_MEMBER = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]*")


def safe_folder_name(name: str) -> bool:
    """Whether ``name`` can only mean a folder checkpoint directly in the store's folder."""
    return bool(_SAFE_FOLDER.fullmatch(name)) and ".." not in name


def safe_member_name(name: str) -> bool:
    """Whether ``name`` can only mean a file directly inside a folder checkpoint."""
    return bool(_SAFE_MEMBER.fullmatch(name)) and name not in (".", "..") and ".." not in name


# -- end folder checkpoints ----------------------------------------------------------------------


def safe_payload_name(name: str) -> bool:
    """Whether ``name`` can only mean a checkpoint file directly in the store's folder."""
    return bool(_SAFE_PAYLOAD.fullmatch(name)) and ".." not in name


@dataclass(frozen=True)
class CommitRecord:
    """What makes a payload count. Small, written last."""

    name: str
    step: int
    #: ``"<algorithm>:<hex>"`` of the payload (``_io.checksum``'s form); a record written before
    #: the twelfth session carries ``"sha256": "<hex>"``, read as ``"sha256:<hex>"``.
    checksum: str
    size: int
    time: float
    reason: str = "periodic"
    meta: dict[str, Any] = field(default_factory=dict)
    #: A folder checkpoint's files (name → {"checksum", "size"}); empty for a single-file checkpoint,
    #: whose ``checksum``/``size`` are the payload's. For a folder they are the manifest's and the total.
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def is_folder(self) -> bool:
        return bool(self.files)

    def to_json(self) -> bytes:
        raw = asdict(self)
        if not self.files:
            del raw["files"]  # a single-file record reads as it always did
        return json.dumps(raw, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> CommitRecord:
        """Raises ValueError for a record that is not one (also: a name that would leave the folder)."""
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        name = raw["name"]
        files = _folder_files(raw.get("files"))
        if files:
            if not isinstance(name, str) or not safe_folder_name(name):
                raise ValueError(f"its name {name!r} is not a checkpoint folder in this folder")
        elif not isinstance(name, str) or not safe_payload_name(name):
            raise ValueError(f"its name {name!r} is not a checkpoint file in this folder")
        return cls(
            name=name,
            step=int(raw["step"]),
            checksum=_checksum_of(raw),
            size=int(raw["size"]),
            time=float(raw["time"]),
            reason=str(raw.get("reason", "periodic")),
            meta=dict(raw.get("meta", {})),
            files=files,
        )


def _folder_files(raw: Any) -> dict[str, dict[str, Any]]:
    """A record's ``files`` (absent: a single-file checkpoint); ValueError for a malformed list."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError("its files are not an object")
    files: dict[str, dict[str, Any]] = {}
    for member, info in raw.items():
        if not isinstance(member, str) or not safe_member_name(member):
            raise ValueError(f"its file {member!r} is not a file inside the checkpoint folder")
        if not isinstance(info, dict):
            raise ValueError(f"its entry for {member!r} is not an object")
        files[member] = {
            "checksum": _checksum_of(info),
            "size": int(info["size"]),
            **{k: v for k, v in info.items() if k not in ("checksum", "sha256", "size")},
        }
    return files


def _checksum_of(raw: dict[str, Any]) -> str:
    """A record's (or a folder file's) checksum, ``"<algorithm>:<hex>"``; ValueError when it has
    none, or names an algorithm this version does not know."""
    if "checksum" in raw:
        value = str(raw["checksum"])
        split_checksum(value)
        return value
    if "sha256" in raw:
        return f"sha256:{str(raw['sha256'])}"  # written before the twelfth session
    raise ValueError("it has no checksum")


def folder_manifest_checksum(files: dict[str, dict[str, Any]], algorithm: str | None = None) -> str:
    """The checksum a folder checkpoint's record carries: of its sorted file list, each file's
    digest and size. The digests go in without their algorithm's name, so a record written
    before the twelfth session (sha256 throughout) still verifies."""
    canonical = json.dumps(
        {
            name: [split_checksum(info["checksum"])[1], int(info["size"])]
            for name, info in sorted(files.items())
        },
        sort_keys=True,
    )
    return checksum(canonical.encode(), algorithm)


class _OutOfTime(Exception):
    """A copy that would end after its deadline: abandoned, never committed."""


@contextlib.contextmanager
def _zip_crc32(enabled: bool) -> Iterator[None]:
    """torch.save with or without the zip CRC-32 of each record (torch >= 2.5 can skip it).

    Only for the fallback that lets ``torch.save`` write everything: the setting is process-wide,
    so it is switched off only while the training thread waits for the write (a preemption) and
    nobody else saves with torch; the checksum in the commit record guards the payload, and
    ``torch.load`` does not check the CRC."""
    config: Any = None
    if not enabled:
        with contextlib.suppress(ImportError):
            from torch.utils.serialization import config
    if config is None or not hasattr(config.save, "compute_crc32"):
        yield
        return
    previous = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = previous


class CheckpointStore:
    """A folder of committed checkpoints at an fsspec URL (local path, ``s3://``, ``gs://``, ``memory://``)."""

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        retries: int = 4,
        backoff_s: float = 0.5,
        spool_dir: str | None = None,
    ) -> None:
        self.url = url
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except (ValueError, ImportError) as exc:
            raise StoreError(f"cannot use checkpoint location {url!r}: {exc}") from exc
        self.root = self.root.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.retries = retries
        self.backoff_s = backoff_s
        self._spool_dir = spool_dir

    # -- paths ----------------------------------------------------------------------------------------
    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def location(self, name: str) -> str:
        """A user-facing location of ``name`` (URL for remote stores)."""
        if self.is_local:
            return self._path(name)
        return self.fs.unstrip_protocol(self._path(name))

    # -- start-up check ------------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Fail before training wastes time when nothing could ever be saved here."""
        probe = self._path(f".write-probe-{os.getpid()}-{time.time_ns()}")
        try:
            if self.is_local:  # object stores have no folders to make (and makedirs would create a bucket)
                self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"ok")
            if self.fs.cat_file(probe) != b"ok":
                raise OSError("read back different bytes")
            self.fs.rm_file(probe)
        except Exception as exc:  # any backend error means: unusable
            why = describe_os_error(exc) if isinstance(exc, OSError) and exc.errno else str(exc)
            raise StoreUnwritableError(f"checkpoint location {self.url!r} is not writable: {why}") from exc

    # -- writing -----------------------------------------------------------------------------------
    def save(
        self,
        checkpoint: Any,
        step: int,
        reason: str = "periodic",
        meta: dict[str, Any] | None = None,
        before_commit: Callable[[], None] | None = None,
    ) -> CommitRecord:
        """Serialise ``checkpoint`` once, make it durable, then commit it.

        ``before_commit`` runs after the bytes are durable and before the record is written: the
        callback uses it to make the logs it promises to keep in step with the checkpoint durable too.
        """
        name = f"ckpt-{step:010d}-{time.time_ns() // 1_000_000}{_PAYLOAD_SUFFIX}"
        started = time.monotonic()
        upload_s = 0.0
        if self.is_local:
            digest, size = _serialise(
                checkpoint,
                self._path(name),
                f"saving the step {step} checkpoint to",
                crc32=reason != "preempted",
                direct=not self._synced_by_launcher(),
            )
        else:
            digest, size, upload_s = self._save_remote(checkpoint, name, step, reason)
        if before_commit is not None:
            before_commit()
        # How long this save took is what a launcher weighs against the next notice's window.
        timings = {"write_s": round(time.monotonic() - started - upload_s, 4), "upload_s": round(upload_s, 4)}
        record = CommitRecord(name, step, digest, size, time.time(), reason, {**(meta or {}), **timings})
        self._write_small(name + _COMMIT_SUFFIX, record.to_json())
        return record

    def _synced_by_launcher(self) -> bool:
        """Whether this local store is inside the execution directory of a launched run, which the
        launcher copies to its artifact store right after the exit: those bytes are best left in
        the page cache, where the copy reads them (on a cloud disk, reading 1 GB back costs what
        writing it did). The launcher's own checkpoint location is in the artifact store, which
        nothing reads back; only a script that names a folder of its own lands here."""
        if not os.environ.get(ENV_EXPERIMENT):
            return False
        try:
            workdir = os.path.realpath(os.getcwd())
            return os.path.commonpath([os.path.realpath(self.root), workdir]) == workdir
        except (OSError, ValueError):
            return False

    # -- folder checkpoints (sharded strategies, see lightning_grid.resumable.sharded) -------------
    def folder_path(self, name: str) -> str:
        """Where the ranks write the files of folder checkpoint ``name`` (a local store's path)."""
        if not safe_folder_name(name):
            raise StoreError(f"{name!r} is not a checkpoint folder name")
        return self._path(name)

    def commit_folder(
        self,
        name: str,
        step: int,
        files: dict[str, dict[str, Any]],
        reason: str = "periodic",
        meta: dict[str, Any] | None = None,
    ) -> CommitRecord:
        """Commit folder checkpoint ``name``, whose ``files`` every rank has already made durable.

        The record lists every file with its checksum and size; it is written last, so a folder
        without one (a rank killed mid-write) is never trusted, as an uncommitted file is not."""
        if not files:
            raise StoreError(f"checkpoint folder {name!r} has no files to commit")
        files = _folder_files(files)  # checked, and in the form a record carries
        if self.is_local:
            fsync_dir(self._path(name))
            fsync_dir(self.root)
        total = sum(int(info["size"]) for info in files.values())
        record = CommitRecord(
            name,
            step,
            folder_manifest_checksum(files),
            total,
            time.time(),
            reason,
            dict(meta or {}),
            dict(files),
        )
        CommitRecord.from_json(record.to_json())  # what discovery will accept, or an error now
        self._write_small(name + _COMMIT_SUFFIX, record.to_json())
        return record

    def _verify_folder(self, record: CommitRecord) -> None:
        """Every file of a folder checkpoint is there with the size and checksum its record lists."""
        if not safe_folder_name(record.name):
            raise CorruptCheckpointError(
                f"refusing to read {record.name!r}: not a checkpoint folder in {self.url}"
            )
        algorithm = split_checksum(record.checksum)[0]
        if folder_manifest_checksum(record.files, algorithm) != record.checksum:
            raise CorruptCheckpointError(
                f"checkpoint {self.location(record.name)}: its commit record's file list does not match its checksum"
            )
        for member, info in sorted(record.files.items()):
            if not safe_member_name(member):
                raise CorruptCheckpointError(f"refusing to read {member!r} in {self.location(record.name)}")
            path = f"{self._path(record.name)}/{member}"
            algorithm, expected = split_checksum(info["checksum"])
            try:
                with self.fs.open(path, "rb") as handle:
                    found, size = checksum_stream(handle, algorithm)
            except FileNotFoundError as exc:
                raise CorruptCheckpointError(
                    f"checkpoint {self.location(record.name)} is committed but its file {member} is missing"
                ) from exc
            if size != int(info["size"]):
                raise CorruptCheckpointError(
                    f"checkpoint {self.location(record.name)}: {member} has {size} bytes, its commit record says"
                    f" {info['size']}"
                )
            if split_checksum(found)[1] != expected:
                raise CorruptCheckpointError(
                    f"checkpoint {self.location(record.name)}: {member} has {algorithm} {split_checksum(found)[1][:12]}…,"
                    f" its commit record says {expected[:12]}…"
                )

    def _remove(self, name: str) -> None:
        """A payload file, or a whole checkpoint folder."""
        path = self._path(name)
        if safe_folder_name(name):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(path, recursive=True)
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)

    # -- end folder checkpoints --------------------------------------------------------------------
    def _spool(self) -> str:
        """Where saves for this remote store are serialised first: private to this user, one folder
        per store URL (so that what it holds can only ever be uploaded where it belongs)."""
        base = self._spool_dir or private_user_dir("lightning_grid-spool")
        return os.path.join(base, hashlib.sha256(self.url.encode()).hexdigest()[:16])

    def _save_remote(self, checkpoint: Any, name: str, step: int, reason: str) -> tuple[str, int, float]:
        # Serialise to a local spool file first, so that a failed upload can be retried without
        # touching the (still changing) training state, and the bytes survive if the store does not come back.
        spool = self._spool()
        os.makedirs(spool, mode=0o700, exist_ok=True)
        local = os.path.join(spool, name)
        digest, size = _serialise(
            checkpoint,
            local,
            f"spooling the step {step} checkpoint (for {self.url}) to",
            crc32=reason != "preempted",
            direct=False,  # the upload reads it back at once: from the page cache, not the disk
        )
        started = time.monotonic()
        try:
            self._with_retries(
                lambda: self.fs.put_file(local, self._path(name)), f"upload {name}", keep=local
            )
        except StoreError as exc:
            # The store is unreachable: the bytes stay, committed in the spool, and the next run on
            # this machine uploads them (recover_spooled) once the store answers again.
            record = CommitRecord(name, step, digest, size, time.time(), reason, {"spooled_for": self.url})
            CheckpointStore(spool)._write_small(name + _COMMIT_SUFFIX, record.to_json())
            raise StoreUnreachableError(str(exc), spooled=local) from exc
        os.unlink(local)
        return digest, size, time.monotonic() - started

    def recover_spooled(self) -> list[CommitRecord]:
        """Upload and commit what an earlier run on this machine saved for this store but could not
        upload (the store was down at a preemption), if it is newer than what the store has. Raises
        StoreError if the store still does not answer (the spool is then left as it is)."""
        if self.is_local:
            return []
        folder = self._spool()
        if not os.path.isdir(folder):
            return []
        spool = CheckpointStore(folder)
        waiting = spool.committed()
        if not waiting:
            return []
        newest = next(iter(self.committed()), None)
        recovered: list[CommitRecord] = []
        for record in waiting:  # newest first
            if (newest is None or record.time > newest.time) and not recovered:
                spool.read_verified(record)  # a damaged spool file is never published
                if self.publish(spool, record):
                    recovered.append(record)
                    log.info(
                        "lightning_grid: uploaded the step %d checkpoint saved while %s was unreachable",
                        record.step,
                        self.url,
                    )
            for leftover in (record.name + _COMMIT_SUFFIX, record.name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, leftover))
        return recovered

    def publish(self, source: CheckpointStore, record: CommitRecord, deadline: float | None = None) -> bool:
        """Copy a checkpoint committed in ``source`` (a local spool) here, and commit it here.

        The commit record goes last and only if the payload arrived whole before ``deadline``
        (monotonic): a copy cut short is never a resume point. Returns whether it was committed."""
        src = source.location(record.name)  # a local spool: a path
        if os.path.getsize(src) != record.size:
            raise CorruptCheckpointError(f"spooled checkpoint {src} does not match its commit record")

        def in_time() -> bool:
            return deadline is None or time.monotonic() < deadline

        started = time.monotonic()
        if not in_time():
            return False
        if not safe_payload_name(record.name):
            raise CorruptCheckpointError(f"refusing to publish {record.name!r}: not a checkpoint file name")
        if self.is_local:
            try:
                with open(src, "rb") as handle, atomic_writer(self._path(record.name)) as out:
                    while chunk := handle.read(8 << 20):
                        if not in_time():
                            raise _OutOfTime
                        out.write(chunk)
            except _OutOfTime:
                return False
            except OSError as exc:
                raise write_error(exc, self._path(record.name), "publishing the checkpoint to") from exc
        else:
            # An object store upload cannot be cut short cleanly: it runs aside, and is simply not
            # committed when it ends after the deadline.
            failed: list[BaseException] = []

            def send() -> None:
                try:
                    self._with_retries(
                        lambda: self.fs.put_file(src, self._path(record.name)), f"upload {record.name}"
                    )
                except BaseException as exc:  # reported on the caller's thread
                    failed.append(exc)

            upload = threading.Thread(target=send, name="lightning_grid-publish", daemon=True)
            upload.start()
            upload.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if upload.is_alive():
                return False
            if failed:
                raise failed[0]
        if not in_time():
            return False
        meta = {**record.meta, "upload_s": round(time.monotonic() - started, 4)}
        committed = CommitRecord(
            record.name, record.step, record.checksum, record.size, time.time(), record.reason, meta
        )
        self._write_small(record.name + _COMMIT_SUFFIX, committed.to_json())
        return True

    def _write_small(self, name: str, data: bytes) -> None:
        if self.is_local:
            try:
                atomic_write_bytes(self._path(name), data)
            except OSError as exc:
                raise write_error(exc, self._path(name), "writing") from exc
        else:
            self._with_retries(lambda: self.fs.pipe_file(self._path(name), data), f"write {name}")

    def _with_retries(self, action: Callable[[], Any], what: str, keep: str | None = None) -> None:
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                action()
                return
            except Exception as exc:  # network and backend errors all look different
                if attempt == self.retries:
                    where = f"; the checkpoint is kept at {keep}" if keep else ""
                    raise StoreError(
                        f"could not {what} to {self.url!r} after {attempt + 1} tries: {exc}{where}"
                    ) from exc
                log.warning(
                    "lightning_grid: %s to %s failed (%s); retrying in %.1fs", what, self.url, exc, delay
                )
                time.sleep(delay)
                delay *= 2

    # -- discovery and reading ---------------------------------------------------------------------
    def committed(self) -> list[CommitRecord]:
        """Committed checkpoints, most recently written first.

        By write time rather than step: a run restarted from scratch in the same folder writes lower
        steps than an older run did, and its checkpoints are the ones to continue from."""
        try:
            names = self._names()
        except FileNotFoundError:
            return []
        records = []
        for name in names:
            if not name.endswith(_COMMIT_SUFFIX):
                continue
            try:
                record = CommitRecord.from_json(self._read_small(name))
                if record.name + _COMMIT_SUFFIX != name:
                    raise ValueError(f"it names {record.name!r}, not the payload beside it")
            except (ValueError, KeyError, TypeError, OSError) as exc:
                log.warning(
                    "lightning_grid: ignoring unreadable commit record %s: %s", self.location(name), exc
                )
                continue
            records.append(record)
        records.sort(key=lambda r: (r.time, r.step), reverse=True)
        return records

    def _names(self) -> list[str]:
        """The file names in the store's folder. A local folder is listed directly: after every
        periodic save, in the background thread, while the training thread wants the GIL."""
        if self.is_local:
            return os.listdir(self.root)
        return [p.rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]

    def _read_small(self, name: str) -> bytes:
        if self.is_local:
            with open(self._path(name), "rb") as handle:
                return handle.read()
        return bytes(self.fs.cat_file(self._path(name)))

    def read_verified(self, record: CommitRecord) -> bytes:
        if record.is_folder:  # every file verified; the ranks read them through their strategy
            self._verify_folder(record)
            return b""
        if not safe_payload_name(record.name):
            raise CorruptCheckpointError(
                f"refusing to read {record.name!r}: not a checkpoint file in {self.url}"
            )
        try:
            data = self.fs.cat_file(self._path(record.name))
        except FileNotFoundError as exc:
            raise CorruptCheckpointError(
                f"checkpoint {self.location(record.name)} is committed but missing"
            ) from exc
        if len(data) != record.size:
            raise CorruptCheckpointError(
                f"checkpoint {self.location(record.name)} has {len(data)} bytes, its commit record says {record.size}"
            )
        algorithm, expected = split_checksum(record.checksum)
        digest = checksum(data, algorithm)
        if digest != record.checksum:
            raise CorruptCheckpointError(
                f"checkpoint {self.location(record.name)} has {algorithm} {split_checksum(digest)[1][:12]}…, its"
                f" commit record says {expected[:12]}…"
            )
        return data

    def latest_valid(self) -> tuple[CommitRecord, bytes] | None:
        """The newest committed checkpoint whose bytes verify; corrupt ones are skipped with a warning."""
        skipped: list[tuple[CommitRecord, str]] = []
        for record in self.committed():
            try:
                data = self.read_verified(record)
            except CorruptCheckpointError as exc:
                skipped.append((record, str(exc)))
                continue
            for bad, why in skipped:
                log.warning(
                    "lightning_grid: newest checkpoint %s (step %d) is not usable (%s); resuming from %s (step %d)"
                    " instead",
                    self.location(bad.name),
                    bad.step,
                    why,
                    self.location(record.name),
                    record.step,
                )
            return record, data
        for bad, why in skipped:
            log.warning("lightning_grid: checkpoint %s is not usable: %s", self.location(bad.name), why)
        return None

    @staticmethod
    def load_bytes(data: bytes) -> Any:
        import torch

        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)

    # -- pruning -----------------------------------------------------------------------------------
    def prune(self, keep: int) -> None:
        """Keep the newest ``keep`` committed checkpoints; the record goes first so a crash never leaves a
        committed record without its payload."""
        for record in self.committed()[max(1, keep) :]:
            if record.is_folder:  # the record first, then the folder (see sharded.py)
                if safe_folder_name(record.name):
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm_file(self._path(record.name + _COMMIT_SUFFIX))
                    self._remove(record.name)
                continue
            if not safe_payload_name(record.name):  # committed() never returns one; a caller's list might
                continue
            for name in (record.name + _COMMIT_SUFFIX, record.name):
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(self._path(name))

    def remove_uncommitted(self, older_than_s: float = 3600.0) -> None:
        """Payloads and temp files a killed writer left behind (never a committed one).

        Only old ones: another run sharing the folder may be writing one right now."""
        try:
            names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return
        committed = {n[: -len(_COMMIT_SUFFIX)] for n in names if n.endswith(_COMMIT_SUFFIX)}
        for name in names:
            orphan = (safe_payload_name(name) or safe_folder_name(name)) and name not in committed
            if not (orphan or _SAFE_TEMP.fullmatch(name)):
                continue
            try:
                age = time.time() - self.fs.modified(self._path(name)).timestamp()
            except (NotImplementedError, OSError, AttributeError):
                continue  # no reliable age: leave it (it is never trusted anyway)
            if age >= older_than_s:
                self._remove(name)  # a folder checkpoint no rank finished is removed whole

    # -- markers: "preempted and checkpointed at step N", "training completed" -------------------
    def write_marker(self, info: dict[str, Any], name: str = PREEMPTED_MARKER) -> None:
        self._write_small(name, json.dumps(info, sort_keys=True).encode())

    def read_marker(self, name: str = PREEMPTED_MARKER) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self.fs.cat_file(self._path(name))))
        except (FileNotFoundError, ValueError):
            return None

    def clear_marker(self, name: str = PREEMPTED_MARKER) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(name))
        if self.is_local:
            fsync_dir(self.root)


def _serialise(
    checkpoint: Any, path: str, what: str, crc32: bool = True, direct: bool = True
) -> tuple[str, int]:
    """``torch.save`` of ``checkpoint`` to ``path`` atomically, hashing on the way; (checksum, size).

    The bytes are what ``torch.save`` writes, but the tensor data does not pass through it: torch
    lays the archive out (pickle, zip headers) with each storage's place left open, and the
    storages then go straight from tensor memory to the file in large writes, hashed on the way,
    with the disk already writing while later bytes are copied in (see ``StreamWriter``). A GPU
    storage is copied to the host a chunk at a time, each copy overlapped with the write of the
    chunk before it. Only a torch without ``skip_data`` (< 2.6), or a checkpoint whose layout
    this does not recognise, goes through ``torch.save`` itself (``crc32``: whether it computes
    zip's CRC-32 there; the streamed archive never has them: the commit record's checksum guards
    the payload, and ``torch.load`` does not check them). ``direct``: past the page cache where
    the file system allows it (``StreamWriter``); False for bytes that are read back at once.

    A failed write leaves no temp file and raises ``StoreFullError``/``StoreWriteError`` naming
    the path and the OS's reason."""
    layout = _layout(checkpoint)
    if layout is None:
        with _zip_crc32(enabled=crc32):
            return _serialise_with_torch(checkpoint, path, what)
    try:
        with atomic_file(path) as fd:
            return _write_pieces(fd, layout, direct)
    except OSError as exc:
        raise write_error(exc, path, what) from exc


def save_file(obj: Any, path: str, what: str) -> tuple[str, int]:
    """``torch.save`` of ``obj`` to a local ``path``, atomically; (checksum, size). A full disk is
    reported as ``StoreFullError`` naming the path, where ``torch.save`` itself says only
    "unexpected pos …". Buffered: its callers hash the file again right after."""
    return _serialise(obj, path, what, direct=False)


def _serialise_with_torch(checkpoint: Any, path: str, what: str) -> tuple[str, int]:
    """``torch.save`` through a hashing file object: torch reports a full disk as "unexpected pos …",
    which says nothing to a user, so the OSError underneath is what is reported."""
    import torch

    writer: HashingWriter | None = None
    try:
        with atomic_writer(path) as handle, HashingWriter(handle) as writer:
            torch.save(checkpoint, writer)  # type: ignore[arg-type]
    except OSError as exc:
        raise write_error(exc, path, what) from exc
    except RuntimeError:
        if writer is not None and writer.error is not None:
            # From the OSError: torch's "unexpected pos" says nothing a user can act on.
            raise write_error(writer.error, path, what) from writer.error
        raise
    return writer.checksum, writer.size


class _Recorder:
    """A write-only, seekable-forward file object that keeps what ``torch.save`` writes under
    ``skip_data``: the archive's bytes, and a hole (its size) where each storage's bytes go."""

    def __init__(self) -> None:
        self.pieces: list[bytes | int] = []  # bytes to write, or the size of a storage's hole
        self._pending = bytearray()
        self.position = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._pending += view
        self.position += view.nbytes
        return view.nbytes

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        target = offset if whence == os.SEEK_SET else self.position + offset
        if whence not in (os.SEEK_SET, os.SEEK_CUR) or target < self.position:
            raise OSError("the checkpoint layout is written front to back")
        self.pieces += [bytes(self._pending), target - self.position]
        self._pending = bytearray()
        self.position = target
        return target

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass

    def close(self) -> list[bytes | int]:
        if self._pending:
            self.pieces.append(bytes(self._pending))
            self._pending = bytearray()
        return self.pieces


#: Types ``persistent_id`` never numbers (torch's returns None for them).
_PLAIN = frozenset({int, float, bool, str, bytes, complex, type(None), tuple, list, dict})


def _capturing_pickle(found: dict[str, Any]) -> types.ModuleType:
    """A ``pickle`` module for ``torch.save`` that also reports which storage each key names.

    torch subclasses ``pickle_module.Pickler`` and numbers each storage in ``persistent_id``; the
    subclass hook wraps that method, so the key → storage map comes from torch's own numbering."""

    class Pickler(pickle.Pickler):
        def __init_subclass__(cls, **kwargs: Any) -> None:
            super().__init_subclass__(**kwargs)
            numbered = cls.persistent_id

            def persistent_id(self: Any, obj: Any) -> Any:
                # Called for every object pickled, each int of an RNG state included: plain
                # values (never a storage) skip torch's checks.
                if type(obj) in _PLAIN:
                    return None
                pid = numbered(self, obj)
                if pid is not None and pid[0] == "storage":
                    found[str(pid[2])] = getattr(obj, "_untyped_storage", obj)
                return pid

            cls.persistent_id = persistent_id  # type: ignore[method-assign]

    module = types.ModuleType("pickle")  # torch asks for its __name__ (dill needs care, pickle none)
    module.__dict__.update({k: getattr(pickle, k) for k in ("Unpickler", "load", "loads", "dump", "dumps")})
    module.Pickler = Pickler  # type: ignore[attr-defined]
    return module


_LOCAL_HEADER = b"PK\x03\x04"


def _layout(checkpoint: Any) -> list[Any] | None:
    """What ``torch.save(checkpoint)`` writes, as archive bytes and storages, in file order; None
    when torch cannot lay it out without the data (< 2.6) or the layout is not the expected one
    (then the caller lets ``torch.save`` write everything: slower, never wrong)."""
    import torch

    skip_data = getattr(torch.serialization, "skip_data", None)
    if skip_data is None:
        return None
    found: dict[str, Any] = {}
    recorder = _Recorder()
    try:
        with skip_data():
            torch.save(checkpoint, recorder, pickle_module=_capturing_pickle(found))  # type: ignore[arg-type]
    except Exception as exc:  # torch.save itself then says what is wrong, if anything is
        log.debug("lightning_grid: no streamed layout for this checkpoint (%s); torch.save writes it", exc)
        return None
    layout: list[Any] = []
    for piece in recorder.close():
        if isinstance(piece, bytes):
            layout.append(piece)
            continue
        # A hole: the local header just before it names the record ("<archive>/data/<key>").
        previous = layout[-1] if layout and isinstance(layout[-1], bytes) else b""
        header = previous.rfind(_LOCAL_HEADER)
        if header < 0 or header + 30 > len(previous):
            return None
        name_length = int.from_bytes(previous[header + 26 : header + 28], "little")
        name = previous[header + 30 : header + 30 + name_length].decode("utf-8", "replace")
        storage = found.get(name.rpartition("/data/")[2]) if "/data/" in name else None
        if storage is None or storage.nbytes() != piece or storage.device.type == "meta":
            return None
        if piece:
            layout.append(storage)
    return layout


def _write_pieces(fd: int, layout: list[Any], direct: bool = True) -> tuple[str, int]:
    """Archive bytes and storages to ``fd`` in order, hashed in one pass; (checksum, size)."""
    stream = StreamWriter(fd, direct=None if direct else False)
    staging: _Staging | None = None
    try:
        for piece in layout:
            if isinstance(piece, bytes):
                stream.write(piece)
            elif piece.device.type == "cpu":
                stream.write(_host_view(piece.data_ptr(), piece.nbytes()))  # the tensor's memory: no copy
            else:
                staging = staging or _Staging(max(p.nbytes() for p in layout if not isinstance(p, bytes)))
                staging.write(piece, stream)
        digest = stream.close()
    except BaseException:
        stream.abort()  # the hash thread may still be reading a buffer: it stops first
        raise
    return digest, stream.size


def _host_view(address: int, size: int) -> memoryview:
    """``size`` bytes of host memory at ``address`` as a buffer, without copying them: valid only
    while their owner (a storage) lives and is not written to."""
    return memoryview((ctypes.c_char * size).from_address(address)).cast("B")


class _Staging:
    """Device → host copies of storages, a chunk at a time, each overlapped with the write of the
    chunk before it: two (pinned) host buffers take turns, so the write of a storage starts after
    the copy of its first chunk rather than of all of it.

    A buffer is refilled only once the write *and* the hash of its previous chunk are done. Works
    for any device torch can copy from; only CUDA copies run asynchronously (on a side stream),
    elsewhere each chunk is copied in turn (correct, not overlapped)."""

    #: Bytes per device → host copy: a fraction of a second of writing, a few ms of copying.
    CHUNK_BYTES = 64 << 20

    def __init__(self, largest: int, chunk_bytes: int | None = None) -> None:
        self._chunk = max(1, min(chunk_bytes or self.CHUNK_BYTES, largest))
        self._buffers: list[Any] = []
        self._streams: dict[Any, Any] = {}  # device → the side stream its copies run on

    def _side_stream(self, device: Any) -> Any:
        import torch

        if device.type != "cuda":
            return None
        if device not in self._streams:
            # Whatever the training step queued, on any stream, has written these tensors first.
            torch.cuda.synchronize(device)
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def write(self, storage: Any, stream: StreamWriter) -> None:
        import torch

        size = storage.nbytes()
        source = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
        copier = self._side_stream(storage.device)
        if not self._buffers:
            pin = copier is not None
            self._buffers = [torch.empty(self._chunk, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        starts = list(range(0, size, self._chunk))
        hashed: list[threading.Event | None] = [None, None]
        copied: list[Any] = [None, None]

        def fill(index: int) -> None:
            slot = index % 2
            previous = hashed[slot]
            if previous is not None:
                previous.wait()  # the chunk this buffer held is written and hashed
            begin = starts[index]
            target = self._buffers[slot][: min(self._chunk, size - begin)]
            if copier is None:
                target.copy_(source[begin : begin + target.numel()])
                return
            with torch.cuda.stream(copier):
                target.copy_(source[begin : begin + target.numel()], non_blocking=True)
                copied[slot] = torch.cuda.Event()
                copied[slot].record(copier)

        fill(0)
        for index, begin in enumerate(starts):
            if index + 1 < len(starts):
                fill(index + 1)  # the next chunk's copy runs while this one is written
            slot = index % 2
            if copied[slot] is not None:
                copied[slot].synchronize()
            stream.write(_host_view(self._buffers[slot].data_ptr(), min(self._chunk, size - begin)))
            hashed[slot] = stream.flush()
        for done in hashed:
            if done is not None:
                done.wait()  # the buffers are reused for the next storage
