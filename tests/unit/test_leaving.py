"""The fast exit after a preemption checkpoint: Python's exit work stays; module teardown and
C-level exit handlers go.

Each case is a fresh interpreter (the registration lasts until the process ends), importing no
torch. A C handler that aborts stands for libtorch's static destructors: it runs, and kills the
process, unless the fast exit ended the process first. A global whose ``__del__`` writes a file
stands for what module teardown does.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's on_exit")

_TOP = """
import atexit, concurrent.futures, ctypes, sys, threading, time
from pathlib import Path
from lightning_grid.resumable import leaving
from lightning_grid.resumable.leaving import Preempted  # no torch: a fresh interpreter in 0.1 s

assert "torch" not in sys.modules
out = Path(sys.argv[1])
atexit.register(lambda: (out / "python-atexit").write_text("ran"))
if {abort_handler}:
    libc = ctypes.CDLL(None)
    libc.on_exit.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    assert libc.on_exit(ctypes.cast(libc.abort, ctypes.c_void_p), None) == 0

notes = open(out / "global-file", "w")  # the script's own global, never closed: buffered
notes.write("a line still in the buffer\\n")


class OnTeardown:
    def __init__(self, path):
        self.path = path

    def __del__(self):  # runs only when module teardown clears this global
        self.path.write_text("ran")


keep = OnTeardown(out / "teardown")


def late(name, delay):
    time.sleep(delay)
    (out / name).write_text("ran")


threading.Thread(target=late, args=("thread", 0.4)).start()  # non-daemon: joined first
pool = concurrent.futures.ThreadPoolExecutor(1)  # its workers wake in threading's own atexit
pool.submit(late, "pool", 0.3)
leaving.note_installed_modules()
leaving.prepare({fast})
print("buffered, never flushed by the script")
try:
{ending}
finally:
    (out / "finally").write_text("ran")
"""


def _top(
    tmp_path: Path, ending: str, fast: bool = True, abort_handler: bool = True
) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(_TOP).format(
        fast=fast, abort_handler=abort_handler, ending=textwrap.indent(textwrap.dedent(ending), "    ")
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120
    )


def _ran(tmp_path: Path) -> set[str]:
    return {p.name for p in tmp_path.iterdir() if p.name != "global-file" and p.read_text() == "ran"}


_PYTHON_EXIT_WORK = {"python-atexit", "finally", "thread", "pool"}


@pytest.mark.parametrize(
    ("ending", "status"),
    [("sys.exit(0)", 0), ("sys.exit(5)", 5), ("raise RuntimeError('boom')", 1), ("pass", 0)],
)
def test_the_status_and_everything_python_does_at_exit_survive(
    tmp_path: Path, ending: str, status: int
) -> None:
    """An exit that is not Preempted's: the usual one, less the C handlers (the abort)."""
    proc = _top(tmp_path, ending)
    assert proc.returncode == status, proc.stderr[-2000:]
    assert proc.stdout == "buffered, never flushed by the script\n"
    assert _ran(tmp_path) >= _PYTHON_EXIT_WORK, proc.stderr[-2000:]
    assert (tmp_path / "global-file").read_text() == "a line still in the buffer\n"


def test_c_exit_handlers_run_without_it(tmp_path: Path) -> None:
    """The same script without the fast exit reaches the C handler: the cases above can fail."""
    proc = _top(tmp_path, "sys.exit(0)", fast=False)
    assert proc.returncode == -signal.SIGABRT, proc.stderr[-2000:]
    assert _ran(tmp_path) >= _PYTHON_EXIT_WORK, proc.stderr[-2000:]


