from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from tests.helpers import run_train, write_synthetic_mnist


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """Tests that install handlers in this process must not leak them into the next test."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mnist")
    write_synthetic_mnist(str(root), n_train=240, n_test=64, seed=0)
    return root


class ReferenceCache:
    """Uninterrupted runs of the same script with plain Lightning, computed once per configuration."""

    def __init__(self, base: Path, data_dir: Path) -> None:
        self.base = base
        self.data_dir = data_dir
        self.paths: dict[tuple[str, ...], Path] = {}

    def get(self, args: list[str]) -> Path:
        key = tuple(args)
        if key not in self.paths:
            folder = self.base / f"ref{len(self.paths)}"
            out = folder / "weights.pt"
            run = run_train(self.data_dir, folder, out, ["--mode", "plain", *args])
            assert run.returncode == 0 and out.exists(), run.output[-3000:]
            self.paths[key] = out
        return self.paths[key]


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> ReferenceCache:
    return ReferenceCache(tmp_path_factory.mktemp("references"), mnist_dir)
