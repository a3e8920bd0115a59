"""The ``lightning-grid`` command line: parse, call the engine, print. Nothing else lives here."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime

import click
from rich.console import Console
from rich.table import Table

from lightning_grid import __version__
from lightning_grid.errors import LightningGridError, UsageError
from lightning_grid.launcher.agent import AgentSpec, read_events, run_agent, summarize
from lightning_grid.launcher.engine import Engine, Spec, parse_simulation
from lightning_grid.launcher.experiment import Status
from lightning_grid.launcher.report import describe

__all__ = ["main", "cli"]

_COLOURS = {
    "queued": "white", "running": "cyan", "interrupting": "yellow", "pending": "yellow",
    "restoring": "yellow", "succeeded": "green", "failed": "red", "stopped": "magenta",
}  # fmt: skip


def _console() -> Console:
    return Console(highlight=False)


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lightning-grid")
def cli() -> None:
    """Train PyTorch Lightning models on spot machines without losing work."""


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--use_spot", "--use-spot", "use_spot", is_flag=True, help="Run on interruptible capacity.")
@click.option(
    "--resumable", is_flag=True, help="The script is safe to resume: relaunch it after an interruption."
)
@click.option("--instance_type", "--instance-type", "instance_type", default="local", show_default=True)
@click.option("--name", default=None, help="Default: generated, unique, human-readable.")
@click.option("--max_restarts", "--max-restarts", "max_restarts", type=int, default=20, show_default=True)
@click.option(
    "--retries", type=int, default=0, show_default=True, help="Relaunches after a user-code failure."
)
@click.option(
    "--artifacts", default=None, help="fsspec URL of the artifact store. Default: under LIGHTNING_GRID_HOME."
)
@click.option(
    "--simulate-preemptions",
    "simulate",
    default=None,
    help="S1,S2,...: attempt k gets a notice after S_k seconds.",
)
@click.option("--grace-period", "grace_period", type=float, default=120.0, show_default=True)
@click.option(
    "--cloud",
    type=click.Choice(["none", "aws", "gcp", "azure", "auto"]),
    default="none",
    show_default=True,
    help="Watch this cloud's metadata service for spot interruption notices (auto: ask each).",
)
@click.option(
    "--every_n_train_steps",
    "--every-n-train-steps",
    "every_n_train_steps",
    type=int,
    default=None,
    help="With --resumable: also checkpoint every N optimizer steps (survives SIGKILL; no script change).",
)
@click.option(
    "--every_n_seconds",
    "--every-n-seconds",
    "every_n_seconds",
    type=float,
    default=None,
    help="With --resumable: also checkpoint every T seconds of training.",
)
@click.option("--resume", "resume", default=None, metavar="NAME", help="Continue a pending experiment.")
@click.argument("script", required=False)
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
def run(
    use_spot: bool,
    resumable: bool,
    instance_type: str,
    name: str | None,
    max_restarts: int,
    retries: int,
    artifacts: str | None,
    simulate: str | None,
    grace_period: float,
    cloud: str,
    every_n_train_steps: int | None,
    every_n_seconds: float | None,
    resume: str | None,
    script: str | None,
    script_args: tuple[str, ...],
) -> None:
    """Run SCRIPT under supervision; stays in the foreground and streams its output."""
    engine = Engine()
    if resume:
        if script:
            raise UsageError("give either --resume NAME or a SCRIPT, not both")
        row = engine.run(resume)
    else:
        if not script:
            raise UsageError("missing SCRIPT (or --resume NAME)")
        spec = Spec(
            script=script, args=list(script_args), name=name, resumable=resumable, use_spot=use_spot,
            instance_type=instance_type, max_restarts=max_restarts, retries=retries, artifacts=artifacts,
            simulate_preemptions=parse_simulation(simulate), grace_period=grace_period, cloud=cloud,
            every_n_train_steps=every_n_train_steps, every_n_seconds=every_n_seconds,
        )  # fmt: skip
        submitted = engine.submit(spec)
        engine.say(f"experiment {submitted.name} submitted")
        row = engine.run(submitted.name)
    colour = _COLOURS.get(row.status.value, "white")
    _console().print(
        f"[{colour}]{row.name}: {row.status.value}[/] ({row.reason}; restarts={row.restarts})", soft_wrap=True
    )
    if row.status is not Status.SUCCEEDED:
        raise click.exceptions.Exit(1)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option(
    "--artifacts", required=True, help="fsspec URL of the artifact store the provisioner's machines share."
)
@click.option("--name", required=True, help="The experiment: every machine that runs it uses the same name.")
@click.option("--workdir", default=".", show_default=True, help="Execution directory on this machine.")
@click.option(
    "--cloud", type=click.Choice(["none", "aws", "gcp", "azure", "auto"]), default="auto", show_default=True
)
@click.option("--grace-period", "grace_period", type=float, default=120.0, show_default=True)
@click.option(
    "--simulate-preemption", "simulate", type=float, default=None, help="A notice after this many seconds."
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def agent(
    artifacts: str,
    name: str,
    workdir: str,
    cloud: str,
    grace_period: float,
    simulate: float | None,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND on this (spot) machine: restore, watch for notices, sync; exit 0 done, 75 preempted."""
    spec = AgentSpec(list(command), artifacts, name, workdir, cloud, grace_period, simulate)
    raise click.exceptions.Exit(run_agent(spec))


