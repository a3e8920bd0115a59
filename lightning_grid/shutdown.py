"""Fitting the shutdown into the notice's window: what to save when time is short.

A notice leaves a known number of seconds before the machine goes (AWS's 2 minutes, GCP's 30 s, a
pod's grace period). A full save (serialise, write, upload) of a large model may not fit, and a save
cut off by the SIGKILL is worth nothing. The launcher knows how long the last saves took (their
commit records carry the timings), so at the notice it picks what fits:

- ``full``: save and upload in the script, as always;
- ``local``: the script writes the checkpoint to a spool on the machine's own disk and exits; the
  launcher uploads it until the deadline, and commits it in the store only if it arrived whole;
- ``keep``: even a local save would not finish: the script exits at once and the last committed
  (periodic) checkpoint stays the resume point.

The choice travels to the script in a small JSON file (the ``LIGHTNING_GRID_NOTICE`` contract
variable names it), written before the SIGTERM. This module is shared by both sides and imports
neither.
"""

from __future__ import annotations

import enum
import json
import os
from dataclasses import asdict, dataclass

from lightning_grid._io import atomic_write_bytes

__all__ = [
    "Plan",
    "ShutdownNotice",
    "SaveEstimate",
    "plan_shutdown",
    "write_notice",
    "read_notice",
    "MARGIN",
    "EXIT_OVERHEAD_S",
]

#: From SIGTERM to a finished process, beyond the save itself: the step in flight, flushing the
#: logs, interpreter teardown. Measured at 0.9 s for a small CPU model (docs/benchmarks.md).
EXIT_OVERHEAD_S = 1.0
#: Saves take longer under a loaded machine than their history says; plan with some room.
MARGIN = 1.25


class Plan(str, enum.Enum):
    FULL = "full"
    LOCAL = "local"
    KEEP = "keep"


@dataclass(frozen=True)
class ShutdownNotice:
    """What the launcher tells the script at a notice (the file's content)."""

    plan: Plan
    deadline: float  # wall-clock time the machine is expected to go
    window_s: float
    spool: str | None = None  # local folder for a ``local`` save
    reason: str = ""


def write_notice(path: str, notice: ShutdownNotice) -> None:
    data = asdict(notice)
    data["plan"] = notice.plan.value
    atomic_write_bytes(path, json.dumps(data, sort_keys=True).encode())


def read_notice(path: str | None) -> ShutdownNotice | None:
    """The launcher's plan, or None (no launcher, no notice yet, or an unreadable file: save in full)."""
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as handle:
            raw = json.loads(handle.read())
        return ShutdownNotice(
            plan=Plan(raw["plan"]),
            deadline=float(raw["deadline"]),
            window_s=float(raw["window_s"]),
            spool=raw.get("spool"),
            reason=str(raw.get("reason", "")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class SaveEstimate:
    """How long the recent saves took, from their commit records (None: never measured)."""

    write_s: float | None  # gathering the state and writing it to local disk
    upload_s: float  # sending it to the store (0 for a local store)
    sync_s: float = 0.0  # the launcher's sync of the execution directory afterwards
    fallback_step: int | None = None  # the newest committed checkpoint, kept if nothing new fits


def plan_shutdown(window_s: float | None, estimate: SaveEstimate) -> tuple[Plan, str]:
    """The plan that fits ``window_s`` seconds, and why (for the events).

    The checkpoint comes before the execution directory's sync: when both do not fit, the save is
    split (``local``) so the launcher can upload it first, with the deadline in hand."""
    if window_s is None or estimate.write_s is None:
        return Plan.FULL, "no save timings yet: saving in full"
    write = estimate.write_s * MARGIN + EXIT_OVERHEAD_S
    save = write + estimate.upload_s * MARGIN
    needs = (
        f"a save takes ~{estimate.write_s:.1f}s + {estimate.upload_s:.1f}s upload"
        f" + {estimate.sync_s:.1f}s sync"
    )
    if save + estimate.sync_s <= window_s or (save <= window_s and estimate.upload_s == 0):
        return Plan.FULL, f"{needs}: fits the {window_s:.0f}s window, saving in full"
    if save <= window_s:
        return (
            Plan.LOCAL,
            f"{needs}: more than the {window_s:.0f}s window, saving locally and uploading until the deadline",
        )
    if estimate.fallback_step is None:
        return Plan.FULL, f"{needs}: more than the {window_s:.0f}s window, but there is no earlier checkpoint"
    return (
        Plan.KEEP,
        f"{needs}: more than the {window_s:.0f}s window, no new save; the checkpoint at step"
        f" {estimate.fallback_step} stays the resume point",
    )
