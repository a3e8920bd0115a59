"""The launcher's half of fitting a shutdown into the notice's window (see :mod:`lightning_grid.shutdown`).

At the notice it weighs the window against the recent saves' timings and tells the script what
to do; after the script's exit it publishes a checkpoint the script left in the local spool, until
the deadline and no longer. Used by the local launcher and by the on-instance agent alike.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass

from lightning_grid.checkpoints import CheckpointStore, CommitRecord
from lightning_grid.errors import LightningGridError
from lightning_grid.shutdown import Plan, SaveEstimate, ShutdownNotice, plan_shutdown, write_notice

__all__ = ["ShutdownWindow", "estimate_from"]

log = logging.getLogger("lightning_grid")

#: Commit records weighed: the slowest of the last few saves, not the luckiest.
_HISTORY = 3
#: How long the save history may take to read at a notice, before the SIGTERM goes out regardless.
HISTORY_TIMEOUT_S = 2.0


def estimate_from(records: list[CommitRecord], sync_s: float = 0.0) -> SaveEstimate:
    """Timings of the newest committed saves (records from before timings were kept count as unknown)."""
    timed = [r for r in records[:_HISTORY] if "write_s" in r.meta]
    fallback = records[0].step if records else None
    if not timed:
        return SaveEstimate(write_s=None, upload_s=0.0, sync_s=sync_s, fallback_step=fallback)
    write = max(float(r.meta.get("dump_s", 0.0)) + float(r.meta["write_s"]) for r in timed)
    upload = max(float(r.meta.get("upload_s", 0.0)) for r in timed)
    return SaveEstimate(write_s=write, upload_s=upload, sync_s=sync_s, fallback_step=fallback)


@dataclass
class ShutdownWindow:
    """One attempt's shutdown planning: the notice file the script reads, and the spool it may fill."""

    store: CheckpointStore
    notice_path: str
    spool_dir: str
    sync_s: float = 0.0
    notice: ShutdownNotice | None = None

    def plan(self, window_s: float | None) -> ShutdownNotice:
        """Choose what fits and write it where the script will look, before the SIGTERM."""
        records = self._history()
        plan, reason = plan_shutdown(window_s, estimate_from(records, self.sync_s))
        self.notice = ShutdownNotice(
            plan=plan,
            deadline=time.time() + (window_s or 0.0),
            window_s=window_s or 0.0,
            spool=self.spool_dir if plan is Plan.LOCAL else None,
            reason=reason,
        )
        write_notice(self.notice_path, self.notice)
        return self.notice

    def _history(self) -> list[CommitRecord]:
        """The store's commit records, or none if it does not answer promptly: a slow or unreachable
        store must not delay the SIGTERM (a full save is then the plan)."""
        found: list[list[CommitRecord]] = []

        def read() -> None:
            try:
                found.append(self.store.committed())
            except Exception as exc:  # any backend error: no history
                log.warning("lightning-grid: cannot read the save history (%s); saving in full", exc)

        reader = threading.Thread(target=read, name="lightning_grid-history", daemon=True)
        reader.start()
        reader.join(HISTORY_TIMEOUT_S)
        if not found and reader.is_alive():
            log.warning("lightning-grid: the store did not answer in %gs; saving in full", HISTORY_TIMEOUT_S)
        return found[0] if found else []

    def publish(self) -> str | None:
        """After the exit: upload a checkpoint the script saved locally, if it arrives in time.

        Returns what happened, for the events (None when there was nothing to do). The marker the
        script left with it moves along only when the checkpoint was committed; otherwise one that
        names the checkpoint still in force takes its place."""
        if self.notice is None or self.notice.plan is not Plan.LOCAL:
            return None
        spool = CheckpointStore(self.spool_dir)
        try:
            spooled = spool.committed()
            if not spooled:
                return "no checkpoint was written to the local spool"
            record = spooled[0]
            started = time.monotonic()
            try:
                deadline = time.monotonic() + (self.notice.deadline - time.time())
                done = self.store.publish(spool, record, deadline=deadline)
            except (LightningGridError, OSError) as exc:
                done, why = False, str(exc)
            else:
                why = "the deadline came first"
            marker = spool.read_marker() or {}
            if done:
                self.store.write_marker(marker)
                return (
                    f"checkpoint at step {record.step} uploaded after the exit in"
                    f" {time.monotonic() - started:.2f}s and committed"
                )
            kept = next(iter(self.store.committed()), None)
            if kept is not None:
                self.store.write_marker(
                    {**marker, "step": kept.step, "checkpoint": kept.name, "plan": "keep"}
                )
            still = f"step {kept.step} stays the resume point" if kept else "no checkpoint is committed"
            return f"the upload of the checkpoint at step {record.step} did not complete ({why}); {still}"
        finally:
            shutil.rmtree(self.spool_dir, ignore_errors=True)
