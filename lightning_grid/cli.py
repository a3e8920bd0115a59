"""The ``lightning-grid`` command line: parse, call the engine, print. Nothing else lives here.

``run``'s and ``agent``'s experiment options are generated from :func:`lightning_grid.launcher.spec.options`:
a new :class:`~lightning_grid.launcher.spec.Spec` field is a new option here with no edit to this file.

Every user error is one line on stderr (``error: ...``) and exit code 2, checked before anything is
written. Text a user or a script controls (names, arguments, reasons) is printed with rich's markup
off and control characters escaped: a ``[/]`` in an argument cannot crash ``status``, an escape
sequence cannot repaint the terminal.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from datetime import datetime
from typing import IO, Any

import click
from click.core import ParameterSource
from rich.console import Console
from rich.table import Table
from rich.text import Text

from lightning_grid import __version__
from lightning_grid.errors import LightningGridError, UsageError
from lightning_grid.launcher.agent import AgentSpec, read_events, run_agent, summarize
from lightning_grid.launcher.engine import Engine
from lightning_grid.launcher.experiment import Status
from lightning_grid.launcher.notices import LauncherSignals
from lightning_grid.launcher.report import describe
from lightning_grid.launcher.spec import Spec, options, parse_capacity, parse_simulation, validate_name

__all__ = ["main", "cli"]

_COLOURS = {
    "queued": "white", "running": "cyan", "interrupting": "yellow", "pending": "yellow",
    "restoring": "yellow", "succeeded": "green", "failed": "red", "stopped": "magenta",
}  # fmt: skip
_CHUNK = 1 << 20  # the most bytes of a log held at once by ``logs``
_EXIT_KILLED = 130  # a second Ctrl-C: the shell's code for "ended by SIGINT"


# -- printing user-controlled text -------------------------------------------------------------------
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _safe(text: object) -> str:
    """``text`` on one line with nothing a terminal would act on: control characters, newlines,
    escape sequences and undecodable bytes (surrogates) come out as backslash escapes."""
    return "".join(c if c.isprintable() else _escape_char(c) for c in str(text))


def _console() -> Console:
    # markup off: nothing we print is parsed for [tags]; styles come only from Text objects.
    return Console(highlight=False, markup=False, emoji=False)


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _status_text(status: str) -> Text:
    return Text(status, style=_COLOURS.get(status, "white"))


# -- parameter types -----------------------------------------------------------------------------------
class _Text(click.ParamType):
    """A name, URL, path or host: not empty, no control characters (a newline in a name would be a
    second line in every listing, an escape sequence a repainted terminal)."""

    name = "text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        if not value.strip():
            self.fail("must not be empty", param, ctx)
        if not value.isprintable():
            self.fail(f"must not contain control characters, got {value!r}", param, ctx)
        return value


_TEXT = _Text()
_TYPES: dict[type, click.ParamType] = {int: click.INT, float: click.FLOAT, str: _TEXT}


def _spec_options(
    for_agent: bool = False, defaults: dict[str, Any] | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command with one click option per Spec field (:func:`spec.options`): the flags,
    type, default and help all come from the field. Ranges, nan and inf are :meth:`Spec.validated`'s."""
    overrides = defaults or {}

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        for info in reversed(options(for_agent=for_agent)):
            default = overrides.get(info.name, info.default)
            decls = [*info.flags, info.name]
            if info.is_flag:
                option = click.option(*decls, is_flag=True, default=bool(default), help=info.help)
            else:
                kind = click.Choice(info.choices) if info.choices else _TYPES.get(info.kind, _TEXT)
                option = click.option(
                    *decls,
                    type=kind,
                    default=default,
                    show_default=default is not None,
                    metavar=info.metavar,
                    help=info.help,
                )
            function = option(function)
        return function

    return decorate


def _build_spec(values: dict[str, Any], **fixed: Any) -> Spec:
    """A checked Spec from the generated options' values: every rule of :meth:`Spec.validated`
    applies before the engine, the registry or the disk see anything."""
    values = dict(values)
    simulated = values.pop("simulate_preemptions", None)
    seconds, nodes = parse_simulation(simulated)
    capacity = parse_capacity(values.pop("simulate_capacity", None))
    return Spec(
        simulate_preemptions=seconds, simulate_nodes=nodes, simulate_capacity=capacity, **values, **fixed
    ).validated()


