"""A live SLURM for these tests: started by ``.ci/slurm-up.sh`` if CI has not already.

Two nodes (``lg1``, ``lg2``) on this one machine, each with its two CPUs, and SLURM's accounting
(slurmdbd, for ``sacct``). The tests share them and preempt whatever runs in the spot partition,
so they run one at a time, across pytest-xdist workers too (a file lock), and skip with the reason
where SLURM cannot be started (not root, no Debian).
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO

UP = REPO / ".ci" / "slurm-up.sh"
_LOCK = Path("/tmp/lightning-grid-slurm-tests.lock")


def _up_as_configured() -> bool:
    """Up with slurm-up.sh's configuration: spotshort with its GraceTime, spot on both nodes and
    accounting answering (a cluster of an earlier slurm-up.sh is reconfigured by running it again)."""

    def ask(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=30)

    short = ask("scontrol", "show", "partition", "spotshort", "-o")
    nodes = ask("sinfo", "-h", "-p", "spot", "-o", "%D")
    return (
        short.returncode == 0
        and "GraceTime=5" in short.stdout.split()  # as .ci/slurm-up.sh writes it
        and nodes.stdout.strip() == "2"
        and ask("sacct", "-n", "-X", "-S", "now").returncode == 0
    )


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    if shutil.which("sinfo") is not None and _up_as_configured():
        return
    up = subprocess.run(["bash", str(UP)], capture_output=True, text=True, timeout=300)
    if up.returncode == 3:
        pytest.skip(f"no live SLURM: {up.stderr.strip()}")
    assert up.returncode == 0, f"{UP} failed: {up.stderr[-2000:]}"


@pytest.fixture
def slurm(slurm_cluster: None) -> Iterator[None]:
    """One SLURM test at a time on this machine; nothing of ours left queued afterwards."""
    with open(_LOCK, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            subprocess.run(["scancel", "--partition=high"], capture_output=True)
