"""A script that speaks the launcher's contract the way Resumable does, without training anything.

``python contract_script.py MODE``: counts steps every 50 ms; on SIGTERM it follows the mode and the
launcher's shutdown plan (full: commit a checkpoint here; local: into the spool; keep: name the last
committed one and how far it got). Later attempts finish at once. Modes:
``preempt`` (as above), ``stubborn`` (ignores SIGTERM), ``finish`` (had finished training when the
notice came: leaves the COMPLETED marker and exits 0), ``crash`` (exits 3 at once).
Used by the scenario table that runs both launcher front ends.
"""

import json
import os
import signal
import sys
import time

mode = sys.argv[1]
attempt = int(os.environ.get("LIGHTNING_GRID_ATTEMPT", "1"))
print(f"attempt {attempt} mode {mode} starts", flush=True)
if mode == "crash":
    sys.exit(3)
if attempt > 1:
    print("finished", flush=True)
    sys.exit(0)

# The handler goes in before the imports below (they import torch, which takes seconds on a
# loaded machine): the scenarios' notices come 1.5 s in, and must find it.
signalled: list[int] = []
signal.signal(signal.SIGTERM, lambda *_: signalled.append(1))
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

from lightning_grid.checkpoints import COMPLETED_MARKER, CheckpointStore  # noqa: E402
from lightning_grid.shutdown import read_notice  # noqa: E402

store = CheckpointStore(os.environ["LIGHTNING_GRID_CHECKPOINTS"])
step = 0
while True:
    time.sleep(0.05)
    step += 1
    if not signalled:
        continue
    if mode == "finish":
        store.write_marker({"step": step, "time": time.time()}, COMPLETED_MARKER)
        sys.exit(0)
    notice = read_notice(os.environ.get("LIGHTNING_GRID_NOTICE"))
    plan = notice.plan.value if notice else "full"
    info = {"step": step, "left_at": step, "plan": plan}
    if plan == "keep":
        kept = store.committed()[0]
        store.write_marker({**info, "step": kept.step, "checkpoint": kept.name})
    else:
        target = CheckpointStore(notice.spool) if plan == "local" and notice and notice.spool else store
        record = target.save({"step": step}, step, reason="preempted")
        target.write_marker({**info, "checkpoint": record.name})
    print(json.dumps(info), flush=True)
    sys.exit(0)
