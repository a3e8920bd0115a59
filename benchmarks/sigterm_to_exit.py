"""SIGTERM → process exit for checkpoints of growing size, next to the raw cost of writing the bytes.

    python benchmarks/sigterm_to_exit.py [--state-mb 10,100,1000] [--reps 3] [--out DIR]

The figure now lives in :mod:`benchmarks.preemption`; this is ``python -m benchmarks --only sigterm``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.run import main

    sys.exit(main(["--only", "sigterm", *sys.argv[1:]]))
