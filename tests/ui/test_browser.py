"""The dashboard as a person uses it: Debian's chromium, driven by Playwright, against a real
``lightning-grid ui`` over a registry that real launchers wrote (plus, through the registry's API,
the in-between statuses no launcher stays in long enough to photograph)."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lightning_grid.launcher.experiment import Status
from lightning_grid.launcher.registry import Registry
from tests.ui.conftest import (
    CHROMIUM,
    COUNTER,
    CRASH,
    XSS,
    fake_experiment,
    launch,
    require,
    save_screenshot,
    script,
    ui_server,
    wait_for_line,
)

# What the user sees: one colour per status (the CLI's: cyan running, yellow-ish in between, green,
# red, magenta), as the browser computed it from the stylesheet.
COLOURS = {
    "queued": "rgb(152, 162, 179)",
    "running": "rgb(8, 145, 178)",
    "interrupting": "rgb(217, 119, 6)",
    "pending": "rgb(234, 179, 8)",
    "restoring": "rgb(124, 58, 237)",
    "succeeded": "rgb(22, 163, 74)",
    "failed": "rgb(220, 38, 38)",
    "stopped": "rgb(192, 38, 211)",
}


@pytest.fixture
def browser() -> Iterator[Any]:
    require("playwright", "starlette", "uvicorn", "jinja2", browser=True)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--headless=new", "--disable-gpu"]
        )
        yield chromium
        chromium.close()


def _page(browser: Any) -> Any:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.errors = errors
    return page


def _sign_in(page: Any, server: Any) -> None:
    """Open the URL ``lightning-grid ui`` printed: its token goes into a cookie for this browser."""
    assert server.token, "the dashboard prints its URL with the token"
    page.goto(f"{server.url}?token={server.token}")
    assert page.url == server.url  # redirected: the token is not left in the address bar


def _finish(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    out, err = proc.communicate(timeout=timeout)
    return out + err


@pytest.fixture
def every_status(tmp_path: Path) -> Iterator[Path]:
    """A registry with an experiment in every status; the ended and running ones are real runs."""
    home = tmp_path / "home"
    counter = script(tmp_path / "project", "counter.py", COUNTER)
    crash = script(tmp_path / "broken", "crash.py", CRASH)
    twice = launch(
        home, "run", "--use-spot", "--resumable", "--instance-type", "g4dn.xlarge", "--name", "preempted-twice",
        "--simulate-preemptions", "1.5,1.5", str(counter), "40",
    )  # fmt: skip
    crashed = launch(home, "run", "--instance-type", "g4dn.xlarge", "--name", "crashed", str(crash))
    now = time.time()
    fake_experiment(home, "queued-next", Status.QUEUED, now - 30)
    fake_experiment(home, "notice-received", Status.INTERRUPTING, now - 200)
    fake_experiment(home, "waiting-for-capacity", Status.PENDING, now - 400)
    fake_experiment(home, "restoring-now", Status.RESTORING, now - 600)
    fake_experiment(home, "stopped-by-user", Status.STOPPED, now - 900)
    assert twice.wait(timeout=120) == 0, _finish(twice)
    assert crashed.wait(timeout=60) == 1, _finish(crashed)
    running = launch(
        home, "run", "--instance-type", "g4dn.xlarge", "--name", "training", str(counter), "100000"
    )
    wait_for_line(running, "starts at")
    try:
        yield home
    finally:
        running.terminate()  # the launcher passes it on: the script saves, the experiment waits
        _finish(running)


def test_every_status_in_colour_and_a_twice_preempted_timeline(
    browser: Any, every_status: Path, tmp_path: Path
) -> None:
    page = _page(browser)
    with ui_server(every_status) as server:
        _sign_in(page, server)
        rows = page.locator("tr.experiment")
        assert rows.count() == 8
        seen = {}
        for i in range(8):
            badge = rows.nth(i).locator(".badge")
            seen[badge.inner_text()] = badge.evaluate("e => getComputedStyle(e).backgroundColor")
        assert seen == COLOURS
        assert rows.first.get_attribute("data-name") == "training"  # newest first
        names = [rows.nth(i).get_attribute("data-name") for i in range(8)]
        assert names.index("preempted-twice") < names.index("queued-next") < names.index("stopped-by-user")
        twice = page.locator('tr[data-name="preempted-twice"] td')
        assert [twice.nth(i).inner_text() for i in (2, 3, 4, 5)] == ["g4dn.xlarge", "yes", "3", "2"]
        assert re.fullmatch(r"\$0\.\d{4}", twice.nth(8).inner_text())
        save_screenshot(page, tmp_path, "dashboard-list.png", docs=True)

        page.click('.filters a[data-status="failed"]')
        page.wait_for_url(re.compile(r"status=failed"))
        assert [r.get_attribute("data-name") for r in page.locator("tr.experiment").all()] == ["crashed"]

        page.goto(server.url + "experiments/preempted-twice")
        lanes = page.locator(".timeline .lane")
        assert [lane.get_attribute("data-attempt") for lane in lanes.all()] == ["1", "2", "3"]
        assert [o.inner_text() for o in page.locator(".lane .outcome").all()] == [
            "preempted",
            "preempted",
            "succeeded",
        ]
        boxes = [lane.locator('.seg[data-phase="running"]').bounding_box() for lane in lanes.all()]
        assert all(b is not None and b["width"] > 50 for b in boxes)  # each attempt ran ~1.5 s of ~5 s
        assert boxes[0]["x"] < boxes[1]["x"] < boxes[2]["x"]  # one time axis: later attempts further right
        for number in ("1", "2"):
            lane = page.locator(f'.lane[data-attempt="{number}"]')
            assert lane.locator(".marker-notice").count() == 1 and lane.locator(".marker-exit").count() == 1
            assert lane.locator('.seg[data-phase="saving"]').count() == 1
        marks = page.locator(".marks").first.inner_text()
        assert "notice from simulator: simulated spot interruption after 1.5s" in marks
        assert re.search(r"exit 0: preempted; checkpoint at step \d+", marks)
        assert page.locator('.lane[data-attempt="2"] .seg[data-phase="restoring"]').count() == 1
        assert page.locator("#status").inner_text() == "succeeded"
        assert (
            page.locator("#status").evaluate("e => getComputedStyle(e).backgroundColor")
            == COLOURS["succeeded"]
        )

        bill = page.locator(".bill").inner_text()
        assert "3 (2 after preemptions)" in bill and "steps redone\t0" in bill and "on spot vs" in bill
        committed = page.locator(".checkpoints tr.committed")
        assert committed.count() >= 4
        assert page.locator(".checkpoints tr.uncommitted").count() == 1
        assert "not committed" in page.locator(".checkpoints tr.uncommitted").inner_text()
        assert "counter.py" in page.locator(".artifacts").inner_text()
        assert "progress.txt" in page.locator(".artifacts").inner_text()

        # A log line with a script tag is text on the page, and nothing ran.
        log = page.locator('details.log[data-attempt="3"] pre')
        assert f"{XSS} is only text" in log.inner_text() and "finished 40" in log.inner_text()
        assert log.locator("script").count() == 0
        assert page.evaluate("window.__pwned") is None
        save_screenshot(page, tmp_path, "dashboard-experiment.png", docs=True)

        page.goto(server.url + "experiments/waiting-for-capacity")
        assert [lane.get_attribute("data-attempt") for lane in page.locator(".timeline .lane").all()] == [
            "1",
            "2",
        ]
        assert page.locator('.lane.waiting .seg[data-phase="pending"]').count() == 1
        save_screenshot(page, tmp_path, "dashboard-pending.png")
    assert not page.errors, page.errors


def test_a_preemption_shows_up_live_and_the_stop_button_stops(browser: Any, tmp_path: Path) -> None:
    home = tmp_path / "home"
    counter = script(tmp_path / "project", "counter.py", COUNTER)
    run = launch(
        home, "run", "--use-spot", "--resumable", "--instance-type", "p3.2xlarge", "--name", "live",
        "--simulate-preemptions", "12", str(counter), "100000",
    )  # fmt: skip  # the notice comes after the page is open, even with a slow UI start
    try:
        page = _page(browser)
        with ui_server(home) as server:
            deadline = time.monotonic() + 30
            while not Registry(str(home)).attempts("live") and time.monotonic() < deadline:
                time.sleep(0.1)
            _sign_in(page, server)
            page.goto(server.url + "experiments/live")
            page.evaluate("window.__sameDocument = true")  # gone if the page were reloaded
            assert page.locator("#status").inner_text() in ("running", "interrupting")
            assert page.locator(".timeline .lane").count() == 1

            # The simulated notice comes; attempt 2 appears on the open page, without a reload.
            page.locator('.lane[data-attempt="2"]:not(.waiting)').wait_for(timeout=60_000)
            first = page.locator('.lane[data-attempt="1"]')
            assert first.locator(".outcome").inner_text() == "preempted"
            assert first.locator(".marker-notice").count() == 1
            # Attempt 2 shows from its start (restoring); the page follows it to running on its own.
            page.locator("#status", has_text="running").wait_for(timeout=60_000)
            assert page.locator("#status").inner_text() == "running"
            assert page.evaluate("window.__sameDocument") is True
            page.locator('details.log[data-attempt="2"] pre').filter(
                has_text="attempt 2 starts at"
            ).wait_for()
            save_screenshot(page, tmp_path, "dashboard-live.png")

            page.once("dialog", lambda dialog: dialog.accept())
            page.click("button.stop")
            page.locator("#status", has_text="stopped").wait_for(timeout=30_000)
            assert page.evaluate("window.__sameDocument") is True
            assert page.locator("button.stop").count() == 0  # nothing left to stop
            save_screenshot(page, tmp_path, "dashboard-stopped.png")
        assert run.wait(timeout=30) == 1  # the launcher ends: its experiment did not succeed
        registry = Registry(str(home))
        assert registry.get("live").status is Status.STOPPED
        assert registry.attempts("live")[-1].outcome == "stopped"
        assert not page.errors, page.errors
    finally:
        if run.poll() is None:
            run.kill()
        _finish(run)


def test_the_list_polls_cheaply_and_only_while_something_is_live(browser: Any, tmp_path: Path) -> None:
    home = tmp_path / "home"
    now = time.time()
    fake_experiment(home, "long-ago", Status.STOPPED, now - 5000)
    fake_experiment(home, "waiting", Status.PENDING, now - 90)
    page = _page(browser)
    polls: list[tuple[int, str | None]] = []
    page.on(
        "response",
        lambda r: (
            polls.append((r.status, r.request.header_value("if-none-match")))
            if "/fragments/list" in r.url
            else None
        ),
    )
    with ui_server(home) as server:
        stranger = browser.new_page()  # another user: no token, so no page, no token, no Stop
        response = stranger.goto(server.url)
        assert response is not None and response.status == 401
        assert server.token not in stranger.content()
        stranger.close()

        _sign_in(page, server)
        duration = page.locator('tr[data-name="waiting"] td.duration')
        first = duration.inner_text()
        assert re.fullmatch(r"\dm\d\ds", first), first
        # Nothing changes in the registry: the server answers 304, the page counts the duration up.
        page.wait_for_function("() => document.querySelector('tr[data-name=waiting] td.duration')"
                               f".textContent !== {first!r}")  # fmt: skip
        with page.expect_response(lambda r: "/fragments/list" in r.url and r.status == 304):
            pass
        assert all(tag for status, tag in polls if status == 304)  # each poll sent its ETag back
        assert page.locator('tr[data-name="waiting"] td.duration').inner_text() != first

        # A change: the next poll draws the table again, and with nothing live any more, stops.
        Registry(str(home)).transition("waiting", Status.STOPPED, "stopped by the user")
        page.locator('tr[data-name="waiting"][data-status="stopped"]').wait_for()
        assert page.locator("td.duration[data-since]").count() == 0
        assert page.locator("#live .fragment").get_attribute("data-live") == "false"
        seen = len(polls)
        page.wait_for_timeout(5000)  # more than two polling intervals: none came
        assert len(polls) == seen
    assert not page.errors, page.errors
