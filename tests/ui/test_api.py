"""The dashboard over HTTP: the token, the Host check, escaping, stop, and the command's errors."""

from __future__ import annotations

import http.cookiejar
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from lightning_grid.launcher.experiment import Status
from lightning_grid.launcher.registry import Registry
from tests.helpers import child_env
from tests.ui.conftest import XSS, fake_experiment, require, ui_server

NAME_XSS = '<script>alert("name")</script>'
TOKEN = "s3cret-token"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    require("starlette", "uvicorn", "jinja2")
    path = tmp_path / "home"
    now = time.time()
    fake_experiment(path, "waiting", Status.PENDING, now - 300)
    fake_experiment(
        path, NAME_XSS, Status.RUNNING, now - 100, log_lines=("epoch 1", f"{XSS} from the script")
    )
    fake_experiment(path, "finished", Status.STOPPED, now - 600)
    return path


def client(home: Path, base_url: str = "http://testserver", signed_in: bool = True, **kwargs: Any) -> Any:
    """A browser-like client; ``signed_in``: it opened the printed URL (the cookie holds the token)."""
    from starlette.testclient import TestClient

    from lightning_grid.ui.app import create_app

    c = TestClient(create_app(str(home), token=TOKEN, **kwargs), base_url=base_url)
    if signed_in:
        assert c.get("/", params={"token": TOKEN}).status_code == 200
    return c


def test_pages_escape_what_users_wrote(home: Path) -> None:
    c = client(home)
    page = c.get("/")
    assert page.status_code == 200
    assert "&lt;script&gt;alert(&#34;name&#34;)&lt;/script&gt;" in page.text
    assert NAME_XSS not in page.text and "<script>alert" not in page.text
    names = [r["name"] for r in c.get("/api/experiments").json()]
    assert names == [NAME_XSS, "waiting", "finished"]  # newest first; JSON carries the raw name
    assert [r["name"] for r in c.get("/api/experiments?status=pending").json()] == ["waiting"]

    detail = c.get("/experiments/" + quote(NAME_XSS, safe=""))
    assert detail.status_code == 200
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt; from the script" in detail.text
    assert XSS not in detail.text and NAME_XSS not in detail.text
    # The only scripts on the page are our own file; the CSP forbids any other.
    assert detail.text.count("<script") == 1 and 'src="/static/dashboard.js"' in detail.text
    assert "script-src 'self'" in detail.headers["content-security-policy"]
    assert detail.headers["x-frame-options"] == "DENY"
    assert c.get("/fragments/experiments/" + quote(NAME_XSS, safe="")).text.count("&lt;script&gt;") >= 2
    assert c.get("/experiments/nobody").status_code == 404
    assert c.get("/api/experiments/nobody").status_code == 404


@pytest.mark.parametrize("allowed_hosts", [None, "loopback"])
def test_every_request_needs_the_token_on_loopback_too(home: Path, allowed_hosts: str | None) -> None:
    from lightning_grid.ui.app import LOOPBACK_HOSTS

    hosts = LOOPBACK_HOSTS if allowed_hosts else None
    c = client(home, base_url="http://127.0.0.1:8765", signed_in=False, allowed_hosts=hosts)
    for path in ("/", "/experiments/waiting", "/fragments/list", "/api/experiments", "/static/dashboard.css"):
        refused = c.get(path)
        assert refused.status_code == 401, path
        assert TOKEN not in refused.text and "open the URL that `lightning-grid ui` printed" in refused.text
        assert c.get(path, params={"token": "nope"}).status_code == 403, path
        assert c.get(path, headers={"Authorization": "Bearer nope"}).status_code == 403, path
        assert c.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200, path
    c.cookies.set("lightning_grid_token_8765", "nope")  # a cookie from an earlier start
    assert c.get("/").status_code == 403
    c.cookies.clear()

    # The printed URL: the token goes into the cookie, and out of the address bar.
    first = c.get("/experiments/waiting", params={"token": TOKEN, "x": "1"}, follow_redirects=False)
    assert first.status_code == 303 and first.headers["location"] == "/experiments/waiting?x=1"
    cookie = first.headers["set-cookie"]
    assert cookie.startswith(f"lightning_grid_token_8765={TOKEN};")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert first.headers["referrer-policy"] == "no-referrer"
    assert c.get("/api/experiments").status_code == 200  # the cookie carries the token from now on
    page = c.get("/experiments/waiting")
    assert page.status_code == 200 and f'<meta name="lightning-grid-token" content="{TOKEN}">' in page.text


