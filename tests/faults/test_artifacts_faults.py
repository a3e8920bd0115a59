"""The execution directory sync under hostile or awkward input: links in the store, modes and links
in the directory, malformed manifests, a store placed inside the folder it saves. Real files, real
links, a real script run from the restored folder."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from lightning_grid.checkpoints import CheckpointStore
from lightning_grid.errors import ManifestError, StoreError, UsageError
from lightning_grid.launcher import artifacts


def _tree(folder: Path) -> list[str]:
    """Every path under ``folder`` (links not followed), for "nothing else was written" checks."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# -- 1. a symbolic link inside a local store is never followed on restore -----------------------------
def test_restore_never_follows_a_link_inside_a_local_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "b.txt").write_text("beta")
    (src / "c.txt").write_text("gamma")
    store = tmp_path / "store"
    artifacts.upload(str(src), str(store))
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    (secret_dir / "b.txt").write_text("SECRET")
    (secret_dir / "key").write_text("SECRET")
    # Someone with write access to the store swaps stored files for links to what they want copied out.
    (store / "files" / "a.txt").unlink()
    (store / "files" / "a.txt").symlink_to(secret_dir / "key")
    os.rename(store / "files" / "sub", tmp_path / "old-sub")
    (store / "files" / "sub").symlink_to(secret_dir)

    dest = tmp_path / "exec"
    with caplog.at_level(logging.WARNING, logger="lightning_grid"):
        stats = artifacts.restore(str(store), str(dest))
    assert stats.refused == ["a.txt", "sub/b.txt"]
    assert "SECRET" not in "".join(p.read_text() for p in dest.rglob("*") if p.is_file())
    assert (dest / "c.txt").read_text() == "gamma"
    assert "a.txt" in caplog.text and "symbolic link" in caplog.text


