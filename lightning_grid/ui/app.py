"""The dashboard's web application (Starlette) and its server (uvicorn).

Threat model (docs/dashboard.md, "Threat model"): the dashboard acts with the authority of the user
who started it, over a registry only that user can read (LIGHTNING_GRID_HOME is mode 0700). Anyone
else who can open a connection to its port (another user of this machine, a web page in any browser
tab, a machine on the network when bound elsewhere) is a stranger until they present the token,
which is random, new at every start, and printed only to the terminal that started it.

* Every request needs the token, on loopback too: ``Authorization: Bearer``, ``?token=``, or the
  cookie set from ``?token=`` (HttpOnly, SameSite=Strict, one name per port); compared in constant
  time. Opening the printed URL sets the cookie and redirects to the same page without the token.
* Stopping an experiment (the only write) needs the token as ``Authorization: Bearer`` (or
  ``?token=``), never from the cookie alone: the token is in the page for its own Stop button, so
  only a visitor who presented it can read it, and a page on another origin can neither read ours
  nor send that header across origins (no CORS), while a browser might attach a cookie to a forged
  cross-site request (SameSite=Strict already stops that; the header rule does not depend on it).
* On loopback the ``Host`` header must name a loopback host, which shuts out DNS rebinding.
* Everything users wrote (experiment names, reasons, log lines) is escaped by Jinja2's autoescape,
  and the Content-Security-Policy allows only our own script file, so even a missed escape could
  not run a script.

Polling is cheap: the list's table answers ``304 Not Modified`` to ``If-None-Match`` while the
registry's change counter has not moved (a weak ETag built from it); nothing in that table depends
on the time of the request (the page counts a live experiment's duration up itself).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import socket
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, urlencode

import jinja2
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lightning_grid import __version__
from lightning_grid.errors import LightningGridError, RegistryError, UsageError
from lightning_grid.launcher.engine import Engine
from lightning_grid.ui import views
from lightning_grid.ui.timeline import PHASES

__all__ = ["create_app", "serve", "is_loopback", "LOOPBACK_HOSTS"]

_HERE = Path(__file__).resolve().parent
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
#: Seconds between two refreshes of a page in the browser.
POLL_INTERVAL_S = 1.0
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:;"
    " connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def is_loopback(host: str) -> bool:
    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _cookie_name(scope: Scope) -> str:
    # Cookies ignore ports: two dashboards on one host must not overwrite each other's token.
    server = scope.get("server") or ("", 0)
    return f"lightning_grid_token_{server[1] or 0}"


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _matches(presented: str | None, token: str) -> bool:
    return presented is not None and hmac.compare_digest(presented.encode(), token.encode())


_NO_TOKEN = (
    "this dashboard needs its token: open the URL that `lightning-grid ui` printed"
    " (http://HOST:PORT/?token=...); scripts send `Authorization: Bearer TOKEN`"
)
_WRONG_TOKEN = (
    "wrong token (a new one is made at every start: open the URL that `lightning-grid ui` printed last)"
)


class _Guard:
    """Checks the Host header and the token on every request; adds the security headers."""

    def __init__(self, app: ASGIApp, token: str, allowed_hosts: Collection[str] | None) -> None:
        self.app = app
        self.token = token
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if self.allowed_hosts is not None:
            host = request.headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in self.allowed_hosts:
                await PlainTextResponse("invalid Host header", status_code=400)(scope, receive, send)
                return
        cookie = _cookie_name(scope)
        query = request.query_params.get("token")
        presented = _bearer(request) or query or request.cookies.get(cookie)
        if presented is None:
            await PlainTextResponse(_NO_TOKEN, status_code=401)(scope, receive, send)
            return
        if not _matches(presented, self.token):
            await PlainTextResponse(_WRONG_TOKEN, status_code=403)(scope, receive, send)
            return
        set_cookie = (
            f"{cookie}={self.token}; Path=/; HttpOnly; SameSite=Strict" if query is not None else None
        )
        path = scope["path"]
        if set_cookie and request.method == "GET" and not path.startswith(("/api/", "/static/")):
            # A page opened from the printed URL: keep the token in the cookie, not in the address
            # bar (where a screen share or a bookmark would show it).
            rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            target = quote(path) + ("?" + urlencode(rest) if rest else "")
            response: Response = RedirectResponse(target, status_code=303)
            response.headers.append("set-cookie", set_cookie)
            await self._with_headers(response, scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                _security_headers(headers)
                if set_cookie:
                    headers.append("set-cookie", set_cookie)
            await send(message)

        await self.app(scope, receive, send_with_headers)

    @staticmethod
    async def _with_headers(response: Response, scope: Scope, receive: Receive, send: Send) -> None:
        _security_headers(response.headers)
        await response(scope, receive, send)


def _security_headers(headers: MutableHeaders) -> None:
    headers["content-security-policy"] = _CSP
    headers["x-frame-options"] = "DENY"
    headers["x-content-type-options"] = "nosniff"
    headers["referrer-policy"] = "no-referrer"  # the token may be in the URL
    headers["cache-control"] = "no-store"  # pages carry the token; JS revalidates with If-None-Match


def _fresh(request: Request, etag: str) -> bool:
    """Whether the client's copy (``If-None-Match``) is still current: weak comparison, RFC 9110."""
    wanted = request.headers.get("if-none-match")
    if not wanted:
        return False
    tags = [t.strip().removeprefix("W/") for t in wanted.split(",")]
    return "*" in tags or etag.removeprefix("W/") in tags


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(_HERE / "templates")),
        autoescape=True,  # every template, whatever its name: user text must never become markup
        undefined=jinja2.StrictUndefined,
    )
    env.filters["url"] = lambda value: quote(str(value), safe="")
    env.filters["usd"] = lambda value: f"${float(value):,.4f}"
    env.filters["duration"] = views.format_duration
    return env


