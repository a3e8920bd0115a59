"""Leaving the process fast once a preemption checkpoint is durable.

The notice window is fixed, and an interpreter that imported torch and Lightning keeps running for
0.5–3 s after its last statement (measured on a 2-core VM), of which only ~0.1 s is the kernel
ending the process: time a spot machine does not have. What it spends that time on, and what we
do about each part:

* **Python's exit work** (``finally`` blocks, non-daemon threads joined, ``threading``'s and
  ``atexit``'s handlers in their order, logging's flush, the standard streams): all of it runs, as
  the interpreter would run it. Two of torch's handlers are bookkeeping whose only effect a dying
  process cannot observe, and they cost 50 ms: ``dump_compile_times`` imports ``tabulate`` to format
  a table for a logger that is off, and ``torch.library``'s finalizers deregister thousands of
  dispatcher kernels one by one. Those two are dropped (only when the logger is off, for the first).
* **Module teardown**: clearing every module and finalising what it held, 70 ms. When
  :class:`Preempted` reaches the top of the script uncaught, the exit status is ours (0), so
  once Python's exit work has run the process ends there (``os._exit`` with that status). What
  teardown would have done that anyone could see, flushing files held in the script's own globals
  and never closed, is done first. ``__del__`` of other objects still alive at exit is not run:
  CPython never promised it ("It is not guaranteed that ``__del__()`` methods are called for objects
  that still exist when the interpreter exits").
* **The collector's final passes** over the millions of objects torch and Lightning create:
  ``gc.freeze()`` makes them skip those objects, for exits that do not end at the top (a script
  that catches :class:`Preempted`).
* **The C library's exit handlers**, which run after Python has finished: libtorch's static
  destructors (~0.2 s). glibc's ``on_exit`` hands its handlers the exit status, so registering
  ``_exit`` itself ends the process with exactly the status Python chose. This is what still applies
  when the exit does not end at the top.

How we know the status at the top: the interpreter reads the ``code`` attribute of the
``SystemExit`` that ended the script, from C, with no Python frame left on the stack, just before it
finalises. :class:`Preempted` reads its own ``code`` through a property, so the read that has no
caller frame, on the main thread, is that one. A script that catches it and exits otherwise
(``except SystemExit: sys.exit(3)``) ends as usual, with its own status.

What is skipped in all: C-level exit handlers of libraries loaded before the notice, and
finalisers of objects still alive at exit. ``Resumable(fast_exit=False)`` keeps them, for a library
that must run them (an HDF5 file left open, a C profiler's trace).
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import gc
import io
import logging
import os
import sys
import sysconfig
import threading
import weakref
from types import BuiltinFunctionType, FrameType, FunctionType, ModuleType

log = logging.getLogger("lightning_grid")

_registered = False  # glibc's on_exit(_exit) is in place
_end_at_top = False  # the checkpoint is durable: a Preempted that reaches the top ends the process

#: What a file's buffer is held in (``open()`` in text or binary mode, for writing).
_BUFFERED = (io.TextIOWrapper, io.BufferedWriter, io.BufferedRandom)


def prepare(fast: bool) -> None:
    """The process leaves next (the checkpoint and its marker are durable): make that short
    (``fast``), or leave it exactly as Python would."""
    global _end_at_top
    if not fast or _end_at_top:
        return
    gc.freeze()
    # For an exit that does not end at the top: the frozen collector no longer finalises a module
    # dict left in a cycle (any script that defines a function), so its open files are flushed here.
    atexit.register(_flush_files_of_user_modules)
    _drop_torch_exit_bookkeeping()
    _end_at_c_exit()
    _end_at_top = True


class Preempted(SystemExit):
    """Leaves ``trainer.fit`` after the preemption checkpoint is committed; exit status 0.

    A ``SystemExit`` so that the user's script stops where it is (code after ``fit`` must not run
    as if training had finished) yet the process reports success to whoever relaunches it.
    """

    def __init__(self, step: int) -> None:
        super().__init__(0)
        self.step = step

    # The interpreter reads ``code`` once the script has ended with this exception, from C with no
    # Python frame left: that read says the exit status is ours (the module's docstring).
    @property  # type: ignore[override]
    def code(self) -> object:
        code = _SYSTEM_EXIT_CODE.__get__(self, SystemExit)
        _status_read(code, sys._getframe().f_back)
        return code

    @code.setter
    def code(self, value: object) -> None:
        _SYSTEM_EXIT_CODE.__set__(self, value)


_SYSTEM_EXIT_CODE = SystemExit.__dict__["code"]  # the C slot that SystemExit(0) filled


def _status_read(code: object, caller: FrameType | None) -> None:
    """By the interpreter's last step (no ``caller``, main thread) when the script ended with
    :class:`Preempted`: finish Python's exit work and end with ``code``."""
    if not _end_at_top or caller is not None or threading.current_thread() is not threading.main_thread():
        return
    if isinstance(code, int):
        _end_now(code)


