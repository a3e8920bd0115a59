"""The program of the process that hosts an attempt's c10d rendezvous store (see
:mod:`lightning_grid.launcher.rendezvous_store`, which starts it).

``PYTHON _rendezvous_server.py HOST PORT``: hosts a ``torch.distributed.TCPStore`` at ``PORT`` (0:
any free one), writes the port it bound as one line on stdout, and serves until its stdin closes
(the launcher is done with the attempt) or the launcher dies (``PR_SET_PDEATHSIG``, set by the
launcher). It is run by file path, with the interpreter torchrun runs with, so it needs nothing but
the standard library and that interpreter's torch: the store then speaks the agents' own torch,
which need not be the launcher's.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    host, port = argv[1], int(argv[2])
    # Run by path, Python put this file's folder first on sys.path: the launcher's modules there
    # (events, window, …) must not shadow anything torch imports.
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or os.curdir) == here:
        del sys.path[0]
    # Here, not at the top: the launcher's own import of its package must not load torch.
    from torch.distributed import TCPStore

    store = TCPStore(host, port, is_master=True, wait_for_workers=False)
    sys.stdout.write(f"{store.port}\n")
    sys.stdout.flush()
    sys.stdin.buffer.read()  # until the launcher closes it
    del store  # the server stops with its last reference
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
