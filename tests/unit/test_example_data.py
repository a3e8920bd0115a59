"""The example's synthetic data survives a preemption while it is being written.

Seen under load: a notice in the first seconds killed attempt 1 after the first of the four IDX
files; the restored folder then passed for complete ("train-images exists") and attempt 2 died
with torchvision's "Dataset not found"."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "examples" / "mnist"))

from synthetic_mnist import FILES, has_synthetic_mnist, write_synthetic_mnist  # noqa: E402


def test_a_partly_written_data_folder_is_completed(tmp_path: Path) -> None:
    import mnist

    write_synthetic_mnist(str(tmp_path), n_train=20, n_test=10)
    raw = tmp_path / "MNIST" / "raw"
    for name in list(FILES.values())[1:]:  # as if killed after the first file
        os.remove(raw / name)
    assert not has_synthetic_mnist(str(tmp_path))
    mnist.MNISTDataModule(str(tmp_path), batch_size=8, num_workers=0, synthetic=True).prepare_data()
    assert has_synthetic_mnist(str(tmp_path))