def test_stop_needs_the_token_as_a_header_never_the_cookie(home: Path) -> None:
    registry = Registry(str(home))
    stranger = client(home, signed_in=False)  # another user of this machine: no token, no cookie
    assert stranger.post("/api/experiments/waiting/stop").status_code == 401
    page = stranger.get("/experiments/waiting")
    assert page.status_code == 401 and TOKEN not in page.text  # nothing to read the token from
    c = client(home)  # signed in: its cookie reads pages but cannot stop (a forged POST would carry it)
    assert c.post("/api/experiments/waiting/stop").status_code == 401
    assert c.post("/api/experiments/waiting/stop", headers={"Authorization": "Bearer x"}).status_code == 403
    assert registry.get("waiting").status is Status.PENDING and not registry.get("waiting").stop_requested

    # With the token: exactly `lightning-grid stop` (no launcher holds it, so it is stopped at once).
    stopped = c.post("/api/experiments/waiting/stop", headers={"Authorization": f"Bearer {TOKEN}"})
    assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"
    assert registry.get("waiting").status is Status.STOPPED
    assert registry.events("waiting")[-1].reason == "stopped by the user"
    again = c.post("/api/experiments/finished/stop", headers={"Authorization": f"Bearer {TOKEN}"})
    assert again.json()["status"] == "stopped"  # already ended: left as it is
    missing = c.post("/api/experiments/nobody/stop", headers={"Authorization": f"Bearer {TOKEN}"})
    assert missing.status_code == 404


def test_a_loopback_dashboard_answers_only_to_loopback_host_names(home: Path) -> None:
    from lightning_grid.ui.app import LOOPBACK_HOSTS

    ok = client(home, allowed_hosts=LOOPBACK_HOSTS, base_url="http://127.0.0.1:8765")
    assert ok.get("/").status_code == 200
    assert ok.get("/", headers={"host": "localhost:8765"}).status_code == 200
    # DNS rebinding: a page on evil.example re-pointed at 127.0.0.1 sends its own Host.
    assert ok.get("/", headers={"host": "evil.example:8765"}).status_code == 400


