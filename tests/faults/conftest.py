"""Fixtures for fault tests: real, size-limited filesystems.

A full disk is only honest when the kernel says so: a tmpfs mounted with ``size=`` fails writes
with ENOSPC exactly as a full volume does (short writes, then the error), which no mock reproduces.
Mounting needs root (or CAP_SYS_ADMIN); where it is refused the tests that need it skip and say why.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def _mount(args: list[str]) -> str | None:
    """Runs ``mount ARGS``; the reason it failed, or None."""
    try:
        proc = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if proc.returncode == 0 else (proc.stderr.strip() or f"mount exited {proc.returncode}")


def _umount(path: Path) -> None:
    # Lazy: a test that failed may have left a file open there; the mount goes once it is closed.
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


MountTmpfs = Callable[..., Path]


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[MountTmpfs]:
    """A factory: ``small_tmpfs(size="4m", name="disk", inodes=None)`` mounts a fresh tmpfs of that size
    and returns its folder; every mount is removed at teardown. Skips (with the reason) where
    mounting is not permitted (not root, a container without CAP_SYS_ADMIN)."""
    mounted: list[Path] = []

    def make(size: str = "4m", name: str = "disk", inodes: int | None = None) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        options = f"size={size},mode=0755" + (f",nr_inodes={inodes}" if inodes else "")
        why = _mount(["-t", "tmpfs", "-o", options, "tmpfs", str(folder)])
        if why is not None:
            pytest.skip(f"cannot mount a size-limited tmpfs here (needs root/CAP_SYS_ADMIN): {why}")
        mounted.append(folder)
        return folder

    yield make
    for folder in reversed(mounted):
        _umount(folder)


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """An existing, empty folder mounted read-only (a bind mount: as root, chmod would not stop
    writes). Skips with the reason where bind mounts are not permitted."""
    source = tmp_path / "ro-source"
    target = tmp_path / "ro"
    source.mkdir()
    target.mkdir()
    why = _mount(["--bind", str(source), str(target)])
    if why is not None:
        pytest.skip(f"cannot bind-mount here (needs root/CAP_SYS_ADMIN): {why}")
    why = _mount(["-o", "remount,bind,ro", str(target)])
    if why is not None:
        _umount(target)
        pytest.skip(f"cannot remount a bind mount read-only here: {why}")
    try:
        yield target
    finally:
        _umount(target)


def fill(folder: Path, leave: int) -> None:
    """Fills ``folder``'s filesystem until only about ``leave`` bytes are free (a ballast file)."""
    st = os.statvfs(folder)
    remaining = max(0, st.f_bavail * st.f_frsize - leave)
    fd = os.open(folder / "ballast", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        chunk = b"\0" * (1 << 16)
        with contextlib.suppress(OSError):  # full already: that is the point
            while remaining > 0:
                remaining -= os.write(fd, chunk[: min(len(chunk), remaining)])
    finally:
        os.close(fd)