def _end_now(status: int) -> None:
    """What ``Py_FinalizeEx`` does before it clears the modules, in its order, then the end."""
    # 1. threading's own atexit calls (concurrent.futures wakes its workers there), then every
    #    non-daemon thread joined: the interpreter's first step, the same function it calls.
    threading._shutdown()  # type: ignore[attr-defined]
    # 2. atexit handlers, newest first; an exception is printed and does not change the status.
    #    Our own file flush (registered by prepare) waits for step 3: handlers registered before
    #    it, which run after it, may still write.
    atexit.unregister(_flush_files_of_user_modules)
    atexit._run_exitfuncs()
    # 3. What module teardown would have shown: files the script's own modules opened and never
    #    closed get what is in their buffers.
    _flush_files_of_user_modules()
    # 4. The standard streams; a failed flush makes the interpreter exit 120, so it does here too.
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None and not getattr(stream, "closed", False):
                stream.flush()
        except Exception:
            status = 120
    _flush_c_stdio()
    os._exit(status)


def note_installed_modules() -> None:
    """Remember which modules come from the installed packages and the standard library (at the
    start of fit, off the notice's clock), so that the exit looks at the others only."""
    _installed_modules.update(name for name, module in list(sys.modules.items()) if _is_installed(module))


def _is_installed(module: object) -> bool:
    """Installed, standard library, or ours (which holds no file of the script's)."""
    if not isinstance(module, ModuleType):
        return True  # a stand-in in sys.modules (typing.io): no globals of a script
    if module.__name__ == "__main__":
        return False
    if module.__name__.partition(".")[0] == "lightning_grid":
        return True
    origin = vars(module).get("__file__")
    return not isinstance(origin, str) or origin.startswith(_installed_roots())


@functools.cache
def _installed_roots() -> tuple[str, ...]:
    """The standard library's and the installed packages' folders, as given and resolved."""
    paths = sysconfig.get_paths()
    roots = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    return tuple({os.path.join(p, "") for root in roots for p in (root, os.path.realpath(root))})


_installed_modules: set[str] = set()


def _flush_files_of_user_modules() -> None:
    """Flush the open files the script's own modules hold (``__main__`` and modules outside the
    installed packages and the standard library): as globals, in containers or objects held by
    globals, or behind a ``csv.writer``, up to three references away. Flushing any module's files
    is what teardown does; leaving out the installed ones (thousands under torch) keeps this short."""
    frontier: list[object] = []
    for name, module in list(sys.modules.items()):
        if name not in _installed_modules and not _is_installed(module):
            frontier.extend(vars(module).values())
    seen: set[int] = set()
    for _depth in range(_FILE_DEPTH):
        found: list[object] = []
        for value in frontier:
            if id(value) in seen or isinstance(value, _NOT_TRAVERSED) or len(seen) > _FILE_SEARCH_LIMIT:
                continue
            seen.add(id(value))
            if type(value) in _BUFFERED:
                if not value.closed:  # type: ignore[attr-defined]
                    try:
                        value.flush()  # type: ignore[attr-defined]
                    except Exception:  # a full disk or a closed pipe: as in teardown, nobody to tell
                        pass
                continue
            found.extend(gc.get_referents(value))
        frontier = found


_FILE_DEPTH = 4  # the globals themselves, then three references away
_FILE_SEARCH_LIMIT = 20_000  # objects looked at, at most (a global holding a huge graph)
_NOT_TRAVERSED = (ModuleType, type, FunctionType, BuiltinFunctionType, str, bytes, int, float)


def _flush_c_stdio() -> None:
    """C's own stdio buffers (a C extension's ``printf``), which ``exit`` would have flushed."""
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


def _drop_torch_exit_bookkeeping() -> None:
    """torch's exit handlers whose effect a process that is ending cannot observe (50 ms at 10 MB).

    Private torch names, pinned by ``tests/unit/test_leaving.py``: where they change, nothing is
    dropped and the exit is only slower."""
    dynamo = sys.modules.get("torch._dynamo.utils")
    dump = getattr(dynamo, "dump_compile_times", None)
    logger = getattr(dynamo, "log", None)
    # Formats the compile-time table (importing tabulate, 35 ms) for a log.info that is off.
    if dump is not None and isinstance(logger, logging.Logger) and not logger.isEnabledFor(logging.INFO):
        atexit.unregister(dump)
    library = sys.modules.get("torch.library")
    deregister = getattr(library, "_del_library", None)
    if deregister is None:
        return
    # Each torch.library.Library deregisters its kernels from the dispatcher at exit (17 ms).
    registry = getattr(weakref.finalize, "_registry", {})
    for finalizer, info in list(registry.items()):
        if getattr(info, "func", None) is deregister:
            finalizer.detach()


def _end_at_c_exit() -> None:
    global _registered
    if _registered or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        on_exit, exit_now = libc.on_exit, libc._exit  # glibc; musl has no on_exit
    except (OSError, AttributeError):
        return
    on_exit.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    on_exit.restype = ctypes.c_int
    # Called as _exit(status, NULL): the extra argument is ignored under the C calling convention.
    if on_exit(ctypes.cast(exit_now, ctypes.c_void_p), None) == 0:
        _registered = True
    else:
        log.debug("lightning_grid: on_exit refused the fast exit; the process exits as usual")