def _changed_names(ctx: click.Context, names: Iterable[str]) -> set[str]:
    """The parameter names among ``names`` given on the command line (or by environment)."""
    return {
        name
        for name in names
        if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None)
    }


def _changed(ctx: click.Context, names: Iterable[str]) -> list[str]:
    """The options among ``names`` given on the command line (or by environment), as spelled there."""
    given = []
    for param in ctx.command.params:
        if (
            param.name is not None
            and param.name in names
            and ctx.get_parameter_source(param.name)
            not in (
                ParameterSource.DEFAULT,
                ParameterSource.DEFAULT_MAP,
                None,
            )
        ):
            given.append(param.opts[-1])
    return given


# -- the commands --------------------------------------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="lightning-grid", help="Show the version.")
def cli() -> None:
    """Train PyTorch Lightning models on spot machines without losing work."""


_SPEC_NAMES = frozenset(info.name for info in options())
#: What a resumed experiment may change: how many machines and processes it runs on.
_CAPACITY = frozenset(f.name for f in fields(Spec) if f.metadata.get("capacity"))


# No ignore_unknown_options: a mistyped option before SCRIPT is click's "No such option". No
# interspersed arguments: everything after SCRIPT is the script's, passed through untouched.
@cli.command(context_settings={"allow_interspersed_args": False})
@_spec_options()
@click.option(
    "--resume",
    default=None,
    type=_TEXT,
    metavar="NAME",
    help="Continue a queued or pending experiment (or a failed one, from its committed checkpoints).",
)
@click.option(
    "-d",
    "--detach",
    is_flag=True,
    help="Submit, print the name and return; a launcher in the background supervises it.",
)
@click.option(
    "--no_echo",
    "--no-echo",
    "no_echo",
    is_flag=True,
    hidden=True,
    help="Do not copy the script's output to this terminal (the background launcher's mode).",
)
@click.argument("script", required=False)
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run(
    ctx: click.Context,
    resume: str | None,
    detach: bool,
    no_echo: bool,
    script: str | None,
    script_args: tuple[str, ...],
    **values: Any,
) -> None:
    """Run SCRIPT under supervision; stays in the foreground and streams its output.

    Ctrl-C stops in order (the script saves and exits; the experiment stays pending); a second
    Ctrl-C kills the script at once (exit 130; its last committed checkpoint stays).
    """
    LauncherSignals.latest = None
    if resume is not None:
        if script:
            raise UsageError("give either --resume NAME or a SCRIPT, not both")
        given = _changed(ctx, _SPEC_NAMES - _CAPACITY)
        if given:
            raise UsageError(
                f"--resume continues {_safe(resume)} as it was submitted; {given[0]} cannot change it"
                " (only --num-nodes, --nproc-per-node and --min-nodes can: capacity may come back different)"
            )
        validate_name(resume)
        engine = Engine(echo=not no_echo)
        row = engine.registry.get(resume)  # an unknown name: no lock, no file
        if row.status.is_terminal() and row.status is not Status.FAILED:  # a failed one may continue
            raise UsageError(f"experiment {resume!r} has already ended ({row.status.value})")
        resized = {k: values[k] for k in _CAPACITY if k in _changed_names(ctx, _CAPACITY)}
        if resized:
            spec = row.spec.with_(**resized).validated()
            changes = row.spec.capacity_changes(spec)
            if changes:
                what = ", ".join(f"{k}={v}" for k, v in sorted(changes.items()))
                engine.registry.update_spec(resume, spec, f"resumed with a new capacity: {what}")
        name = resume
    else:
        if not script:
            raise UsageError("missing SCRIPT (or --resume NAME)")
        spec = _build_spec(values, script=script, args=tuple(script_args))
        engine = Engine(echo=not no_echo)
        name = engine.submit(spec).name
        engine.say(f"experiment {name} submitted")
    if detach:
        pid, log_path = _detach(engine.home, name)
        click.echo(name)
        engine.say(
            f"{name} is supervised in the background (launcher pid {pid}, its messages in {log_path});"
            f" follow it: lightning-grid logs {name} --follow; stop it: lightning-grid stop {name}"
        )
        return
    row = engine.run(name)
    _console().print(
        Text.assemble(
            (f"{_safe(row.name)}: {row.status.value}", _COLOURS.get(row.status.value, "white")),
            f" ({_safe(row.reason)}; restarts={row.restarts})",
        ),
        soft_wrap=True,
    )
    signals = LauncherSignals.latest
    if signals is not None and signals.escalated:
        raise click.exceptions.Exit(_EXIT_KILLED)
    if row.status is not Status.SUCCEEDED:
        raise click.exceptions.Exit(1)


