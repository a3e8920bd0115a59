"""The supervisor side: run a script, survive preemptions, restore artifacts, relaunch.

Linux only (fcntl locks, prctl's parent-death signal, /proc): :func:`main`, the ``lightning-grid``
console script, says so in one line on any other platform. The in-process side
(:mod:`lightning_grid.resumable`) works everywhere. Names load on first use, so that importing one
submodule (``Status``, for instance) does not start the engine.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from lightning_grid._lazy import lazy_exports
from lightning_grid.errors import UsageError

if TYPE_CHECKING:
    from lightning_grid.launcher.engine import Engine
    from lightning_grid.launcher.experiment import Outcome, Status
    from lightning_grid.launcher.spec import Spec

__all__ = [
    "Engine",
    "Spec",
    "Status",
    "Outcome",
    "UnsupportedPlatformError",
    "require_supported_platform",
    "main",
]


class UnsupportedPlatformError(UsageError):
    """The launcher was asked for on a platform it cannot run on."""


def unsupported_platform_message(platform: str | None = None) -> str | None:
    """The one-line reason the launcher cannot run here, or None where it can."""
    platform = sys.platform if platform is None else platform
    if platform.startswith("linux"):
        return None
    return (
        f"lightning-grid: the launcher needs Linux (fcntl, prctl, /proc) and this is {platform}; "
        "the in-process Resumable works here: add lightning_grid.Resumable() to your Trainer and run "
        "the script directly"
    )


def require_supported_platform() -> None:
    message = unsupported_platform_message()
    if message is not None:
        raise UnsupportedPlatformError(message)


def main() -> None:
    """The ``lightning-grid`` console script: the platform check, then :func:`lightning_grid.cli.main`."""
    message = unsupported_platform_message()
    if message is not None:
        print(message, file=sys.stderr)
        sys.exit(2)
    from lightning_grid.cli import main as cli_main

    sys.exit(cli_main())


_LAZY = {
    "Engine": "lightning_grid.launcher.engine",
    "Spec": "lightning_grid.launcher.spec",
    "Status": "lightning_grid.launcher.experiment",
    "Outcome": "lightning_grid.launcher.experiment",
}


__getattr__ = lazy_exports(__name__, _LAZY, globals())
