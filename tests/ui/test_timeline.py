"""The timeline's geometry as plain data: lanes per attempt, phases to scale, markers with reasons."""

from __future__ import annotations

import pytest

from lightning_grid.launcher.events import Kind
from lightning_grid.launcher.experiment import Status
from lightning_grid.launcher.registry import AttemptRow, EventRow
from lightning_grid.ui.timeline import build_timeline, format_seconds


def attempt(number: int, started: float, ended: float | None = None, notice_at: float | None = None,
            exit_code: int | None = None, outcome: str | None = None, reason: str = "") -> AttemptRow:  # fmt: skip
    return AttemptRow(
        "x", number, 100 + number, started, ended, exit_code, outcome, reason, notice_at, None, ""
    )


def change(time: float, to: str, reason: str = "", frm: str | None = None) -> EventRow:
    return EventRow(time, frm, to, reason)


def notice(time: float, attempt: int, source: str, reason: str) -> EventRow:
    """A notice as the launcher records it: a structured event (the timeline reads its fields)."""
    message = f"attempt {attempt}: notice from {source}: {reason}"
    return EventRow(
        time, None, None, message, Kind.NOTICE.value, attempt, {"source": source, "reason": reason}
    )


def phases(lane) -> list[tuple[str, float, float]]:
    return [(s.phase, s.start, s.end) for s in lane.segments]


# Submitted at 0; attempt 1 runs 1-40, notice at 30; attempt 2 runs 52-80, notice at 70; attempt 3
# runs 92-100 and succeeds. Total 100 seconds: percentages equal seconds.
TWICE = (
    [
        attempt(1, 1, 40, 30, 0, "preempted", "preempted; checkpoint at step 15"),
        attempt(2, 52, 80, 70, 0, "preempted", "preempted; checkpoint at step 31"),
        attempt(3, 92, 99, None, 0, "succeeded", "succeeded"),
    ],
    [
        change(0, "queued", "submitted"),
        change(0.5, "running", "attempt 1 started"),
        notice(30, 1, "simulator", "simulated spot interruption after 29s"),
        change(30, "interrupting", "simulated spot interruption; SIGTERM sent"),
        change(41, "pending", "preempted"),
        change(50, "restoring", "restoring for attempt 2"),
        change(51, "running", "attempt 2 started"),
        notice(70, 2, "aws", "spot interruption notice"),
        change(70, "interrupting", "spot interruption; SIGTERM sent"),
        change(81, "pending", "preempted"),
        change(90, "restoring", "restoring for attempt 3"),
        change(91, "running", "attempt 3 started"),
        change(100, "succeeded", "exited 0"),
    ],
)


def test_a_twice_preempted_experiment_has_one_lane_per_attempt_with_its_phases_to_scale() -> None:
    attempts, events = TWICE
    t = build_timeline(0.0, Status.SUCCEEDED, attempts, events, now=500.0)
    assert not t.live and (t.start, t.end) == (0.0, 100.0)  # a finished experiment ignores "now"
    assert [lane.number for lane in t.lanes] == [1, 2, 3]
    assert [lane.outcome for lane in t.lanes] == ["preempted", "preempted", "succeeded"]
    # Lanes tile the axis: each starts where the previous left running/interrupting.
    assert [(lane.start, lane.end) for lane in t.lanes] == [(0, 41), (41, 81), (81, 100)]
    assert phases(t.lanes[0]) == [
        ("queued", 0, 0.5),
        ("restoring", 0.5, 1),
        ("running", 1, 30),
        ("saving", 30, 41),
    ]
    assert phases(t.lanes[1]) == [
        ("pending", 41, 50), ("restoring", 50, 52), ("running", 52, 70), ("saving", 70, 81),
    ]  # fmt: skip
    assert phases(t.lanes[2]) == [
        ("pending", 81, 90), ("restoring", 90, 92), ("running", 92, 99), ("saving", 99, 100),
    ]  # fmt: skip
    running = t.lanes[1].segments[2]
    assert (running.left, running.width) == (52.0, 18.0)  # drawn to scale on the shared axis
    assert t.totals == {"queued": 0.5, "restoring": 4.5, "running": 54.0, "saving": 23.0, "pending": 18.0}