def test_preempted_at_the_top_ends_after_python_exit_work_and_before_teardown(tmp_path: Path) -> None:
    proc = _top(tmp_path, "raise Preempted(7)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "buffered, never flushed by the script\n"
    assert (tmp_path / "global-file").read_text() == "a line still in the buffer\n"
    # Everything Python runs at exit ran; module teardown (the global's __del__) did not, nor the
    # C handler that aborts: the process ended in between.
    assert _ran(tmp_path) == _PYTHON_EXIT_WORK, proc.stderr[-2000:]


def test_without_the_fast_exit_the_same_script_reaches_teardown(tmp_path: Path) -> None:
    """The case above can fail: here teardown runs the global's __del__."""
    proc = _top(tmp_path, "raise Preempted(7)", fast=False, abort_handler=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "global-file").read_text() == "a line still in the buffer\n"
    assert _ran(tmp_path) == _PYTHON_EXIT_WORK | {"teardown"}, proc.stderr[-2000:]


@pytest.mark.parametrize(
    ("ending", "status"),
    [
        # The script reads the code itself and exits with another status: that status, as usual.
        (
            "try:\n    raise Preempted(7)\nexcept SystemExit as e:\n    print('code', e.code)\n    sys.exit(4)",
            4,
        ),
        ("try:\n    raise Preempted(7)\nexcept SystemExit as e:\n    sys.exit(e.code)", 0),
        ("try:\n    raise Preempted(7)\nexcept SystemExit:\n    raise RuntimeError('cleanup failed')", 1),
    ],
)
def test_a_script_that_catches_preempted_exits_as_it_says(tmp_path: Path, ending: str, status: int) -> None:
    proc = _top(tmp_path, ending)
    # The usual exit, with the status the script chose, less the C handlers (the abort) and the
    # collector's last pass (so the global's __del__ does not run); the global file is flushed.
    assert proc.returncode == status, proc.stderr[-2000:]
    assert _ran(tmp_path) == _PYTHON_EXIT_WORK, proc.stderr[-2000:]
    assert (tmp_path / "global-file").read_text() == "a line still in the buffer\n"


def test_a_failed_flush_of_stdout_exits_120_as_python_does(tmp_path: Path) -> None:
    ending = """
    class Broken:
        closed = False
        def write(self, text):
            return len(text)
        def flush(self):
            raise OSError("the pipe is gone")
    sys.stdout = Broken()
    raise Preempted(7)
    """
    (tmp_path / "fast").mkdir()
    (tmp_path / "slow").mkdir()
    fast = _top(tmp_path / "fast", ending)
    slow = _top(tmp_path / "slow", ending, fast=False, abort_handler=False)
    assert (fast.returncode, slow.returncode) == (120, 120), (fast.stderr[-1000:], slow.stderr[-1000:])


# -- torch's exit bookkeeping: private names, pinned here -------------------------------------------

_TORCH = """
import atexit, logging, sys, weakref
import torch, lightning.pytorch
import torch._dynamo.utils as dynamo_utils
import torch.library
from lightning_grid.resumable import leaving

if sys.argv[1] == "logging":
    dynamo_utils.log.setLevel(logging.INFO)
formatted = []
dynamo_utils.compile_times = lambda *a, **k: formatted.append(1) or ""  # what the handler calls
def deregistering():
    return sum(1 for info in weakref.finalize._registry.values() if info.func is torch.library._del_library)
finalizers = deregistering()
leaving._drop_torch_exit_bookkeeping()
atexit._run_exitfuncs()
print(len(formatted), finalizers, deregistering())
"""


@pytest.mark.parametrize(
    ("logger", "formatted"), [("off", 0), pytest.param("logging", 1, marks=pytest.mark.slow)]
)
def test_torch_exit_bookkeeping_is_dropped_only_where_nobody_sees_it(logger: str, formatted: int) -> None:
    """torch registers ``dump_compile_times`` (formats a table for ``log.info``) and one
    ``_del_library`` finalizer per ``Library``; if torch renames them, this fails."""
    proc = subprocess.run([sys.executable, "-c", _TORCH, logger], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    calls, before, after = (int(v) for v in proc.stdout.split())
    assert calls == formatted  # the table is still formatted where its log line is wanted
    assert before > 0 and after == 0
