"""The checkpoint writer thread: jobs in order, one thread reused, none left behind when idle."""

from __future__ import annotations

import threading
import time

import pytest

from lightning_grid.resumable import background
from lightning_grid.resumable.background import THREAD_NAME, Writer


def _writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


def test_jobs_run_in_order_on_one_thread_that_is_reused() -> None:
    writer = Writer()
    ran: list[tuple[int, int]] = []
    gate = threading.Event()
    first = writer.submit(lambda: (gate.wait(10), ran.append((1, threading.get_ident()))))
    second = writer.submit(lambda n: ran.append((n, threading.get_ident())), 2)
    assert first.is_alive() and second.is_alive()  # the first waits on the gate, the second behind it
    assert not second.join(timeout=0.05)
    gate.set()
    assert second.join(timeout=10) and not first.is_alive()
    third = writer.submit(lambda: ran.append((3, threading.get_ident())))
    assert third.join(timeout=10)
    assert [n for n, _ in ran] == [1, 2, 3]
    assert len({ident for _, ident in ran}) == 1  # one thread for all
    assert ran[0][1] != threading.get_ident()


def test_a_job_that_raises_is_logged_and_the_writer_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    writer = Writer()

    def fails() -> None:
        raise RuntimeError("disk on fire")

    failed = writer.submit(fails)
    assert failed.join(timeout=10)
    done: list[int] = []
    assert writer.submit(done.append, 1).join(timeout=10) and done == [1]
    assert "disk on fire" in caplog.text


def test_an_idle_writer_ends_its_thread_and_the_next_job_starts_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(background.Writer, "IDLE_S", 0.05)
    writer = Writer()
    before = len(_writer_threads())
    assert writer.submit(lambda: None).join(timeout=10)
    deadline = time.monotonic() + 10
    while writer._thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert writer._thread is None and len(_writer_threads()) == before
    done: list[int] = []
    assert writer.submit(done.append, 7).join(timeout=10) and done == [7]


def test_a_job_handed_over_as_the_idle_thread_ends_still_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The race the lock closes: many submits while the thread keeps timing out; none is lost."""
    monkeypatch.setattr(background.Writer, "IDLE_S", 0.001)
    writer = Writer()
    done: list[int] = []
    for i in range(300):
        job = writer.submit(done.append, i)
        if i % 3 == 0:
            time.sleep(0.002)  # long enough for the thread to time out between some submits
        assert job.join(timeout=10), f"job {i} never ran"
    assert done == list(range(300))