def _detach(home: str, name: str) -> tuple[int, str]:
    """Start ``run --resume NAME`` as a launcher of its own: a new session (no terminal, so no SIGHUP
    when it closes), stdin from /dev/null, its messages appended to ``runs/NAME/launcher.log``."""
    folder = os.path.join(home, "runs", name)
    os.makedirs(folder, exist_ok=True)
    log_path = os.path.join(folder, "launcher.log")
    command = [sys.executable, "-m", "lightning_grid.cli", "run", "--resume", name, "--no-echo"]
    env = dict(os.environ, LIGHTNING_GRID_HOME=home)
    with open(os.devnull, "rb") as devnull, open(log_path, "ab") as out:
        proc = subprocess.Popen(
            command, stdin=devnull, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    proc.returncode = 0  # never waited for here: it outlives us by design
    return proc.pid, log_path


@cli.command(context_settings={"allow_interspersed_args": False})
@_spec_options(for_agent=True, defaults={"cloud": "auto"})
@click.option(
    "--artifacts",
    required=True,
    type=_TEXT,
    metavar="URL",
    help="fsspec URL of the artifact store the provisioner's machines share.",
)
@click.option(
    "--name",
    required=True,
    type=_TEXT,
    metavar="NAME",
    help="The experiment: every machine that runs it uses the same name.",
)
@click.option(
    "--workdir", default=".", type=_TEXT, show_default=True, help="Execution directory on this machine."
)
@click.option(
    "--log-dir",
    "--log_dir",
    "log_dir",
    default=None,
    type=_TEXT,
    metavar="DIR",
    help="Write attempt-N.log here (a folder the submitting machine reads: SLURM). Default: the workdir.",
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def agent(
    artifacts: str, name: str, workdir: str, log_dir: str | None, command: tuple[str, ...], **values: Any
) -> None:
    """Run COMMAND on this (spot) machine: restore, watch for notices, sync; exit 0 done, 75 preempted."""
    validate_name(name)
    if not command:
        raise UsageError(
            "give the command to run after --, e.g.: lightning-grid agent ... -- python train.py"
        )
    spec = _build_spec(values)
    agent_spec = AgentSpec(
        command=list(command), artifacts=artifacts, name=name, workdir=workdir, spec=spec, log_dir=log_dir
    )
    raise click.exceptions.Exit(run_agent(agent_spec))


@cli.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the whole story as JSON.")
@click.option(
    "--artifacts",
    default=None,
    type=_TEXT,
    metavar="URL",
    help="Read the story an agent left in this artifact store.",
)
def status(name: str, as_json: bool, artifacts: str | None) -> None:
    """Lifecycle, attempts with exit codes and reasons, restarts, times, and the bill."""
    validate_name(name)
    console = _console()
    if artifacts is not None:
        summary = summarize(name, read_events(artifacts, name))
        if as_json:
            click.echo(json.dumps(summary, indent=2, default=str))
            return
        console.print(
            Text.assemble((name, "bold"), f"  {_safe(summary['status'])}  restarts {summary['restarts']}"),
            soft_wrap=True,
        )
        for event in summary["events"]:
            console.print(
                Text(
                    f"  {_when(event.get('time'))}  {_safe(event.get('kind'))}  {_safe(event.get('message'))}"
                ),
                soft_wrap=True,
            )
        return
    info = describe(Engine().registry, name, accounting=True)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    console.print(
        Text.assemble(
            (_safe(info["name"]), "bold"), "  ", _status_text(info["status"]), "  ", _safe(info["reason"])
        ),
        soft_wrap=True,
    )
    where = f"{info['instance_type']}{' spot' if info['use_spot'] else ''}"
    console.print(
        Text(
            f"script {_safe(shlex.join([info['script'], *info['args']]))} · {_safe(where)}"
            f"{' · resumable' if info['resumable'] else ''} · restarts {info['restarts']}"
        ),
        soft_wrap=True,
    )
    table = Table("attempt", "started", "duration", "exit", "outcome", "reason")
    for a in info["attempts"]:
        table.add_row(
            str(a["number"]),
            _when(a["started"]),
            _duration(a["seconds"]),
            str(a["exit_code"]),
            Text(_safe(a["outcome"])),
            Text(_safe(a["reason"])),
        )
        for node in a.get("nodes") or ():
            table.add_row(
                f"  node {node['node']}",
                f"pid {node['pid']}",
                "",
                str(node["exit_code"]),
                Text(_safe(node["outcome"])),
                "",
            )
    console.print(table)
    for event in info["events"]:
        arrow = f"{event['from'] or ''} → {event['to']}" if event["to"] else "·"
        console.print(Text(f"  {_when(event['time'])}  {arrow}  {_safe(event['reason'])}"), soft_wrap=True)
    bill = info["bill"]
    redone = "unknown (a SIGKILL)" if bill["steps_redone"] is None else str(bill["steps_redone"])
    # No price for the instance type (a SLURM cluster's own nodes): SLURM's accounting below says
    # more than "$0".
    cost = (
        f" · est. cost ${bill['cost_spot_usd']:.4f} on spot vs ${bill['cost_on_demand_usd']:.4f} on demand"
        if bill.get("priced", True) or not bill.get("slurm")
        else ""
    )
    console.print(
        Text.assemble(
            ("bill", "bold"),
            f": {bill['attempts']} attempts · running {_duration(bill['seconds_running'])}"
            + (
                f" ({_duration(bill['node_seconds_running'])} of machine time)"
                if bill["node_seconds_running"] > bill["seconds_running"] + 0.5
                else ""
            )
            + " · pending"
            f" {_duration(bill['seconds_pending'])} · saving after notices {bill['seconds_saving_after_notice']:.1f}s ·"
            f" restoring {bill['seconds_restoring']:.1f}s · steps redone {redone}{cost}",
        ),
        soft_wrap=True,
    )
    accounted = bill.get("slurm")
    if accounted:
        runs = len(accounted["runs"])
        cpu = accounted["cpu_seconds"]
        console.print(
            Text.assemble(
                ("slurm", "bold"),
                f": {runs} run{'' if runs == 1 else 's'} of job{'' if len(accounted['jobs']) == 1 else 's'} {_safe(', '.join(accounted['jobs']) or '-')}"
                f" · elapsed {_duration(accounted['seconds'])} · {_duration(accounted['node_seconds'])} of node time"
                + (f" · {_duration(cpu)} of CPU time" if cpu is not None else "")
                + (" (sacct)" if accounted["source"] == "sacct" else f" · {_safe(accounted['note'])}"),
            ),
            soft_wrap=True,
        )


@cli.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print every experiment's story as JSON.")
def list_(as_json: bool) -> None:
    """All experiments, newest first."""
    registry = Engine().registry
    rows = registry.all()
    if as_json:
        click.echo(json.dumps([describe(registry, r.name) for r in rows], indent=2, default=str))
        return
    table = Table("name", "status", "instance", "spot", "restarts", "created")
    for r in rows:
        table.add_row(
            Text(_safe(r.name)),
            _status_text(r.status.value),
            Text(_safe(r.spec.instance_type)),
            "yes" if r.spec.use_spot else "no",
            str(r.restarts),
            _when(r.created),
        )
    _console().print(table)


def _copy_new(path: str, offset: int, out: IO[bytes]) -> int:
    """Copy what ``path`` holds past ``offset`` (up to its size now) to ``out``, at most
    :data:`_CHUNK` bytes at a time; returns the new offset. A 200 MB log costs 1 MiB of memory."""
    try:
        with open(path, "rb") as handle:
            end = os.fstat(handle.fileno()).st_size
            handle.seek(offset)
            while offset < end:
                chunk = handle.read(min(_CHUNK, end - offset))
                if not chunk:
                    break
                out.write(chunk)
                offset += len(chunk)
    except FileNotFoundError:  # the attempt has not written a line yet
        return offset
    out.flush()
    return offset


@cli.command()
@click.argument("name")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the experiment ends or waits.")
def logs(name: str, follow: bool) -> None:
    """The output of every attempt, each marked."""
    validate_name(name)
    engine = Engine()
    registry = engine.registry
    registry.get(name)
    sys.stdout.flush()
    out: IO[bytes] = sys.stdout.buffer
    encoding = sys.stdout.encoding or "utf-8"

    def line(text: str) -> None:
        out.write((text + "\n").encode(encoding, errors="replace"))
        out.flush()

    shown: dict[int, int] = {}
    unsupervised_since: float | None = None
    while True:
        # The status is read before the copy: output written before the experiment ended is shown.
        row = registry.get(name)
        # A pending experiment has no launcher writing to it: following would wait forever. Nor
        # has a live one whose launcher died (or never started: a detached one gets a few seconds).
        done = not follow or row.status.is_terminal() or row.status is Status.PENDING
        if follow and not done and not engine.supervised(name):
            unsupervised_since = unsupervised_since or time.monotonic()
            done = time.monotonic() - unsupervised_since > 10.0
        else:
            unsupervised_since = None
        attempts = registry.attempts(name)
        for attempt in attempts:
            if attempt.number not in shown:
                line(f"──── attempt {attempt.number} · pid {attempt.pid} ────")
                shown[attempt.number] = 0
            shown[attempt.number] = _copy_new(attempt.log_path, shown[attempt.number], out)
        if done:
            last = attempts[-1] if attempts else None
            if last is not None and last.outcome:
                line(f"──── attempt {last.number} ended: {_safe(last.outcome)} ────")
            if follow:
                line(f"──── {_safe(row.name)}: {row.status.value} ({_safe(row.reason)}) ────")
                if unsupervised_since is not None:
                    line(f"──── no launcher supervises it: lightning-grid run --resume {row.name} ────")
            return
        time.sleep(0.5)


@cli.command()
@click.argument("names", nargs=-1, metavar="NAME...")
@click.option("--all", "all_", is_flag=True, help="Stop every experiment that has not ended.")
def stop(names: tuple[str, ...], all_: bool) -> None:
    """Stop experiments (each script gets SIGTERM, then SIGKILL after its grace period)."""
    if all_ and names:
        raise UsageError("give experiment NAMEs or --all, not both")
    if not all_ and not names:
        raise UsageError("give the NAME of each experiment to stop, or --all")
    for name in names:
        validate_name(name)
    engine = Engine()
    if all_:
        targets = [r.name for r in engine.registry.all() if not r.status.is_terminal()]
        if not targets:
            engine.say("nothing to stop: no experiment is live")
            return
    else:
        targets = list(dict.fromkeys(names))
        for name in targets:
            engine.registry.get(name)  # every name known before any is stopped
    # Side by side: each stop waits for its script's orderly exit, up to its grace period.
    with ThreadPoolExecutor(max_workers=min(8, len(targets))) as pool:
        rows = list(pool.map(engine.stop, targets))
    for row in rows:
        click.echo(f"{_safe(row.name)}: {row.status.value}")


@cli.command()
@click.option(
    "--host",
    default="127.0.0.1",
    type=_TEXT,
    show_default=True,
    help="Any address but loopback needs the printed token.",
)
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="0: any free port."
)
def ui(host: str, port: int) -> None:
    """A web dashboard over the registry: experiments, timelines, logs, a stop button (extra: ui)."""
    from lightning_grid.contract import default_home
    from lightning_grid.ui import serve  # lazily: the web stack is an optional extra

    serve(default_home(), host, port)


# -- the entry point -------------------------------------------------------------------------------------
def _error(message: str) -> None:
    """The one line a user error prints."""
    click.echo(f"error: {_safe(message)}", err=True)


def main(argv: list[str] | None = None) -> int:
    try:
        result = cli.main(args=argv, prog_name="lightning-grid", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.exceptions.Abort:
        _error("interrupted")
        return _EXIT_KILLED
    except click.UsageError as exc:
        # click's own usage block is three lines; the message and where to look are one.
        hint = f" (see: {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
        _error(exc.format_message() + hint)
        return 2
    except click.ClickException as exc:
        _error(exc.format_message())
        return exc.exit_code
    except UsageError as exc:
        _error(str(exc))
        return 2
    except LightningGridError as exc:
        _error(str(exc))
        return 1
    # Without standalone mode click returns an Exit's code instead of raising it.
    return result if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
