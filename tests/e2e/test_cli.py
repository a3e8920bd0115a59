"""The ``lightning-grid`` command line: options generated from the Spec, one-line errors that write
nothing, escaped output (in process, fast); ``run --detach``, ``logs --follow``, ``stop`` and Ctrl-C
with real launcher processes and real signals."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import click
import psutil
import pytest

from lightning_grid import cli as cli_module
from lightning_grid.cli import cli, main
from lightning_grid.launcher.engine import Engine
from lightning_grid.launcher.spec import OptionInfo, Spec, options
from tests.helpers import child_env, grid, grid_status
from tests.helpers import write_script as _script

# Prints a line every 0.1 s; on SIGTERM "saves" and exits 0 (a resumable script as far as the
# launcher can tell).
TICKER = textwrap.dedent(
    """
    import signal, sys, time
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    total = int(sys.argv[1])
    for i in range(1, total + 1):
        print(f"tick {i}", flush=True)
        time.sleep(0.1)
        if stop:
            print(f"saved at {i}", flush=True)
            sys.exit(0)
    print(f"finished {total}", flush=True)
    """
)
# Ignores SIGTERM and leaves a grandchild in its process group: only a SIGKILL of the group ends both.
STUBBORN = textwrap.dedent(
    """
    import os, signal, subprocess, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen(["sleep", "1000"])
    print(f"pids {os.getpid()} {child.pid}", flush=True)
    while True:
        time.sleep(0.1)
    """
)
ARGV = "import json, sys\nprint('argv=' + json.dumps(sys.argv[1:]), flush=True)\n"


# -- options: generated from the Spec, documented, spelled both ways ---------------------------------------
def _check_generated(
    command: click.Command, infos: list[OptionInfo], defaults: dict[str, object]
) -> set[str]:
    params = {p.name: p for p in command.params}
    for info in infos:
        param = params[info.name]
        assert isinstance(param, click.Option), info.name
        assert set(param.opts) | set(param.secondary_opts) == set(info.flags), info.name
        assert param.help == info.help and param.is_flag == info.is_flag, info.name
        if not info.is_flag:
            assert param.default == defaults.get(info.name, info.default), info.name
        if info.choices:
            assert isinstance(param.type, click.Choice) and tuple(param.type.choices) == tuple(info.choices)
    return set(params) - {info.name for info in infos}


def test_run_and_agent_options_are_the_spec_options() -> None:
    run, agent = cli.commands["run"], cli.commands["agent"]
    assert _check_generated(run, options(), {}) == {"resume", "detach", "no_echo", "script", "script_args"}
    agent_only = _check_generated(agent, options(for_agent=True), {"cloud": "auto"})
    assert agent_only == {"artifacts", "name", "workdir", "log_dir", "command"}


def test_a_new_spec_field_becomes_an_option_without_a_cli_edit(monkeypatch: pytest.MonkeyPatch) -> None:
    extra = OptionInfo(
        name="warmup_steps", flags=("--warmup_steps", "--warmup-steps"), kind=int, default=3, help="Warm up."
    )
    monkeypatch.setattr(cli_module, "options", lambda for_agent=False: [*options(for_agent), extra])
    seen: dict[str, object] = {}
    command = click.command()(cli_module._spec_options()(lambda **values: seen.update(values)))
    _check_generated(command, [*options(), extra], {})
    command.main(["--warmup-steps", "7"], standalone_mode=False)
    assert seen["warmup_steps"] == 7


def _all_options() -> list[tuple[str, click.Option]]:
    found = [("lightning-grid", p) for p in cli.params if isinstance(p, click.Option)]
    ctx = click.Context(cli)
    found.append(("lightning-grid", cli.get_help_option(ctx)))  # type: ignore[arg-type]
    for name, command in cli.commands.items():
        found += [(name, p) for p in command.params if isinstance(p, click.Option)]
        found.append((name, command.get_help_option(click.Context(command))))  # type: ignore[arg-type]
    return found


def test_every_option_has_help_and_both_spellings() -> None:
    for command_name, option in _all_options():
        flags = set(option.opts) | set(option.secondary_opts)
        assert option.help and option.help.strip(), (command_name, flags)
        for flag in flags:
            if not flag.startswith("--"):
                continue
            body = flag[2:]
            assert "--" + body.replace("_", "-") in flags, (command_name, flag)
            assert "--" + body.replace("-", "_") in flags, (command_name, flag)
    for command in cli.commands.values():
        assert command.help and command.help.strip()


def test_help_is_printed_and_exits_0(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--grace_period, --grace-period" in out and "--detach" in out and "--no-echo" not in out
    assert not home.exists()


# -- a mistyped option, and script arguments ------------------------------------------------------------
def test_a_mistyped_option_is_clicks_error_and_script_arguments_pass_through(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = _script(tmp_path / "p", "argv.py", ARGV)
    assert main(["run", "--grace_perod", "5", str(script)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: No such option")
    assert "--grace_perod" in err and "--grace_period" in err and "script not found" not in err
    assert not home.exists()

    passed = ["--lr", "0.1", "--grace_period", "5", "-h", "--", "[/]"]
    assert main(["run", "--name", "pt", str(script), *passed]) == 0
    registry = Engine().registry
    assert list(registry.get("pt").spec.args) == passed
    log = Path(registry.attempts("pt")[0].log_path).read_text()
    assert f"argv={json.dumps(passed)}" in log


# -- bad input: one line, exit 2, nothing written ------------------------------------------------------
HUGE = "100000000000000000000"
# The agent's required options, before the option under test.
AGENT = ["agent", "--artifacts", "{store}", "--name", "x", "--workdir", "{wd}"]

BAD_INPUT = [
    # run: every Spec option
    (["run", "--grace_perod", "5", "{script}"], "No such option"),
    (["run", "--name", "", "{script}"], "must not be empty"),
    (["run", "--name", "a\nb", "{script}"], "control characters"),
    (["run", "--name", "../x", "{script}"], "invalid experiment name '../x'"),
    (["run", "--name", "a/b", "{script}"], "invalid experiment name 'a/b'"),
    (["run", "--artifacts", "/etc/passwd/x", "{script}"], "cannot use the artifact store /etc/passwd/x"),
    (["run", "--name", "[bold]x[/]", "{script}"], "invalid experiment name '[bold]x[/]'"),
    (["run", "--name", "\x1b[31mred", "{script}"], "control characters"),
    (["run", "--name", "queued1", "{script}"], "already exists"),
    (["run", "--use-spot=yes", "{script}"], "does not take a value"),
    (["run", "--resumable=1", "{script}"], "does not take a value"),
    (["run", "--instance_type", "p9.huge", "{script}"], "unknown instance type 'p9.huge'"),
    (["run", "--instance-type", "", "{script}"], "must not be empty"),
    (["run", "--max_restarts", "-1", "{script}"], "--max-restarts must be >= 0"),
    (["run", "--max-restarts", HUGE, "{script}"], "out of range"),
    (["run", "--max-restarts", "many", "{script}"], "'many' is not a valid integer"),
    (["run", "--retries", "1.5", "{script}"], "is not a valid integer"),
    (["run", "--retries", HUGE, "{script}"], "out of range"),
    (["run", "--retry_delay", "nan", "{script}"], "finite"),
    (["run", "--retry-delay", "-1", "{script}"], "--retry-delay must be >= 0"),
    (["run", "--retry-delay", "1e400", "{script}"], "finite"),
    (["run", "--artifacts", "", "{script}"], "must not be empty"),
    (["run", "--artifacts", "nosuchscheme://x", "{script}"], "unknown or unavailable scheme 'nosuchscheme'"),
    (["run", "--simulate-preemptions", "", "{script}"], "must not be empty"),
    (["run", "--simulate-preemptions", "5,abc", "{script}"], "--simulate-preemptions must be seconds"),
    (["run", "--simulate_preemptions", "nan", "{script}"], "finite"),
    (["run", "--simulate-preemptions", "-1", "{script}"], ">= 0"),
    (["run", "--grace-period", "inf", "{script}"], "finite"),
    (["run", "--grace_period", "0", "{script}"], "--grace-period must be > 0"),
    (["run", "--grace-period", "soon", "{script}"], "is not a valid float"),
    (["run", "--cloud", "mars", "{script}"], "'mars' is not one of"),
    (["run", "--cloud", "", "{script}"], "is not one of"),
    (["run", "--every-n-train-steps", "0", "{script}"], "--every-n-train-steps must be >= 1"),
    (["run", "--every_n_train_steps", HUGE, "{script}"], "out of range"),
    (["run", "--every-n-seconds", "nan", "{script}"], "finite"),
    (["run", "--every_n_seconds", "0", "{script}"], "--every-n-seconds must be > 0"),
    (["run", "{script}", "a\x00b"], "NUL"),
    # run: SCRIPT, --resume, --detach
    (["run"], "missing SCRIPT"),
    (["run", "-d"], "missing SCRIPT"),
    (["run", "nosuchscript.py"], "script not found: nosuchscript.py"),
    (["run", "no\nsuch\x1b[2J.py"], "script not found: no\\nsuch\\x1b[2J.py"),
    (["run", "."], "is a directory"),
    (["run", "--resume", "../x"], "invalid experiment name '../x'"),
    (["run", "--resume", "a/b"], "invalid experiment name 'a/b'"),
    (["run", "--resume", ""], "must not be empty"),
    (["run", "--resume", "ghost"], "no experiment named 'ghost'"),
    (["run", "--resume", "ghost", "-d"], "no experiment named 'ghost'"),
    (["run", "--resume", "queued1", "{script}"], "not both"),
    (["run", "--resume", "queued1", "--retries", "3"], "--retries cannot change it"),
    (["run", "--resume", "queued1", "--num_nodes", "0"], "--num-nodes must be >= 1"),
    (["run", "--resume", "queued1", "--min-nodes", "3"], "--min-nodes 3 is more than --num-nodes 1"),
    # multi-node
    (["run", "--num_nodes", "0", "{script}"], "--num-nodes must be >= 1"),
    (["run", "--nproc-per-node", "0", "{script}"], "--nproc-per-node must be >= 1"),
    (["run", "--num_nodes", "2", "--min_nodes", "3", "{script}"], "--min-nodes 3 is more than --num-nodes 2"),
    (["run", "--num_nodes", "2", "--simulate-preemptions", "2@5", "{script}"], "names node 2"),
    (["run", "--simulate-preemptions", "1@5", "{script}"], "has 1 node(s)"),
    (["run", "--simulate-preemptions", "x@5", "{script}"], "NODE@seconds"),
    (
        ["run", "--backend", "slurm", "--nodes", "2", "--min-nodes", "1", "{script}"],
        "does not run short-handed",
    ),
    (["run", "--detach", "--name", "../x", "{script}"], "invalid experiment name"),
    (["run", "--detach=1", "{script}"], "does not take a value"),
    # agent
    (["agent", "--name", "x", "--", "{py}"], "Missing option '--artifacts'"),
    (["agent", "--artifacts", "{store}", "--", "{py}"], "Missing option '--name'"),
    (["agent", "--artifacts", "{store}", "--name", "../x", "--workdir", "{wd}", "--", "{py}"], "invalid"),
    (["agent", "--artifacts", "{store}", "--name", "x", "--workdir", "{wd}"], "give the command to run"),
    (["agent", "--artifacts", "", "--name", "x", "--workdir", "{wd}", "--", "{py}"], "must not be empty"),
    (["agent", "--artifacts", "{store}", "--name", "x", "--workdir", "", "--", "{py}"], "must not be empty"),
    ([*AGENT, "--grace-period", "nan", "--", "{py}"], "finite"),
    (["agent", "--artifacts", "{store}", "--name", "x", "--workdir", "/proc/x", "--", "{py}"], "/proc/x"),
    ([*AGENT, "--retries", HUGE, "--", "{py}"], "out of range"),
    ([*AGENT, "--cloud", "mars", "--", "{py}"], "'mars'"),
    ([*AGENT, "--every-n-seconds", "inf", "--", "{py}"], "finite"),
    ([*AGENT, "--simulate-preemptions", "x", "--", "{py}"], "seconds"),
    ([*AGENT, "--instance-type", "p9.huge", "--", "{py}"], "p9.huge"),
    (
        ["agent", "--artifacts", "{store}", "--name", "x", "--workdir", "{wd}", "--use-spot", "--", "{py}"],
        "No such option",
    ),  # fmt: skip
    # status, list, logs, stop, ui, and the group itself
    (["status"], "Missing argument 'NAME'"),
    (["status", "ghost"], "no experiment named 'ghost'"),
    (["status", "../x"], "invalid experiment name"),
    (["status", "a/b"], "invalid experiment name"),
    (["status", "a\nb"], "invalid experiment name 'a\\nb'"),
    (["status", ""], "invalid experiment name ''"),
    (["status", "[/]"], "invalid experiment name '[/]'"),
    (["status", "\x1b]0;pwned\x07"], "invalid experiment name"),
    (["status", "../x", "--artifacts", "{store}"], "invalid experiment name"),
    (["status", "queued1", "--artifacts", ""], "must not be empty"),
    (["status", "queued1", "--json=1"], "does not take a value"),
    (["list", "extra"], "unexpected extra argument"),
    (["list", "--jsn"], "No such option"),
    (["logs"], "Missing argument 'NAME'"),
    (["logs", "ghost"], "no experiment named 'ghost'"),
    (["logs", "ghost", "--follow"], "no experiment named 'ghost'"),
    (["logs", "../x", "-f"], "invalid experiment name"),
    (["logs", "queued1", "--follow=yes"], "does not take a value"),
    (["stop"], "give the NAME of each experiment to stop, or --all"),
    (["stop", "ghost"], "no experiment named 'ghost'"),
    (["stop", "queued1", "ghost"], "no experiment named 'ghost'"),
    (["stop", "queued1", "a/b"], "invalid experiment name 'a/b'"),
    (["stop", "--all", "queued1"], "not both"),
    (["stop", "--all=1"], "does not take a value"),
    (["ui", "--port", HUGE], "is not in the range"),
    (["ui", "--port", "-1"], "is not in the range"),
    (["ui", "--port", "nan"], "is not a valid integer"),
    (["ui", "--host", ""], "must not be empty"),
    (["ui", "--host", "a\nb"], "control characters"),
    (["nosuchverb"], "No such command 'nosuchverb'"),
    (["--bogus"], "No such option"),
    (["run", "--version=1"], "No such option"),
]


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` and a hash of its bytes (SQLite's transient -wal/-shm aside)."""
    if not root.exists():
        return {}
    found = {}
    for path in sorted(root.rglob("*")):
        if path.name.endswith(("-wal", "-shm", "-journal")):
            continue
        found[str(path.relative_to(root))] = (
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        )
    return found


