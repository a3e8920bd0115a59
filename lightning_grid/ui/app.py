"""The dashboard's web application (Starlette) and its server (uvicorn).

Security model, in short:

* Reading: on a loopback address anyone on this machine may read (like ``lightning-grid list``);
  the ``Host`` header must then name a loopback host too, so a web page elsewhere cannot reach the
  dashboard by re-pointing its own domain at 127.0.0.1 (DNS rebinding). On any other address every
  request needs the token printed at start: ``?token=``, the cookie set from it, or
  ``Authorization: Bearer``; compared in constant time.
* Writing (stopping an experiment) always needs the token, sent as ``Authorization: Bearer`` (or
  ``?token=``), never from the cookie alone: the browser would attach a cookie to a forged
  cross-site POST, but a page on another origin cannot read the token embedded in ours.
* Everything users wrote (experiment names, reasons, log lines) is escaped by Jinja2's autoescape,
  and the Content-Security-Policy allows only our own script file, so even a missed escape could
  not run a script.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import socket
import sys
from collections.abc import Collection
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import jinja2
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lightning_grid import __version__
from lightning_grid.errors import LightningGridError, UsageError
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


class _Guard:
    """Checks the Host header and the token on every request; adds the security headers."""

    def __init__(
        self, app: ASGIApp, token: str, require_token: bool, allowed_hosts: Collection[str] | None
    ) -> None:
        self.app = app
        self.token = token
        self.require_token = require_token
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
        set_cookie = False
        if self.require_token:
            query = request.query_params.get("token")
            presented = _bearer(request) or query or request.cookies.get(_cookie_name(scope))
            if presented is None:
                message = "this dashboard needs its token: open the URL that `lightning-grid ui` printed"
                await PlainTextResponse(message, status_code=401)(scope, receive, send)
                return
            if not _matches(presented, self.token):
                await PlainTextResponse("wrong token", status_code=403)(scope, receive, send)
                return
            set_cookie = query is not None
        cookie = _cookie_name(scope)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["content-security-policy"] = _CSP
                headers["x-frame-options"] = "DENY"
                headers["x-content-type-options"] = "nosniff"
                headers["referrer-policy"] = "no-referrer"  # the token may be in the URL
                headers["cache-control"] = "no-store"
                if set_cookie:
                    headers.append("set-cookie", f"{cookie}={self.token}; Path=/; HttpOnly; SameSite=Strict")
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(_HERE / "templates")),
        autoescape=True,  # every template, whatever its name: user text must never become markup
        undefined=jinja2.StrictUndefined,
    )
    env.filters["url"] = lambda value: quote(str(value), safe="")
    env.filters["usd"] = lambda value: f"${float(value):,.4f}"
    return env


def create_app(
    home: str,
    *,
    token: str,
    require_token: bool,
    allowed_hosts: Collection[str] | None = None,
    poll_interval_s: float = POLL_INTERVAL_S,
) -> Starlette:
    """The dashboard over the registry under ``home``.

    ``token`` is always needed to stop an experiment; with ``require_token`` (any address but
    loopback) it is needed for every request. ``allowed_hosts``: the ``Host`` names accepted
    (None: any), see the module docstring.
    """
    engine = Engine(home, echo=False)
    registry = engine.registry
    env = _environment()

    def render(template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        context.update(
            token=token, poll_ms=int(poll_interval_s * 1000), version=__version__, phases=PHASES,
            statuses=views.STATUSES, home=home,
        )  # fmt: skip
        return HTMLResponse(env.get_template(template).render(**context), status_code=status_code)

    def _status_filter(request: Request) -> str | None:
        wanted = request.query_params.get("status") or None
        return wanted if wanted in views.STATUSES else None

    def list_page(request: Request) -> Response:
        wanted = _status_filter(request)
        return render("list.html", rows=views.experiment_rows(registry, wanted), wanted=wanted)

    def list_fragment(request: Request) -> Response:
        wanted = _status_filter(request)
        return render("_list_table.html", rows=views.experiment_rows(registry, wanted), wanted=wanted)

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
        detail = _detail(request.path_params["name"])
        if detail is None:
            return PlainTextResponse("no such experiment", status_code=404)
        return render("_experiment_body.html", e=detail)

    def api_list(request: Request) -> Response:
        return JSONResponse(views.experiment_rows(registry, _status_filter(request)))

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
        except LightningGridError as exc:
            return JSONResponse({"error": str(exc)}, status_code=409)
        return JSONResponse({"name": row.name, "status": row.status.value, "reason": row.reason})

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
    app = Starlette(routes=routes)
    app.add_middleware(_Guard, token=token, require_token=require_token, allowed_hosts=allowed_hosts)
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
    """Bind, print where to go (with the token when it is needed), and serve until Ctrl-C."""
    out = out or sys.stdout
    loopback = is_loopback(host)
    token = secrets.token_urlsafe(24)
    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    app = create_app(
        home, token=token, require_token=not loopback, allowed_hosts=LOOPBACK_HOSTS if loopback else None
    )
    if loopback:
        lines = [f"http://{shown}:{bound}/  (registry {home}; Ctrl-C to stop)"]
    else:
        where = socket.gethostname() if host in ("0.0.0.0", "::") else shown
        lines = [
            f"listening on {shown}:{bound} (registry {home}; Ctrl-C to stop)",
            f"open http://{where}:{bound}/?token={token}",
            f"token {token}",
            "not loopback: every request needs this token; traffic is plain HTTP",
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
