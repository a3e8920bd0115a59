"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh LIGHTNING_GRID_HOME for the launcher (in-process engines and child CLIs alike)."""
    path = tmp_path / "home"
    monkeypatch.setenv("LIGHTNING_GRID_HOME", str(path))
    return path