def test_a_poll_with_nothing_changed_does_no_work(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_grid.ui import views

    c = client(home)
    calls: list[str] = []
    rows = views.experiment_rows

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append("rows")
        return rows(*args, **kwargs)

    def no_describe(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the list must not describe every experiment")

    monkeypatch.setattr(views, "experiment_rows", counted)
    monkeypatch.setattr(views, "describe", no_describe)
    monkeypatch.setattr(Registry, "attempts", lambda *a: calls.append("attempts") or [])  # type: ignore[func-returns-value]
    registry = Registry(str(home))
    for path, shown in (
        ("/fragments/list", 3),
        ("/api/experiments", 3),
        ("/fragments/list?status=pending", 1),
    ):
        first = c.get(path)
        etag = first.headers["etag"]
        boot = etag[3:].split("-")[0]
        assert first.status_code == 200 and etag == f'W/"{boot}-{_inode(home)}-{registry.change_counter()}"'
        calls.clear()
        again = c.get(path, headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.headers["etag"] == etag and again.content == b""
        assert calls == []  # not one row read: the change counter alone answered
        assert c.get(path, headers={"If-None-Match": 'W/"other", ' + etag}).status_code == 304

        registry.note("finished", "something happened")  # any change: the next poll draws again
        changed = c.get(path, headers={"If-None-Match": etag})
        assert changed.status_code == 200 and changed.headers["etag"] != etag
        assert calls == ["rows"] + ["attempts"] * shown  # one read per experiment shown, no describe


def _inode(home: Path) -> int:
    return (home / "registry.db").stat().st_ino


def test_the_list_is_the_same_whatever_the_time_and_says_whether_to_poll(home: Path) -> None:
    from lightning_grid.ui import views

    registry = Registry(str(home))
    rows = views.experiment_rows(registry)
    time.sleep(0.01)
    assert views.experiment_rows(registry) == rows  # a 304 can stand for it until something changes
    live = {r["name"]: (r["live"], r["seconds"], r["ended"]) for r in rows}
    assert live["waiting"] == (True, None, None)  # the page counts it up from "created"
    assert live["finished"][0] is False and live["finished"][1] == 140.0
    c = client(home)
    table = c.get("/fragments/list").text
    assert 'data-live="true"' in table and table.count("data-since=") == 2  # pending and running
    ended = c.get("/fragments/list?status=stopped").text
    assert 'data-live="false"' in ended and "data-since" not in ended  # the page stops polling


def test_a_corrupt_registry_is_one_clear_error_not_a_traceback(home: Path) -> None:
    c = client(home)
    db = home / "registry.db"
    for extra in ("registry.db-wal", "registry.db-shm"):
        (home / extra).unlink(missing_ok=True)
    db.write_bytes(b"this is not a database" * 100)
    expected = f"registry corrupt: {db}"
    page = c.get("/")
    assert page.status_code == 503 and "text/html" in page.headers["content-type"]
    assert expected in page.text and "Traceback" not in page.text
    assert page.headers["content-security-policy"]  # still behind the guard's headers
    for path in ("/api/experiments", "/api/experiments/waiting"):
        answer = c.get(path)
        assert answer.status_code == 503 and answer.json()["error"].startswith(expected), path
    poll = c.get("/fragments/list", headers={"If-None-Match": 'W/"x"'})
    assert poll.status_code == 503 and poll.text.startswith(expected)
    stop = c.post("/api/experiments/waiting/stop", headers={"Authorization": f"Bearer {TOKEN}"})
    assert stop.status_code == 503 and stop.json()["error"].startswith(expected)


def _get(url: str, headers: dict[str, str] | None = None, browser: bool = False) -> int:
    """GET ``url``; ``browser``: keep cookies across the redirect, as a browser does."""
    handlers = [urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())] if browser else []
    try:
        request = urllib.request.Request(url, headers=headers or {})
        with urllib.request.build_opener(*handlers).open(request, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_a_real_server_off_loopback_prints_its_token_and_checks_it(home: Path) -> None:
    with ui_server(home, "--host", "0.0.0.0") as server:
        assert server.token, "the token must be printed when binding anything but loopback"
        port = server.url.rsplit(":", 1)[1].strip("/")
        base = f"http://127.0.0.1:{port}"
        assert _get(f"{base}/") == 401
        assert _get(f"{base}/?token=wrong") == 403
        assert _get(f"{base}/?token={server.token}") == 401  # redirected to / without the cookie
        assert _get(f"{base}/?token={server.token}", browser=True) == 200
        assert _get(f"{base}/api/experiments", {"Authorization": f"Bearer {server.token}"}) == 200
        request = urllib.request.Request(f"{base}/api/experiments/waiting/stop", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401
    assert Registry(str(home)).get("waiting").status is Status.PENDING


def test_a_real_loopback_server_prints_a_url_with_its_token_and_refuses_strangers(home: Path) -> None:
    with ui_server(home) as server:
        assert server.url.startswith("http://127.0.0.1:") and server.token
        assert _get(server.url) == 401  # another user of this machine, who never saw the terminal
        request = urllib.request.Request(server.url + "api/experiments/waiting/stop", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401
        assert _get(f"{server.url}?token={server.token}", browser=True) == 200
        bearer = {"Authorization": f"Bearer {server.token}"}
        with urllib.request.urlopen(
            urllib.request.Request(server.url + "api/experiments", headers=bearer)
        ) as r:
            assert len(json.loads(r.read())) == 3
    assert Registry(str(home)).get("waiting").status is Status.PENDING


def _cli(home: Path, *argv: str, code: str = "") -> subprocess.CompletedProcess[str]:
    program = f"import sys\n{code}\nfrom lightning_grid.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", program, *argv],
        env=child_env(LIGHTNING_GRID_HOME=str(home)),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_port_in_use_is_one_clear_line(home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _cli(home, "ui", "--port", str(port))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: port {port} on 127.0.0.1 is already in use (another dashboard?); choose another with --port"
    )


def test_without_the_extra_the_command_says_what_to_install(home: Path) -> None:
    proc = _cli(home, "ui", code="sys.modules['starlette'] = None  # as if not installed")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "pip install 'lightning-grid[ui]'" in proc.stderr and "starlette" in proc.stderr
    # The launcher never imports the web stack.
    light = subprocess.run(
        [sys.executable, "-c", "import sys, lightning_grid.cli; print(sorted(m for m in ('starlette', 'uvicorn',"
         " 'jinja2', 'lightning_grid.ui') if m in sys.modules))"],
        env=child_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert light.stdout.strip() == "[]", light.stderr
