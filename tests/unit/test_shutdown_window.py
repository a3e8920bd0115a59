"""Fitting the shutdown into a notice's window: the plan, the save timings it rests on, the publish."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from lightning_grid.checkpoints import CheckpointStore, CommitRecord
from lightning_grid.launcher.window import ShutdownWindow, estimate_from
from lightning_grid.shutdown import (
    EXIT_OVERHEAD_S,
    MARGIN,
    Plan,
    SaveEstimate,
    ShutdownNotice,
    plan_shutdown,
    read_notice,
    write_notice,
)


def _estimate(
    write: float | None, upload: float = 0.0, sync: float = 0.0, fallback: int | None = 8
) -> SaveEstimate:
    return SaveEstimate(write_s=write, upload_s=upload, sync_s=sync, fallback_step=fallback)


@pytest.mark.parametrize(
    "window,estimate,plan",
    [
        (None, _estimate(100.0), Plan.FULL),  # no deadline known
        (30.0, _estimate(None), Plan.FULL),  # never measured
        (30.0, _estimate(2.0, upload=3.0, sync=1.0), Plan.FULL),  # everything fits
        (30.0, _estimate(20.0, upload=0.0, sync=30.0), Plan.FULL),  # local store: the save is all there is
        (30.0, _estimate(10.0, upload=8.0, sync=20.0), Plan.LOCAL),  # checkpoint fits, the sync does not
        (30.0, _estimate(30.0, upload=5.0), Plan.KEEP),  # not even the save fits
        (30.0, _estimate(10.0, upload=20.0), Plan.KEEP),  # the save fits, its upload does not
        (30.0, _estimate(30.0, upload=5.0, fallback=None), Plan.FULL),  # nothing to keep: try anyway
    ],
)
def test_plan_fits_the_window(window: float | None, estimate: SaveEstimate, plan: Plan) -> None:
    chosen, reason = plan_shutdown(window, estimate)
    assert chosen is plan, reason
    if plan is Plan.KEEP:
        assert f"step {estimate.fallback_step}" in reason


def test_plan_boundary_includes_margin_and_exit_overhead() -> None:
    write = 10.0
    needed = write * MARGIN + EXIT_OVERHEAD_S
    assert plan_shutdown(needed, _estimate(write))[0] is Plan.FULL
    assert plan_shutdown(needed - 0.01, _estimate(write))[0] is Plan.KEEP


def _record(step: int, **meta: float) -> CommitRecord:
    return CommitRecord(f"ckpt-{step}", step, "0" * 64, 1, float(step), "periodic", dict(meta))


def test_estimate_takes_the_slowest_of_the_recent_timed_saves() -> None:
    records = [
        _record(12, dump_s=0.5, write_s=1.0, upload_s=2.0),
        _record(8, dump_s=0.1, write_s=3.0, upload_s=0.5),
        _record(4),  # written before saves were timed
        _record(2, dump_s=9.0, write_s=9.0, upload_s=9.0),  # older than the history weighed
    ]
    estimate = estimate_from(records, sync_s=1.5)
    assert estimate == SaveEstimate(write_s=3.1, upload_s=2.0, sync_s=1.5, fallback_step=12)
    assert estimate_from([_record(4)]).write_s is None and estimate_from([]).fallback_step is None


def test_notice_file_round_trip_and_garbage(tmp_path: Path) -> None:
    path = tmp_path / "notice.json"
    notice = ShutdownNotice(Plan.LOCAL, deadline=123.5, window_s=30.0, spool="/tmp/s", reason="why")
    write_notice(str(path), notice)
    assert read_notice(str(path)) == notice
    assert read_notice(None) is None and read_notice(str(tmp_path / "missing.json")) is None
    path.write_text(json.dumps({"plan": "teleport", "deadline": 1, "window_s": 1}))
    assert read_notice(str(path)) is None  # unreadable: the script saves in full


def test_saves_record_their_timings(tmp_path: Path) -> None:
    record = CheckpointStore(str(tmp_path / "s")).save({"x": 1}, step=3, meta={"dump_s": 0.25})
    again = CheckpointStore(str(tmp_path / "s")).committed()[0]
    assert again == record and record.meta["dump_s"] == 0.25
    assert record.meta["write_s"] > 0 and record.meta["upload_s"] == 0


def _spooled(tmp_path: Path, size: int = 1000) -> tuple[CheckpointStore, CheckpointStore, CommitRecord]:
    store = CheckpointStore(str(tmp_path / "store"))
    spool = CheckpointStore(str(tmp_path / "spool"))
    record = spool.save({"blob": bytes(size)}, step=10, reason="preempted")
    spool.write_marker({"step": 10, "checkpoint": record.name, "plan": "local"})
    return store, spool, record


def test_publish_commits_only_what_arrived_in_time(tmp_path: Path) -> None:
    store, spool, record = _spooled(tmp_path, size=40_000_000)
    folder = tmp_path / "store"
    for seconds in (0.0, 0.002):  # gone before the copy starts; gone while it runs
        assert store.publish(spool, record, deadline=time.monotonic() + seconds) is False
        assert store.committed() == []
        assert not folder.exists() or list(folder.iterdir()) == []  # no payload, no temp file
    assert store.publish(spool, record, deadline=time.monotonic() + 120) is True
    published = store.committed()[0]
    assert (published.name, published.step, published.checksum) == (record.name, 10, record.checksum)
    assert store.read_verified(published)  # the bytes arrived whole


def _window(tmp_path: Path, store: CheckpointStore, seconds_left: float) -> ShutdownWindow:
    window = ShutdownWindow(store, str(tmp_path / "notice.json"), str(tmp_path / "spool"))
    window.notice = ShutdownNotice(
        Plan.LOCAL, deadline=time.time() + seconds_left, window_s=30, spool=window.spool_dir
    )
    return window


def test_window_publishes_the_spooled_checkpoint_and_its_marker(tmp_path: Path) -> None:
    store, _, record = _spooled(tmp_path)
    said = _window(tmp_path, store, 60).publish()
    assert said is not None and "step 10 uploaded" in said and "committed" in said
    assert store.committed()[0].name == record.name
    assert store.read_marker() == {"step": 10, "checkpoint": record.name, "plan": "local"}
    assert not (tmp_path / "spool").exists()


def test_window_past_its_deadline_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    store, _, record = _spooled(tmp_path)
    earlier = store.save({"blob": b"old"}, step=6)
    said = _window(tmp_path, store, -1).publish()
    assert said is not None and "did not complete" in said and "step 6 stays" in said
    assert [r.name for r in store.committed()] == [earlier.name]  # never the unfinished upload
    marker = store.read_marker()
    assert marker is not None and (marker["step"], marker["checkpoint"], marker["plan"]) == (
        6,
        earlier.name,
        "keep",
    )


def test_window_plans_from_the_store_and_tells_the_script(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "store"))
    store.save({"x": 1}, step=4, meta={"dump_s": 50.0})  # a save that took ~50 s
    window = ShutdownWindow(store, str(tmp_path / "notice.json"), str(tmp_path / "spool"))
    notice = window.plan(window_s=30.0)
    assert notice.plan is Plan.KEEP and "step 4" in notice.reason
    assert read_notice(window.notice_path) == notice
    assert window.publish() is None  # nothing to upload for a kept checkpoint
    assert ShutdownWindow(store, str(tmp_path / "n2.json"), "", 0.0).plan(window_s=None).plan is Plan.FULL


def test_a_store_that_does_not_answer_never_delays_the_sigterm(tmp_path: Path, monkeypatch) -> None:
    """An object store that hangs (here: an HTTP server that accepts and never replies) costs at most
    the history timeout, and the plan is then a full save."""
    import socket

    from lightning_grid.launcher import window as window_module

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    try:
        monkeypatch.setattr(window_module, "HISTORY_TIMEOUT_S", 0.5)
        store = CheckpointStore(f"http://127.0.0.1:{server.getsockname()[1]}/ckpts")
        window = ShutdownWindow(store, str(tmp_path / "notice.json"), str(tmp_path / "spool"))
        started = time.monotonic()
        notice = window.plan(window_s=30.0)
        assert time.monotonic() - started < 3.0
        assert notice.plan is Plan.FULL and read_notice(window.notice_path) == notice
    finally:
        server.close()


def test_a_signalled_script_waits_briefly_for_a_plan_that_is_on_its_way(tmp_path: Path, monkeypatch) -> None:
    """SLURM signals the script and the agent at once: the plan the agent writes 0.2 s later
    (``keep``: no time for a save) is the one followed, not a full save chosen before it arrived.
    A process that only learned of the notice from another rank does not wait for a file that
    its machine never gets."""
    import threading

    from lightning_grid.resumable.callback import PLAN_WAIT_S, Resumable

    path = tmp_path / "notice.json"
    monkeypatch.setenv("LIGHTNING_GRID_NOTICE", str(path))
    callback = Resumable()
    callback._cut_any = True  # a committed checkpoint to keep
    keep = ShutdownNotice(Plan.KEEP, deadline=time.time() + 2, window_s=2.0, reason="no time for a save")
    writer = threading.Timer(0.2, write_notice, args=(str(path), keep))
    writer.start()
    try:
        assert callback._shutdown_plan(signalled_here=True).plan is Plan.KEEP
    finally:
        writer.cancel()
    path.unlink()
    started = time.monotonic()
    assert callback._shutdown_plan(signalled_here=False).plan is Plan.FULL
    assert time.monotonic() - started < PLAN_WAIT_S / 2
    started = time.monotonic()
    assert callback._shutdown_plan(signalled_here=True).plan is Plan.FULL  # none came: a full save
    assert time.monotonic() - started >= PLAN_WAIT_S


def test_a_sharded_saves_timings_plan_the_window_like_a_files() -> None:
    """A folder checkpoint's record carries the ranks' write time (``sharded.write``): a window
    shorter than that keeps the last checkpoint instead of starting a save that cannot finish."""
    files = {"__0_0.distcp": {"sha256": "a" * 64, "size": 1}, "meta.pt": {"sha256": "b" * 64, "size": 1}}
    record = CommitRecord(
        "ckpt-0000000010-1.dcp",
        10,
        "c" * 64,
        2,
        time.time(),
        "periodic",
        {"dump_s": 1.0, "write_s": 40.0},
        files,
    )
    estimate = estimate_from([record])
    assert record.is_folder and estimate.write_s == 41.0 and estimate.fallback_step == 10
    assert plan_shutdown(30.0, estimate)[0] is Plan.KEEP
    assert plan_shutdown(120.0, estimate)[0] is Plan.FULL
