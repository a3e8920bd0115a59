"""The dashboard over HTTP: the token, the Host check, escaping, stop, and the command's errors."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
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


def client(home: Path, require_token: bool, base_url: str = "http://testserver", **kwargs):
    from starlette.testclient import TestClient

    from lightning_grid.ui.app import create_app

    app = create_app(str(home), token=TOKEN, require_token=require_token, **kwargs)
    return TestClient(app, base_url=base_url)


def test_loopback_pages_read_without_a_token_and_escape_what_users_wrote(home: Path) -> None:
    c = client(home, require_token=False)
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


def test_every_request_needs_the_token_off_loopback(home: Path) -> None:
    c = client(home, require_token=True)
    for path in ("/", "/experiments/waiting", "/api/experiments", "/static/dashboard.css"):
        assert c.get(path).status_code == 401, path
        assert c.get(path, params={"token": "nope"}).status_code == 403, path
        assert c.get(path, headers={"Authorization": "Bearer nope"}).status_code == 403, path
        assert c.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200, path
    c.cookies.set("lightning_grid_token_80", "nope")
    assert c.get("/").status_code == 403
    c.cookies.clear()
    first = c.get("/", params={"token": TOKEN})
    assert first.status_code == 200
    cookie = first.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert c.get("/api/experiments").status_code == 200  # the cookie carries the token from now on


def test_stop_always_needs_the_token_and_never_takes_it_from_the_cookie(home: Path) -> None:
    c = client(home, require_token=False)
    assert c.post("/api/experiments/waiting/stop").status_code == 401
    assert c.post("/api/experiments/waiting/stop", headers={"Authorization": "Bearer x"}).status_code == 403
    # Off loopback, a cookie alone reads pages but cannot stop: a forged cross-site POST would carry it.
    guarded = client(home, require_token=True)
    assert guarded.get("/", params={"token": TOKEN}).status_code == 200
    assert guarded.post("/api/experiments/waiting/stop").status_code == 401
    registry = Registry(str(home))
    assert registry.get("waiting").status is Status.PENDING and not registry.get("waiting").stop_requested

    # With the token: exactly `lightning-grid stop` (no launcher holds it, so it is stopped at once).
    page = c.get("/experiments/waiting").text
    assert f'<meta name="lightning-grid-token" content="{TOKEN}">' in page
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

    ok = client(home, require_token=False, allowed_hosts=LOOPBACK_HOSTS, base_url="http://127.0.0.1:8765")
    assert ok.get("/").status_code == 200
    assert ok.get("/", headers={"host": "localhost:8765"}).status_code == 200
    # DNS rebinding: a page on evil.example re-pointed at 127.0.0.1 sends its own Host.
    assert ok.get("/", headers={"host": "evil.example:8765"}).status_code == 400


def _get(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
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
        assert _get(f"{base}/?token={server.token}") == 200
        assert _get(f"{base}/api/experiments", {"Authorization": f"Bearer {server.token}"}) == 200
        request = urllib.request.Request(f"{base}/api/experiments/waiting/stop", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401
    assert Registry(str(home)).get("waiting").status is Status.PENDING


def test_a_real_loopback_server_needs_no_token_to_read(home: Path) -> None:
    with ui_server(home) as server:
        assert server.url.startswith("http://127.0.0.1:") and server.token is None
        assert _get(server.url) == 200
        with urllib.request.urlopen(server.url + "api/experiments", timeout=10) as r:
            assert len(json.loads(r.read())) == 3


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
