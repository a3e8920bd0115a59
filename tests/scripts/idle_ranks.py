"""A rank that does nothing until told, for tests of torchrun's agents and of the launcher around them.

``python idle_ranks.py DIR``: writes ``DIR/ready-<RANK>``, then waits; once ``DIR/exit-<RANK>`` exists
it exits with the code written there. SIGTERM keeps its default action (the rank ends at once). A
relaunch (``LIGHTNING_GRID_ATTEMPT`` above 1) exits 0 at once.

It runs no collective and imports no torch: a rank that does not notice a lost peer at once, as one
blocked in NCCL (which hangs rather than fails), in a long save, or in work of its own does, and
that starts in a moment.
"""

from __future__ import annotations

import os
import sys
import time


def main() -> int:
    here = sys.argv[1]
    rank = os.environ.get("RANK", "0")
    if int(os.environ.get("LIGHTNING_GRID_ATTEMPT", "1")) > 1:
        return 0
    with open(os.path.join(here, f"ready-{rank}"), "w") as handle:
        handle.write(str(os.getpid()))
    told = os.path.join(here, f"exit-{rank}")
    while not os.path.exists(told):
        time.sleep(0.05)
    time.sleep(0.05)  # the writer's one short write is whole by now
    with open(told) as handle:
        return int(handle.read().strip() or 0)


if __name__ == "__main__":
    sys.exit(main())
