"""The ``lightning-grid`` command line."""

from __future__ import annotations

import sys

import click

from lightning_grid import __version__

__all__ = ["main", "cli"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lightning-grid")
def cli() -> None:
    """Train PyTorch Lightning models on spot machines without losing work."""


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="lightning-grid", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return 2
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
