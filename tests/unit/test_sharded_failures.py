"""How a failed sharded (DCP) write is reported: one line with the rank, the cause and the errno,
from the exceptions DCP and torch really raise (a ``CheckpointException`` is a ``BaseException``
holding each rank's exception and traceback)."""

from __future__ import annotations

import errno
import os
import traceback
from pathlib import Path

import pytest
from torch.distributed.checkpoint.api import CheckpointException

from lightning_grid.errors import StoreFullError
from lightning_grid.resumable import sharded


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:  # noqa: BLE001 - a real traceback, as DCP keeps it
        return caught


def test_a_dcp_failure_is_caught_and_said_in_one_line(tmp_path: Path) -> None:
    inner = _raised(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "__1_0.distcp")))
    dcp = CheckpointException("save failed", {1: (inner, traceback.extract_tb(inner.__traceback__))})
    assert not isinstance(dcp, Exception)  # why the callback catches sharded._failures(), not Exception
    assert isinstance(dcp, sharded._failures())
    said, code = sharded._failure(0, dcp, str(tmp_path))
    assert said == f"rank 1: no space left on device (ENOSPC) ({tmp_path / '__1_0.distcp'})"
    assert code == errno.ENOSPC and "\n" not in said and "Traceback" not in str(said)


def test_a_short_write_is_called_enospc_only_where_the_disk_is_full(tmp_path: Path) -> None:
    short = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    said, code = sharded._failure(1, short, str(tmp_path))  # tmp_path's disk has room
    assert code is None and said == f"rank 1: RuntimeError: {short}"


def test_a_short_write_on_a_full_filesystem_is_called_enospc() -> None:
    # procfs reports no free blocks at all: to statvfs it is a full filesystem.
    if sharded._free_bytes("/proc") != 0:
        pytest.skip("no /proc reporting 0 free bytes here (not Linux)")
    short = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    said, code = sharded._failure(1, short, "/proc")
    assert code == errno.ENOSPC
    assert said.startswith(
        "rank 1: no space left on device (ENOSPC): 0 bytes free under /proc after a short write"
    )
    assert "unexpected pos 704 vs 598" in said


def test_our_own_write_error_keeps_its_message_and_errno(tmp_path: Path) -> None:
    ours = StoreFullError("writing meta.pt failed: no space left on device (ENOSPC)", errno=errno.ENOSPC)
    assert sharded._failure(0, ours, str(tmp_path)) == (f"rank 0: {ours}", errno.ENOSPC)


@pytest.mark.parametrize("failure", [None, ("rank 1: no space left on device (ENOSPC)", errno.ENOSPC)])
def test_a_write_that_never_started_carries_the_failed_ranks_reason_only(
    failure: sharded.Failure | None,
) -> None:
    exc = sharded._Failed(failure)
    assert exc.failure == failure and str(exc)
