"""Resume under torchrun (two processes, gloo) with the cut in a later epoch: Lightning builds the
resumed epoch's iterator before it calls ``set_epoch``, so a DistributedSampler would replay epoch
0's shuffle unless the loader puts the interrupted epoch's number back first."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, assert_bit_identical, child_env, run_tree

SCRIPT = REPO / "tests" / "scripts" / "nodes_train.py"


def _torchrun(tmp: Path, out: Path, *more: str, attempt: str = "1") -> str:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(SCRIPT), "--out", str(out), "--ckpt-dir", str(tmp / "ckpt"), "--epochs", "3", "--workers", "1",
        *more,
    ]  # fmt: skip
    proc = run_tree(command, env=child_env(LIGHTNING_GRID_ATTEMPT=attempt), timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_cut_in_a_later_epoch_resumes_bit_identically(tmp_path: Path) -> None:
    expected = tmp_path / "expected.pt"
    _torchrun(tmp_path / "plain", expected)
    out = tmp_path / "w.pt"
    first = _torchrun(tmp_path / "cut", out, "--sigterm-at", "30:1")  # epoch 2 of 0..2 (12 steps each)
    assert "checkpoint at step 31" in first and not out.exists()
    second = _torchrun(tmp_path / "cut", out, "--sigterm-at", "30:1", attempt="2")
    assert "resuming from" in second
    assert_bit_identical(expected, out)