@cli.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.option("--artifacts", default=None, help="Read the story an agent left in this artifact store.")
def status(name: str, as_json: bool, artifacts: str | None) -> None:
    """Lifecycle, attempts with exit codes and reasons, restarts, times, and the bill."""
    if artifacts is not None:
        summary = summarize(name, read_events(artifacts, name))
        if as_json:
            click.echo(json.dumps(summary, indent=2, default=str))
            return
        _console().print(f"[bold]{name}[/]  {summary['status']}  restarts {summary['restarts']}")
        for event in summary["events"]:
            detail = {k: v for k, v in event.items() if k not in ("time", "event")}
            _console().print(f"  {_when(event['time'])}  {event['event']}  {detail}", soft_wrap=True)
        return
    info = describe(Engine().registry, name)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    console = _console()
    colour = _COLOURS.get(info["status"], "white")
    console.print(f"[bold]{info['name']}[/]  [{colour}]{info['status']}[/]  {info['reason']}", soft_wrap=True)
    console.print(
        f"script {info['script']} {' '.join(info['args'])} · {info['instance_type']}"
        f"{' spot' if info['use_spot'] else ''}{' · resumable' if info['resumable'] else ''} · restarts {info['restarts']}",
        soft_wrap=True,
    )
    table = Table("attempt", "started", "duration", "exit", "outcome", "reason")
    for a in info["attempts"]:
        table.add_row(
            str(a["number"]),
            _when(a["started"]),
            _duration(a["seconds"]),
            str(a["exit_code"]),
            str(a["outcome"]),
            a["reason"],
        )
    console.print(table)
    for event in info["events"]:
        arrow = f"{event['from'] or ''} → {event['to']}" if event["to"] else "·"
        console.print(f"  {_when(event['time'])}  {arrow}  {event['reason']}", soft_wrap=True)
    bill = info["bill"]
    redone = "unknown (a SIGKILL)" if bill["steps_redone"] is None else str(bill["steps_redone"])
    console.print(
        f"[bold]bill[/]: {bill['attempts']} attempts · running {_duration(bill['seconds_running'])} · pending"
        f" {_duration(bill['seconds_pending'])} · saving after notices {bill['seconds_saving_after_notice']:.1f}s ·"
        f" restoring {bill['seconds_restoring']:.1f}s · steps redone {redone} · est. cost ${bill['cost_spot_usd']:.4f}"
        f" on spot vs ${bill['cost_on_demand_usd']:.4f} on demand",
        soft_wrap=True,
    )


@cli.command(name="list")
@click.option("--json", "as_json", is_flag=True)
def list_(as_json: bool) -> None:
    """All experiments, newest first."""
    registry = Engine().registry
    rows = registry.all()
    if as_json:
        click.echo(json.dumps([describe(registry, r.name) for r in rows], indent=2, default=str))
        return
    table = Table("name", "status", "instance", "spot", "restarts", "created")
    for r in rows:
        colour = _COLOURS.get(r.status.value, "white")
        table.add_row(
            r.name,
            f"[{colour}]{r.status.value}[/]",
            r.instance_type,
            "yes" if r.use_spot else "no",
            str(r.restarts),
            _when(r.created),
        )
    _console().print(table)


@cli.command()
@click.argument("name")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the experiment ends.")
def logs(name: str, follow: bool) -> None:
    """The output of every attempt, each marked."""
    registry = Engine().registry
    registry.get(name)
    shown: dict[int, int] = {}
    while True:
        for attempt in registry.attempts(name):
            if attempt.number not in shown:
                click.echo(f"──── attempt {attempt.number} · pid {attempt.pid} ────")
                shown[attempt.number] = 0
            if os.path.exists(attempt.log_path):
                with open(attempt.log_path, "rb") as handle:
                    handle.seek(shown[attempt.number])
                    chunk = handle.read()
                shown[attempt.number] += len(chunk)
                if chunk:
                    sys.stdout.write(chunk.decode(errors="replace"))
                    sys.stdout.flush()
        if (
            not follow
            or registry.get(name).status.is_terminal()
            or registry.get(name).status is Status.PENDING
        ):
            # A pending experiment has no launcher writing to it: following would wait forever.
            final = registry.attempts(name)
            if follow or final:
                last = final[-1] if final else None
                if last is not None and last.outcome:
                    click.echo(f"──── attempt {last.number} ended: {last.outcome} ────")
            return
        time.sleep(0.5)


@cli.command()
@click.argument("name")
def stop(name: str) -> None:
    """Stop an experiment (its script gets SIGTERM, then SIGKILL after the grace period)."""
    row = Engine().stop(name)
    click.echo(f"{row.name}: {row.status.value}")


@cli.command()
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Any address but loopback needs the printed token."
)
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="0: any free port."
)
def ui(host: str, port: int) -> None:
    """A web dashboard over the registry: experiments, timelines, logs, a stop button (extra: ui)."""
    from lightning_grid.contract import default_home
    from lightning_grid.ui import serve  # lazily: the web stack is an optional extra

    serve(default_home(), host, port)


def main(argv: list[str] | None = None) -> int:
    try:
        result = cli.main(args=argv, prog_name="lightning-grid", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return 2
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 130
    except UsageError as exc:
        click.echo(f"error: {exc}", err=True)
        return 2
    except LightningGridError as exc:
        click.echo(f"error: {exc}", err=True)
        return 1
    # Without standalone mode click returns an Exit's code instead of raising it.
    return result if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
