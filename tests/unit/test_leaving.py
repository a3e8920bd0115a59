"""The fast exit after a preemption checkpoint: C-level exit handlers go, Python's exit stays.

Each case is a fresh interpreter (the registration lasts until the process ends). A C handler that
aborts stands for libtorch's static destructors: it runs, and kills the process, unless the fast
exit ended the process first.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's on_exit")

_SCRIPT = """
import atexit, ctypes, sys
from pathlib import Path
from lightning_grid.resumable import leaving

out = Path(sys.argv[1])
atexit.register(lambda: (out / "python-atexit").write_text("ran"))  # before ours, as logging's is
libc = ctypes.CDLL(None)
libc.on_exit.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
assert libc.on_exit(ctypes.cast(libc.abort, ctypes.c_void_p), None) == 0  # a C library's exit handler
leaving.prepare({fast})
print("buffered, never flushed by the script")
try:
    {ending}
finally:
    (out / "finally").write_text("ran")
"""


def _run(tmp_path: Path, fast: bool, ending: str) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(_SCRIPT).format(fast=fast, ending=ending)
    return subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("ending", "status"),
    [("sys.exit(0)", 0), ("sys.exit(5)", 5), ("raise RuntimeError('boom')", 1), ("pass", 0)],
)
def test_the_status_and_everything_python_does_at_exit_survive(
    tmp_path: Path, ending: str, status: int
) -> None:
    proc = _run(tmp_path, fast=True, ending=ending)
    assert proc.returncode == status, proc.stderr[-2000:]
    assert proc.stdout == "buffered, never flushed by the script\n"
    assert (tmp_path / "python-atexit").read_text() == "ran"
    assert (tmp_path / "finally").read_text() == "ran"


def test_c_exit_handlers_run_without_it(tmp_path: Path) -> None:
    """The same script without the fast exit reaches the C handler: the cases above can fail."""
    proc = _run(tmp_path, fast=False, ending="sys.exit(0)")
    assert proc.returncode == -signal.SIGABRT, proc.stderr[-2000:]
    assert (tmp_path / "python-atexit").read_text() == "ran"
