"""``lightning-grid ui``: a local web dashboard over the experiment registry.

This module stays import-light on purpose: the CLI imports it only when ``ui`` runs, and the web
stack (Starlette, uvicorn, Jinja2) is an optional extra, imported here only inside :func:`serve`, so
that a missing extra is one clear line instead of a traceback, and the launcher never pays for it.
"""

from __future__ import annotations

from typing import IO

from lightning_grid.errors import UsageError

__all__ = ["serve", "INSTALL_HINT"]

INSTALL_HINT = "pip install 'lightning-grid[ui]'"


def serve(home: str, host: str = "127.0.0.1", port: int = 8765, out: IO[str] | None = None) -> None:
    """Serve the dashboard for the registry under ``home`` until interrupted."""
    try:
        from lightning_grid.ui.app import serve as _serve
    except ImportError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing == "lightning_grid":
            raise
        raise UsageError(
            f"the dashboard needs the 'ui' extra ({missing or exc} is not installed): {INSTALL_HINT}"
        ) from None
    _serve(home, host, port, out=out)
