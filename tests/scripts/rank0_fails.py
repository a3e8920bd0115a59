"""Rank 0 fails at once (a user error on node 0); every other rank blocks, as a rank waiting in a
collective for a peer that is gone does until the collective's timeout (30 minutes by default)."""

import os
import sys
import time

if __name__ == "__main__":
    if os.environ.get("RANK") == "0":
        time.sleep(1)
        print("rank 0: a user error", file=sys.stderr, flush=True)
        sys.exit(1)
    time.sleep(3600)
