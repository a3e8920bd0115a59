"""``atomic_writer`` / ``atomic_file``: a file is replaced whole or not at all, and no temp file stays."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lightning_grid._io import atomic_file, atomic_write_bytes, atomic_writer


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("how", ["writer", "file"])
def test_a_write_that_fails_half_way_keeps_the_old_file(tmp_path: Path, how: str) -> None:
    target = tmp_path / "state.json"
    atomic_write_bytes(str(target), b"old")
    with pytest.raises(RuntimeError, match="half way"):
        if how == "writer":
            with atomic_writer(str(target)) as handle:
                handle.write(b"new, but only ha")
                raise RuntimeError("half way")
        else:
            with atomic_file(str(target)) as fd:
                os.write(fd, b"new, but only ha")
                raise RuntimeError("half way")
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == ["state.json"]


@pytest.mark.parametrize("mode", ["wb", "w"])
def test_a_finished_write_replaces_the_file_and_creates_its_folder(tmp_path: Path, mode: str) -> None:
    target = tmp_path / "new" / "folder" / "state.txt"
    with atomic_writer(str(target), mode) as handle:
        handle.write(b"x" * 100_000 if mode == "wb" else "x" * 100_000)  # more than the buffer holds
        assert not target.exists()  # nothing visible before the rename
    assert target.read_bytes() == b"x" * 100_000
    assert _names(target.parent) == ["state.txt"]