# -- 3. modes and links survive a round trip; old manifests still restore ----------------------------
def test_executable_bit_survives_and_the_script_can_run_it(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    script = src / "run.sh"
    script.write_text("#!/bin/sh\necho ran\n")
    script.chmod(0o755)
    (src / "private.txt").write_text("x")
    (src / "private.txt").chmod(0o600)
    store = str(tmp_path / "store")
    artifacts.upload(str(src), store)
    dest = tmp_path / "exec"
    artifacts.restore(store, str(dest))
    assert (dest / "run.sh").stat().st_mode & 0o777 == 0o755
    assert (dest / "private.txt").stat().st_mode & 0o777 == 0o600
    proc = subprocess.run(["./run.sh"], cwd=dest, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout == "ran\n"
    # A change of mode alone: recorded without sending the bytes again.
    (dest / "run.sh").chmod(0o700)
    stats = artifacts.upload(str(dest), store)
    assert stats.transferred == 0
    again = tmp_path / "again"
    artifacts.restore(store, str(again))
    assert (again / "run.sh").stat().st_mode & 0o777 == 0o700


def test_links_are_kept_as_links_and_never_followed_on_upload(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big.bin").write_bytes(b"OUTSIDE-BYTES" * 100)
    src = tmp_path / "src"
    (src / "data").mkdir(parents=True)
    (src / "data" / "real.txt").write_text("real")
    (src / "latest.txt").symlink_to("data/real.txt")  # a file link inside
    (src / "current").symlink_to("data")  # a folder link inside: not entered
    (src / "dataset").symlink_to(outside)  # a folder outside: kept as a link, never read
    (src / "dangling").symlink_to("nowhere")
    store = tmp_path / "store"
    stats = artifacts.upload(str(src), str(store))
    stored = b"".join(p.read_bytes() for p in (store / "files").rglob("*") if p.is_file())
    assert b"OUTSIDE-BYTES" not in stored
    entries = artifacts.manifest(str(store))
    assert {rel: e.get("link") for rel, e in entries.items()} == {
        "data/real.txt": None,
        "latest.txt": "data/real.txt",
        "current": "data",
        "dataset": str(outside),
        "dangling": "nowhere",
    }
    assert stats.transferred == 1

    dest = tmp_path / "exec"
    artifacts.restore(str(store), str(dest))
    for name, target in [("latest.txt", "data/real.txt"), ("current", "data"), ("dataset", str(outside))]:
        assert (dest / name).is_symlink() and os.readlink(dest / name) == target
    assert (dest / "latest.txt").read_text() == "real" and (
        dest / "current" / "real.txt"
    ).read_text() == "real"
    assert os.readlink(dest / "dangling") == "nowhere"
    # Syncing the restored folder back sends nothing: links and times were restored as they were.
    assert artifacts.upload(str(dest), str(store)).transferred == 0


def test_a_manifest_written_before_modes_and_links_still_restores(tmp_path: Path) -> None:
    store = tmp_path / "store"
    (store / "files" / "sub").mkdir(parents=True)
    (store / "files" / "sub" / "f.txt").write_text("old")
    old = {"files": {"sub/f.txt": {"size": 3, "mtime_ns": 1_600_000_000_000_000_000}}, "time": 1.0}
    (store / "manifest.json").write_text(json.dumps(old))
    dest = tmp_path / "exec"
    stats = artifacts.restore(str(store), str(dest))
    assert stats.transferred == 1 and (dest / "sub" / "f.txt").read_text() == "old"
    assert (dest / "sub" / "f.txt").stat().st_mtime_ns == 1_600_000_000_000_000_000
    umask = os.umask(0)
    os.umask(umask)
    assert (dest / "sub" / "f.txt").stat().st_mode & 0o777 == 0o666 & ~umask


# -- 4. malformed manifests: one clear error naming the manifest and the entry; nothing written -------
GOOD = {"size": 1, "mtime_ns": 0}
MALFORMED: dict[str, tuple[dict[str, Any], str]] = {
    "file-and-folder": ({"a": GOOD, "a/b": GOOD}, "a/b"),
    "link-and-folder": ({"a": {"link": "/etc", "size": 4, "mtime_ns": 0}, "a/passwd": GOOD}, "a/passwd"),
    "mtime-text": ({"f": {"size": 1, "mtime_ns": "yesterday"}}, "f"),
    "mtime-huge": ({"f": {"size": 1, "mtime_ns": 10**30}}, "f"),
    "mtime-float": ({"f": {"size": 1, "mtime_ns": 1.5}}, "f"),
    "no-size": ({"f": {"mtime_ns": 0}}, "f"),
    "size-negative": ({"f": {"size": -1, "mtime_ns": 0}}, "f"),
    "mode-text": ({"f": {"size": 1, "mtime_ns": 0, "mode": "rwx"}}, "f"),
    "nul": ({"f\x00.txt": GOOD}, "f\x00.txt"),
    "dotdot": ({"../escaped.txt": GOOD}, "../escaped.txt"),
    "dotdot-inner": ({"a/../../escaped.txt": GOOD}, "a/../../escaped.txt"),
    "absolute": ({"/tmp/escaped.txt": GOOD}, "/tmp/escaped.txt"),
    "entry-not-object": ({"f": [1, 2]}, "f"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_manifest_is_one_clear_error_and_writes_nothing(tmp_path: Path, case: str) -> None:
    files, bad = MALFORMED[case]
    store = tmp_path / "store"
    (store / "files").mkdir(parents=True)
    for rel in files:  # the stored bytes exist where they can, so only the manifest is at fault
        if "\x00" not in rel and not rel.startswith("/") and ".." not in rel and rel != "a":
            (store / "files" / rel).parent.mkdir(parents=True, exist_ok=True)
            (store / "files" / rel).write_text("x")
    (store / "manifest.json").write_text(json.dumps({"files": files, "time": 1.0}))
    before = _tree(tmp_path)
    with pytest.raises(ManifestError) as info:
        artifacts.restore(str(store), str(tmp_path / "exec"))
    message = str(info.value)
    assert str(store / "manifest.json") in message and repr(bad) in message, message
    assert info.value.entry == bad
    assert isinstance(info.value, StoreError)
    exec_dir = tmp_path / "exec"
    assert [p for p in _tree(tmp_path) if p != "exec"] == before
    assert not exec_dir.exists() or not any(exec_dir.iterdir())


@pytest.mark.parametrize("document", [b"{not json", b"[]", b'{"files": []}', b'{"time": 1}'])
def test_manifest_that_is_no_manifest_is_a_store_error(tmp_path: Path, document: bytes) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_bytes(document)
    with pytest.raises(ManifestError, match=str(store / "manifest.json")):
        artifacts.restore(str(store), str(tmp_path / "exec"))


# -- 5. a store inside the folder it saves is never captured into itself --------------------------------
def test_store_inside_the_script_folder_is_not_captured(tmp_path: Path) -> None:
    script_dir = tmp_path / "project"
    script_dir.mkdir()
    (script_dir / "train.py").write_text("print('hi')\n")
    (script_dir / ".lightning_grid").mkdir()  # our private folder: never copied
    (script_dir / ".lightning_grid" / "state").write_text("private")
    store = script_dir / "artifacts"  # `lightning-grid run --artifacts ./artifacts train.py`
    for k in range(1, 5):
        # What the launcher does for each new experiment: capture, then checkpoints beside it.
        stats = artifacts.upload(str(script_dir), str(store / f"exp{k}" / "execdir"))
        CheckpointStore(str(store / f"exp{k}" / "checkpoints")).save({"k": k}, step=k)
        assert set(artifacts.manifest(str(store / f"exp{k}" / "execdir"))) == {"train.py"}, k
        assert stats.files == 1
    # A store given directly as a folder of the script's folder.
    direct = script_dir / "snap"
    for _ in range(2):
        artifacts.upload(str(script_dir), str(direct))
    assert set(artifacts.manifest(str(direct))) == {"train.py"}


def test_store_that_is_the_folder_itself_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(UsageError, match="cannot hold"):
        artifacts.upload(str(tmp_path), str(tmp_path))
