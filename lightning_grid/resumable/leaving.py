"""Leaving the process fast once a preemption checkpoint is durable.

The notice window is fixed, and an interpreter that imported torch and Lightning keeps running for
0.3 s (10 MB of state) to 1–2 s (4 GB) after its last statement: time a spot machine does not have.
Two parts of it can go without changing anything the script can see:

* The collector's final passes over the millions of objects torch and Lightning create:
  ``gc.freeze()`` makes them skip those objects. Modules are still cleared and reference-counted
  objects still finalised; Python never promised to finalise cyclic garbage at exit.
* The C library's exit handlers, which run after Python has finished: libtorch's static
  destructors (deregistering every dispatcher kernel, ~0.2 s). glibc's ``on_exit`` hands its
  handlers the exit status, so registering ``_exit`` itself ends the process with exactly the
  status Python chose, after everything Python does at exit (every ``atexit`` handler in its
  order, ``finally`` blocks, logging's flush, the standard streams) has run. Handlers registered
  after this one (libraries loaded later) still run first.

What is skipped: C-level exit handlers of libraries loaded before the notice, and output a C
extension left in C's own stdio buffers. ``Resumable(fast_exit=False)`` keeps them for a library
that must flush at exit (an HDF5 file left open, a C profiler's trace).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import sys

log = logging.getLogger("lightning_grid")

_registered = False


def prepare(skip_c_exit_handlers: bool) -> None:
    """The process leaves next (the checkpoint and its marker are durable): make that short."""
    gc.freeze()
    if skip_c_exit_handlers:
        _end_at_c_exit()


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