@pytest.mark.parametrize("argv,message", BAD_INPUT, ids=[repr(" ".join(a))[1:-1][:60] for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path,
    home: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    message: str,
) -> None:
    project = tmp_path / "project"
    script = _script(project, "ok.py", "print('ok')\n")
    # One experiment that exists, waiting for a launcher: a bad command must not touch it either.
    Engine().submit(Spec(script=str(script), name="queued1"))
    capsys.readouterr()
    store, workdir = tmp_path / "store", tmp_path / "workdir"
    before, project_before = _snapshot(home), _snapshot(project)
    monkeypatch.chdir(project)
    filled = [
        a.replace("{script}", str(script))
        .replace("{store}", str(store))
        .replace("{wd}", str(workdir))
        .replace("{py}", sys.executable)
        for a in argv
    ]
    code = main(filled)
    out, err = capsys.readouterr()
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    assert err[:-1].isprintable(), err  # control characters come out escaped
    assert message in err, err
    assert "Traceback" not in err and out == ""
    assert _snapshot(home) == before
    assert _snapshot(project) == project_before
    assert not store.exists() and not workdir.exists()
    row = Engine().registry.get("queued1")
    assert row.status.value == "queued" and not row.stop_requested


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--grace_perod", "5", "x.py"],
        ["run", "--retries", "many", "x.py"],
        ["run", "--name", "a/b", "x.py"],
        ["run", "--every-n-seconds", "nan", "x.py"],
        ["run", "--resume", "../x"],
        ["status", "../x"],
        ["logs", "a/b"],
        ["stop", "a\nb"],
        ["stop"],
    ],
)
def test_input_rejected_by_parsing_leaves_no_home_at_all(
    home: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    assert main(argv) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not home.exists()


# -- what the user's text cannot do to the terminal ------------------------------------------------------
def test_markup_and_control_characters_in_arguments_are_shown_escaped(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.setenv("TERM", "dumb")
    script = _script(tmp_path / "p", "argv.py", ARGV)
    hostile = ["[/]", "[bold]x", "\x1b[2J", "bell\x07", "two\nlines", "\udcff"]
    assert main(["run", "--name", "m", str(script), *hostile]) == 0
    capsys.readouterr()
    for argv in (["status", "m"], ["list"], ["status", "m", "--json"], ["list", "--json"]):
        assert main(argv) == 0, argv
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\x07" not in out, argv
        if "--json" in argv:
            json.loads(out)
    assert main(["status", "m"]) == 0
    out = capsys.readouterr().out
    assert "'[/]'" in out and "'[bold]x'" in out and "\\x1b[2J" in out and "bell\\x07" in out
    assert "two\\nlines" in out and "\\udcff" in out


def test_logs_streams_a_large_log_in_bounded_memory(tmp_path: Path, home: Path) -> None:
    size_mb = 128
    script = _script(
        tmp_path / "p",
        "big.py",
        f"import sys\nline = b'x' * 1023 + b'\\n'\nfor _ in range({size_mb} * 1024):\n"
        "    sys.stdout.buffer.write(line)\nsys.stdout.flush()\n",
    )
    assert main(["run", "--no-echo", "--name", "big", str(script)]) == 0
    program = textwrap.dedent(
        """
        import sys
        from lightning_grid.cli import main

        def peak_kb():
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # the peak so far (the forked parent's, the imports') is forgotten
        before = peak_kb()
        code = main(["logs", "big"])
        print(code, before, peak_kb(), file=sys.stderr)
        """
    )
    out_path = tmp_path / "out.log"
    with open(out_path, "wb") as out:
        proc = subprocess.run(
            [sys.executable, "-c", program],
            env=child_env(LIGHTNING_GRID_HOME=str(home)),
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    code, before_kb, after_kb = (int(v) for v in proc.stderr.split()[-3:])
    assert code == 0, proc.stderr
    assert out_path.stat().st_size > size_mb << 20  # all of it, plus the markers
    assert (after_kb - before_kb) < 32 * 1024, f"logs grew by {(after_kb - before_kb) >> 10} MB"


# -- real processes: --detach, logs --follow, stop ---------------------------------------------------------
def _launcher_pid(stderr: str) -> int:
    found = re.search(r"launcher pid (\d+)", stderr)
    assert found, stderr
    return int(found.group(1))


def _wait_until(predicate, what: str, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    """Poll ``predicate``; a hang guard, not a timing assertion."""
    done = threading.Event()
    deadline = threading.Timer(timeout, done.set)
    deadline.start()
    try:
        while not done.is_set():
            if predicate():
                return
            done.wait(0.2)
    finally:
        deadline.cancel()
    pytest.fail(f"gave up waiting for {what}")


def _running(home: Path, name: str) -> bool:
    proc = grid(home, "status", name, "--json")
    return proc.returncode == 0 and json.loads(proc.stdout)["status"] == "running"


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_detach_returns_at_once_and_logs_follow_streams_to_the_end(tmp_path: Path, home: Path) -> None:
    script = _script(tmp_path / "p", "ticker.py", TICKER)
    detached = grid(home, "run", "-d", "--name", "short", str(script), "30")
    assert detached.returncode == 0, detached.stderr
    assert detached.stdout == "short\n"
    assert "lightning-grid logs short --follow" in detached.stderr
    launcher = _launcher_pid(detached.stderr)
    followed = grid(home, "logs", "short", "--follow")
    assert followed.returncode == 0, followed.stderr
    assert "──── attempt 1" in followed.stdout and "tick 1\n" in followed.stdout
    assert "finished 30" in followed.stdout and "──── short: succeeded" in followed.stdout
    assert grid_status(home, "short")["status"] == "succeeded"
    _wait_until(lambda: _gone(launcher), "the background launcher to exit")
    # The background launcher echoed no script output: its own messages only, in its file.
    launcher_log = (home / "runs" / "short" / "launcher.log").read_text()
    assert "tick 1" not in launcher_log and "short: succeeded" in launcher_log


def test_detached_launchers_outlive_the_terminal_and_stop_takes_several_names_and_all(
    tmp_path: Path, home: Path
) -> None:
    script = _script(tmp_path / "p", "ticker.py", TICKER)
    pids = {}
    try:
        for name in ("long1", "long2", "long3"):
            detached = grid(home, "run", "--detach", "--resumable", "--name", name, str(script), "100000")
            assert detached.returncode == 0, detached.stderr
            pids[name] = _launcher_pid(detached.stderr)
        for name, pid in pids.items():
            _wait_until(lambda name=name: _running(home, name), f"{name} to run")
            # Its own session (no terminal to hang up on it), stdin from /dev/null, output to a file.
            assert os.getsid(pid) == pid
            assert os.readlink(f"/proc/{pid}/fd/0") == os.devnull
            assert os.readlink(f"/proc/{pid}/fd/1") == str(home / "runs" / name / "launcher.log")
        _wait_until(lambda: "tick 2\n" in grid(home, "logs", "long1").stdout, "long1's output")
        scripts = {name: grid_status(home, name)["attempts"][0]["pid"] for name in pids}

        stopped = grid(home, "stop", "long1", "long2")
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout.splitlines() == ["long1: stopped", "long2: stopped"]
        assert grid_status(home, "long3")["status"] == "running"
        for name in ("long1", "long2"):
            _wait_until(lambda name=name: _gone(pids[name]) and _gone(scripts[name]), f"{name} to end")
            followed = grid(home, "logs", name, "--follow")
            assert followed.returncode == 0 and f"──── {name}: stopped" in followed.stdout

        everything = grid(home, "stop", "--all")
        assert everything.returncode == 0, everything.stderr
        assert everything.stdout.splitlines() == ["long3: stopped"]
        _wait_until(lambda: _gone(pids["long3"]) and _gone(scripts["long3"]), "long3 to end")
        nothing = grid(home, "stop", "--all")
        assert nothing.returncode == 0 and nothing.stdout == "" and "nothing to stop" in nothing.stderr
        assert {grid_status(home, n)["status"] for n in pids} == {"stopped"}
    finally:
        for pid in pids.values():
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


# -- real processes: Ctrl-C ------------------------------------------------------------------------------
class _Launcher:
    """A foreground ``lightning-grid run`` whose output lines are read as they come."""

    def __init__(self, home: Path, *argv: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lightning_grid.cli", "run", *argv],
            env=child_env(LIGHTNING_GRID_HOME=str(home)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: dict[str, queue.Queue[str]] = {"out": queue.Queue(), "err": queue.Queue()}
        self.seen: dict[str, list[str]] = {"out": [], "err": []}
        for key, stream in (("out", self.proc.stdout), ("err", self.proc.stderr)):
            threading.Thread(target=self._read, args=(stream, self.lines[key]), daemon=True).start()

    @staticmethod
    def _read(stream, lines: queue.Queue[str]) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            lines.put(line)
        lines.put("")

    def wait_for(self, key: str, text: str, timeout: float = 120) -> str:
        """The first line of stdout (``out``) or stderr (``err``) containing ``text`` (a hang guard)."""
        while True:
            try:
                line = self.lines[key].get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"no {text!r} on std{key}: {''.join(self.seen[key])[-2000:]}")
            self.seen[key].append(line)
            if line == "":
                pytest.fail(f"std{key} ended without {text!r}: {''.join(self.seen[key])[-2000:]}")
            if text in line:
                return line

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail("the launcher did not exit")
        rest = []
        while True:
            line = self.lines["err"].get(timeout=30)
            if line == "":
                break
            rest.append(line)
        return code, "".join(self.seen["err"] + rest)


def test_one_ctrl_c_stops_in_order_and_leaves_it_pending(tmp_path: Path, home: Path) -> None:
    script = _script(tmp_path / "p", "ticker.py", TICKER)
    launcher = _Launcher(home, "--resumable", "--name", "once", str(script), "100000")
    try:
        launcher.wait_for("out", "tick 1")
        launcher.proc.send_signal(signal.SIGINT)
        launcher.wait_for("err", "press Ctrl-C again to kill it now")
        launcher.wait_for("out", "saved at")
        code, err = launcher.finish()
    finally:
        if launcher.proc.poll() is None:
            launcher.proc.kill()
    assert code == 1, err
    assert "run --resume once" in err and "Traceback" not in err
    info = grid_status(home, "once")
    assert info["status"] == "pending"
    assert [(a["outcome"], a["exit_code"]) for a in info["attempts"]] == [("preempted", 0)]


def test_a_second_ctrl_c_kills_the_scripts_group_and_exits_130(tmp_path: Path, home: Path) -> None:
    script = _script(tmp_path / "p", "stubborn.py", STUBBORN)
    launcher = _Launcher(home, "--resumable", "--grace-period", "3600", "--name", "twice", str(script))
    grandchild = script_pid = None
    try:
        script_pid, grandchild = (int(v) for v in launcher.wait_for("out", "pids ").split()[1:])
        launcher.proc.send_signal(signal.SIGINT)
        launcher.wait_for("err", "press Ctrl-C again to kill it now")
        launcher.wait_for("err", "sending SIGTERM")  # the orderly stop has begun; the script ignores it
        assert grid_status(home, "twice")["attempts"][0]["pid"] == script_pid
        assert not _gone(script_pid) and not _gone(grandchild)
        launcher.proc.send_signal(signal.SIGINT)
        code, err = launcher.finish()  # without the escalation it would wait out the 3600 s grace period
        survivors = [pid for pid in (script_pid, grandchild) if not _gone(pid)]
    finally:
        if launcher.proc.poll() is None:
            launcher.proc.kill()
        for pid in (script_pid, grandchild):  # a failed test leaves nothing behind either
            if pid is not None and not _gone(pid):
                os.kill(pid, signal.SIGKILL)
    assert code == 130, err
    assert "killing the script now" in err and "Traceback" not in err
    assert survivors == []
    info = grid_status(home, "twice")
    assert info["status"] == "pending"
    assert [(a["outcome"], a["exit_code"]) for a in info["attempts"]] == [("killed", -signal.SIGKILL)]
