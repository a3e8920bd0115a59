"""An experiment's timeline as plain data: one lane per attempt, its phases drawn to scale.

Pure (rows in, dataclasses out, ``now`` passed in) so that the geometry can be unit-tested without a
browser, and so the templates only place boxes at the percentages computed here.

The registry tells the story twice, and both halves are used: status *events* (queued → running →
interrupting → pending → restoring → running ...) say what the experiment was doing between
attempts, and *attempt* rows (started, notice_at, ended) say exactly when each process ran, got its
notice and exited. A lane runs from the end of the previous lane (the experiment's creation for the
first) to the first status change after its attempt ended that leaves running/interrupting; so the
pending and restoring that precede an attempt are drawn on that attempt's lane, and the save after
its notice (and the sync of its execution directory after its exit) on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from lightning_grid.launcher.events import Kind
from lightning_grid.launcher.experiment import Status
from lightning_grid.launcher.registry import AttemptRow, EventRow

__all__ = ["PHASES", "Segment", "Marker", "Lane", "Tick", "Timeline", "build_timeline", "format_seconds"]

#: Phases in the order the legend shows them.
PHASES = ("queued", "restoring", "running", "saving", "pending")

_ACTIVE = {Status.RUNNING.value, Status.INTERRUPTING.value}
_DIRECT = {
    Status.QUEUED.value: "queued",
    Status.PENDING.value: "pending",
    Status.RESTORING.value: "restoring",
}


@dataclass(frozen=True)
class Segment:
    """One phase of one lane: absolute times and their place on the shared axis (percent)."""

    phase: str
    start: float
    end: float
    left: float
    width: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Marker:
    """A moment on a lane: ``notice`` (interruption notice), ``exit`` (the process ended), ``end``."""

    kind: str
    time: float
    at: float
    label: str


@dataclass(frozen=True)
class Lane:
    """One attempt (or, with ``started`` False, the attempt the experiment is waiting to start)."""

    number: int
    started: bool
    outcome: str | None
    start: float
    end: float
    segments: list[Segment] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)


@dataclass(frozen=True)
class Tick:
    at: float
    label: str


@dataclass(frozen=True)
class Timeline:
    start: float
    end: float
    live: bool
    lanes: list[Lane]
    ticks: list[Tick]
    totals: dict[str, float]

    @property
    def seconds(self) -> float:
        return self.end - self.start


def format_seconds(seconds: float) -> str:
    """Short human durations for axis ticks and tooltips: 0.4s, 12.3s, 3m05s, 1h02m."""
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _changes(created: float, status: Status, events: Sequence[EventRow]) -> list[tuple[float, str]]:
    changes = sorted(((e.time, e.to_status) for e in events if e.to_status), key=lambda c: c[0])
    return changes or [(created, status.value)]


def _status_at(changes: list[tuple[float, str]], t: float) -> str:
    current = changes[0][1]
    for when, to in changes:
        if when > t:
            break
        current = to
    return current


def _phase(status: str, t: float, attempt: AttemptRow | None) -> str | None:
    if status in _DIRECT:
        return _DIRECT[status]
    if status not in _ACTIVE:
        return None  # a terminal status: the lane is over
    if attempt is None or t < attempt.started:
        return "restoring"  # status says running, the process is being started
    if status == Status.INTERRUPTING.value:
        return "saving"
    if attempt.notice_at is not None and t >= attempt.notice_at:
        return "saving"  # a user's stop sends a notice without moving to interrupting
    if attempt.ended is not None and t >= attempt.ended:
        return "saving"  # the process exited; its execution directory is being synced
    return "running"


def _notice_label(number: int, events: Sequence[EventRow]) -> str:
    for e in events:
        if e.kind == Kind.NOTICE.value and e.attempt == number:
            source, reason = e.data.get("source"), e.data.get("reason")
            return f"notice from {source}: {reason}" if reason else f"notice from {source}"
    return "notice"


def build_timeline(
    created: float,
    status: Status,
    attempts: Sequence[AttemptRow],
    events: Sequence[EventRow],
    now: float,
    ticks: int = 5,
) -> Timeline:
    """The lanes, segments and markers of one experiment as of ``now``."""
    live = not status.is_terminal()
    changes = _changes(created, status, events)
    start = min(created, changes[0][0])
    moments = [t for a in attempts for t in (a.started, a.ended, a.notice_at) if t is not None]
    end = max([now if live else changes[-1][0], *moments, start])
    span = (end - start) or 1.0

    def pct(t: float) -> float:
        return round(100.0 * (t - start) / span, 3)

    # Lane boundaries.
    bounds: list[tuple[float, float, AttemptRow | None]] = []
    lane_start = start
    for row in attempts:
        lane_end = end
        if row.ended is not None:
            for when, to in changes:
                if when >= row.ended and to not in _ACTIVE:
                    lane_end = when
                    break
        lane_end = max(lane_end, lane_start)
        bounds.append((lane_start, lane_end, row))
        lane_start = lane_end
    if not attempts or lane_start < end:
        bounds.append((lane_start, end, None))  # waiting for the next attempt (or never started)

    lanes: list[Lane] = []
    totals = dict.fromkeys(PHASES, 0.0)
    for index, (lo, hi, attempt) in enumerate(bounds):
        cuts = {lo, hi, *(t for t, _ in changes if lo < t < hi)}
        if attempt is not None:
            cuts.update(t for t in (attempt.started, attempt.notice_at, attempt.ended) if t and lo < t < hi)
        points = sorted(cuts)
        segments: list[Segment] = []
        for t0, t1 in zip(points, points[1:]):
            phase = _phase(_status_at(changes, t0), t0, attempt)
            if phase is None or t1 <= t0:
                continue
            totals[phase] += t1 - t0
            if segments and segments[-1].phase == phase and segments[-1].end == t0:
                prev = segments.pop()
                t0 = prev.start
            segments.append(Segment(phase, t0, t1, pct(t0), round(pct(t1) - pct(t0), 3)))
        markers: list[Marker] = []
        if attempt is not None:
            if attempt.notice_at is not None:
                label = _notice_label(attempt.number, events)
                markers.append(Marker("notice", attempt.notice_at, pct(attempt.notice_at), label))
            if attempt.ended is not None:
                code = "?" if attempt.exit_code is None else str(attempt.exit_code)
                label = f"exit {code}: {attempt.reason or attempt.outcome or 'ended'}"
                markers.append(Marker("exit", attempt.ended, pct(attempt.ended), label))
        if not live and index == len(bounds) - 1:
            final = next((e for e in reversed(events) if e.to_status == status.value), None)
            if final is not None:
                markers.append(Marker("end", final.time, pct(final.time), f"{status.value}: {final.reason}"))
        number = attempt.number if attempt is not None else (attempts[-1].number + 1 if attempts else 1)
        lanes.append(
            Lane(
                number=number,
                started=attempt is not None,
                outcome=(attempt.outcome if attempt is not None else None),
                start=lo,
                end=hi,
                segments=segments,
                markers=markers,
            )
        )
    axis = [
        Tick(round(100.0 * i / (ticks - 1), 3), format_seconds(span * i / (ticks - 1))) for i in range(ticks)
    ]
    if end == start:
        axis = [Tick(0.0, "0.0s")]
    return Timeline(start, end, live, lanes, axis, {k: round(v, 3) for k, v in totals.items()})
