"""Multi-process DDP on one machine (gloo, 2 CPU processes): a signal to any rank → one consistent
checkpoint, every rank exits 0, and the resumed run is bit-identical."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import assert_bit_identical, run_until_done

DDP = ["--strategy", "ddp", "--devices", "2", "--aug", "--dropout", "0.2"]


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_ddp_sigterm_to_any_rank(rank: int, tmp_path: Path, mnist_dir: Path, reference) -> None:
    expected = reference.get(DDP)
    out = tmp_path / "w.pt"
    runs = run_until_done(
        mnist_dir, tmp_path / "run", out, DDP + ["--kill-rank", str(rank), "--kill", "train:3"]
    )
    assert len(runs) == 2 and runs[0].returncode == 0
    assert runs[0].output.count("checkpoint at step") == 1
    assert_bit_identical(expected, out)