def test_notices_and_exits_are_marked_with_their_reasons() -> None:
    attempts, events = TWICE
    t = build_timeline(0.0, Status.SUCCEEDED, attempts, events, now=500.0)
    first, second, last = t.lanes
    assert [(m.kind, m.at) for m in first.markers] == [("notice", 30.0), ("exit", 40.0)]
    assert first.markers[0].label == "notice from simulator: simulated spot interruption after 29s"
    assert first.markers[1].label == "exit 0: preempted; checkpoint at step 15"
    assert second.markers[0].label == "notice from aws: spot interruption notice"
    assert [(m.kind, m.label) for m in last.markers] == [
        ("exit", "exit 0: succeeded"),
        ("end", "succeeded: exited 0"),
    ]


def test_a_live_experiment_runs_to_now_and_waits_in_a_lane_of_its_own() -> None:
    attempts = [attempt(1, 1, 40, 30, 0, "preempted", "preempted")]
    events = [
        change(0, "queued"), change(0.5, "running"), change(30, "interrupting"), change(41, "pending"),
    ]  # fmt: skip
    t = build_timeline(0.0, Status.PENDING, attempts, events, now=200.0)
    assert t.live and t.end == 200.0
    assert [(lane.number, lane.started) for lane in t.lanes] == [(1, True), (2, False)]
    assert phases(t.lanes[1]) == [("pending", 41, 200)]
    # A running attempt's bar grows with the clock.
    running = build_timeline(0.0, Status.RUNNING, [attempt(1, 1)], events[:2], now=10.0)
    assert len(running.lanes) == 1 and phases(running.lanes[0])[-1] == ("running", 1, 10)
    assert running.lanes[0].segments[-1].width == 90.0


def test_queued_with_no_attempt_is_one_waiting_lane() -> None:
    t = build_timeline(5.0, Status.QUEUED, [], [change(5, "queued", "submitted")], now=15.0)
    assert [(lane.number, lane.started) for lane in t.lanes] == [(1, False)]
    assert [(s.phase, s.left, s.width) for s in t.lanes[0].segments] == [("queued", 0.0, 100.0)]


def test_a_user_stop_saves_without_interrupting_and_ends_the_last_lane() -> None:
    attempts = [attempt(1, 1, 12, 10, 0, "stopped", "stopped")]
    events = [change(0, "queued"), change(0.5, "running"), change(13, "stopped", "stopped by the user")]
    t = build_timeline(0.0, Status.STOPPED, attempts, events, now=99.0)
    assert phases(t.lanes[0])[-2:] == [("running", 1, 10), ("saving", 10, 13)]
    assert t.lanes[0].markers[-1].label == "stopped: stopped by the user"


def test_a_crash_relaunched_at_once_and_a_pending_experiment_stopped_later() -> None:
    attempts = [attempt(1, 1, 5, None, 3, "failed", "exited 3"), attempt(2, 6, 9, None, 0, "succeeded")]
    events = [
        change(0, "queued"), change(0.5, "running"), change(5.5, "restoring", "failed; retry 1 of 1"),
        change(5.8, "running"), change(10, "succeeded"),
    ]  # fmt: skip
    t = build_timeline(0.0, Status.SUCCEEDED, attempts, events, now=10.0)
    assert phases(t.lanes[1])[0] == ("restoring", 5.5, 6)
    assert [m.label for m in t.lanes[0].markers] == ["exit 3: exited 3"]
    # Stopped while pending: the time after the last attempt is a lane of its own, not lost.
    pending = [attempt(1, 1, 4, 3, 0, "preempted")]
    events = [change(0, "queued"), change(0.5, "running"), change(3, "interrupting"), change(5, "pending"),
              change(20, "stopped", "stopped by the user")]  # fmt: skip
    t = build_timeline(0.0, Status.STOPPED, pending, events, now=50.0)
    assert [(lane.number, lane.started) for lane in t.lanes] == [(1, True), (2, False)]
    assert phases(t.lanes[1]) == [("pending", 5, 20)] and t.end == 20.0


def test_ticks_and_durations_read_well() -> None:
    t = build_timeline(0.0, Status.SUCCEEDED, *TWICE, now=0.0)
    assert [(tick.at, tick.label) for tick in t.ticks] == [
        (0.0, "0.0s"), (25.0, "25s"), (50.0, "50s"), (75.0, "1m15s"), (100.0, "1m40s"),
    ]  # fmt: skip


@pytest.mark.parametrize("seconds,text", [(0.42, "0.4s"), (12.3, "12s"), (65, "1m05s"), (3725, "1h02m")])
def test_format_seconds(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text