def create_app(
    home: str,
    *,
    token: str,
    allowed_hosts: Collection[str] | None = None,
    poll_interval_s: float = POLL_INTERVAL_S,
) -> Starlette:
    """The dashboard over the registry under ``home``.

    ``token`` is needed for every request, and as a header (never the cookie) to stop an
    experiment. ``allowed_hosts``: the ``Host`` names accepted (None: any); see the module docstring.
    """
    engine = Engine(home, echo=False)
    registry = engine.registry
    env = _environment()
    boot = secrets.token_hex(4)  # a restarted server (new templates, say) never matches an old ETag

    def render(template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        context.update(
            token=token, poll_ms=int(poll_interval_s * 1000), version=__version__, phases=PHASES,
            statuses=views.STATUSES, home=home, now=time.time(),
        )  # fmt: skip
        return HTMLResponse(env.get_template(template).render(**context), status_code=status_code)

    def _status_filter(request: Request) -> str | None:
        wanted = request.query_params.get("status") or None
        return wanted if wanted in views.STATUSES else None

    def _registry_etag() -> str:
        """Changes whenever the registry does: its change counter, and the file itself (a registry
        moved aside and started afresh counts from 0 again). One query and one stat."""
        try:
            inode = os.stat(registry.path).st_ino
        except OSError:
            inode = 0  # gone: the counter's query below says what is wrong
        return f'W/"{boot}-{inode}-{registry.change_counter()}"'

    def _list(request: Request, answer: Any) -> Response:
        # The tag is read before the rows: a write in between makes the next poll a 200 again, never
        # a 304 over rows older than the tag says.
        etag = _registry_etag()
        if _fresh(request, etag):
            return Response(status_code=304, headers={"etag": etag})
        response: Response = answer(views.experiment_rows(registry, _status_filter(request)))
        response.headers["etag"] = etag
        return response

    def list_page(request: Request) -> Response:
        wanted = _status_filter(request)
        return render("list.html", rows=views.experiment_rows(registry, wanted), wanted=wanted)

    def list_fragment(request: Request) -> Response:
        wanted = _status_filter(request)
        return _list(request, lambda rows: render("_list_table.html", rows=rows, wanted=wanted))

    def _detail(name: str) -> dict[str, Any] | None:
        try:
            return views.experiment_detail(registry, name)
        except UsageError:
            return None

    def experiment_page(request: Request) -> Response:
        name = request.path_params["name"]
        detail = _detail(name)
        if detail is None:
            return render("missing.html", status_code=404, name=name)
        return render("experiment.html", e=detail)

    def experiment_fragment(request: Request) -> Response:
        # Drawn at every request: a live timeline grows with the clock, and the logs and stores it
        # shows change without the registry knowing. One experiment, polled only while it is live.
        detail = _detail(request.path_params["name"])
        if detail is None:
            return PlainTextResponse("no such experiment", status_code=404)
        return render("_experiment_body.html", e=detail)

    def api_list(request: Request) -> Response:
        return _list(request, JSONResponse)

    def api_experiment(request: Request) -> Response:
        detail = _detail(request.path_params["name"])
        if detail is None:
            return JSONResponse({"error": "no such experiment"}, status_code=404)
        return JSONResponse(detail)

    async def api_stop(request: Request) -> Response:
        # Never the cookie: a cross-site form would carry it. Only what our own page's script sends.
        presented = _bearer(request) or request.query_params.get("token")
        if presented is None:
            return JSONResponse(
                {"error": "stopping needs the token (Authorization: Bearer)"}, status_code=401
            )
        if not _matches(presented, token):
            return JSONResponse({"error": "wrong token"}, status_code=403)
        name = request.path_params["name"]
        try:
            # Exactly `lightning-grid stop`: request it; finish it ourselves if no launcher holds the
            # experiment, else wait (in a worker thread) for its launcher to stop the script.
            row = await run_in_threadpool(engine.stop, name)
        except UsageError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        except RegistryError:
            raise
        except LightningGridError as exc:
            return JSONResponse({"error": str(exc)}, status_code=409)
        return JSONResponse({"name": row.name, "status": row.status.value, "reason": row.reason})

    async def registry_error(request: Request, exc: Exception) -> Response:
        """A registry that cannot be read (corrupt, say) is one clear sentence, not a traceback."""
        message = str(exc)
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, status_code=503)
        if request.url.path.startswith("/fragments/"):
            return PlainTextResponse(message, status_code=503)
        return render("error.html", status_code=503, message=message)

    routes = [
        Route("/", list_page),
        Route("/fragments/list", list_fragment),
        Route("/experiments/{name:path}", experiment_page),
        Route("/fragments/experiments/{name:path}", experiment_fragment),
        Route("/api/experiments", api_list),
        Route("/api/experiments/{name:path}/stop", api_stop, methods=["POST"]),
        Route("/api/experiments/{name:path}", api_experiment),
        Mount("/static", StaticFiles(directory=str(_HERE / "static")), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={RegistryError: registry_error})
    app.add_middleware(_Guard, token=token, allowed_hosts=allowed_hosts)
    return app


def _bind(host: str, port: int) -> socket.socket:
    """Bind before starting uvicorn, so a taken port is one clear line, not a server's traceback."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"cannot bind the dashboard to {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == 98 or "in use" in str(exc).lower():
            raise UsageError(
                f"port {port} on {host} is already in use (another dashboard?); choose another with --port"
            ) from None
        raise UsageError(f"cannot bind the dashboard to {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)  # connections queue from now on: the URL printed next works at once
    return sock


def serve(home: str, host: str, port: int, out: IO[str] | None = None) -> None:
    """Bind, print where to go (the URL with the token), and serve until Ctrl-C."""
    out = out or sys.stdout
    loopback = is_loopback(host)
    token = secrets.token_urlsafe(24)
    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    app = create_app(home, token=token, allowed_hosts=LOOPBACK_HOSTS if loopback else None)
    if loopback:
        lines = [
            f"http://{shown}:{bound}/?token={token}  (registry {home}; Ctrl-C to stop)",
            "open that URL: every request needs its token, on loopback too (see docs/dashboard.md)",
        ]
    else:
        where = socket.gethostname() if host in ("0.0.0.0", "::") else shown
        lines = [
            f"listening on {shown}:{bound} (registry {home}; Ctrl-C to stop)",
            f"open http://{where}:{bound}/?token={token}",
            f"token {token}",
            "not loopback: traffic is plain HTTP; on an untrusted network use an SSH tunnel",
        ]
    out.write("".join(f"lightning-grid ui: {line}\n" for line in lines))
    out.flush()
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=2
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
