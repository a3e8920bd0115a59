"""The c10d rendezvous store of an attempt, hosted for the launcher by a process that outlives every
torchrun agent.

torchrun's c10d rendezvous keeps its state in a ``TCPStore``. Left to itself, the first agent to bind
the endpoint hosts it (``c10d_rendezvous_backend._create_tcp_store``: an agent whose host name
matches the endpoint tries to be the server, and becomes a client if the port is taken), so which
node holds it is a race. The agents then read it every monitoring tick while their workers run
(``num_nodes_waiting()``). torchrun's exit barrier keeps the hosting agent alive while the others'
workers run, but only after an orderly end: an agent whose workers *failed* (a worker that died of
the notice's SIGTERM before it could handle it, an exception) or whose machine went leaves at once,
and takes the store with it. Every other agent whose workers still run then fails at its next tick
(``RendezvousConnectionError``, exit 1): a node that did nothing wrong reports a failure of its own,
and its agent stops its workers instead of the launcher. A launcher that sees both exits at once
(descheduled a moment on a busy machine) cannot tell which came first, and judges the attempt
*failed*, not preempted or killed: the experiment ends instead of resuming.

So the store is hosted here, by a process started before the agents and ended after the last one
has exited, and every agent is its client (torchrun's own ``--rdzv-conf is_host=false``, given by
:func:`lightning_grid.launcher.nodes.torchrun_command` for every c10d rendezvous). No agent's exit
takes it away. It lives on node 0's machine: the local engine's (every node is there, and it
outlives them all), or the primary ``lightning-grid agent``'s for an elastic job under a provisioner
(which serves it while node 0's torchrun runs: another machine's agent still running after that
can lose it, as before). A static rendezvous (a
provisioner's fixed machines) is hosted by node 0's torchrun by design, and reads no store between
its rendezvous and its exit barrier.

A process and not a store inside the launcher: it runs with the interpreter torchrun runs with
(the store's wire protocol is that torch's, and a launcher installed apart, with pipx say, may have
another), it keeps torch out of the launcher, and it goes on serving while the launcher is suspended.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import IO

from lightning_grid.errors import StoreError
from lightning_grid.launcher.nodes import Rendezvous
from lightning_grid.launcher.processes import die_with_parent

__all__ = ["hosted", "split_endpoint", "READY_TIMEOUT_S"]

#: How long the store's process may take to start (it imports torch; a busy machine is slow).
READY_TIMEOUT_S = 120.0
_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_rendezvous_server.py")


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``host:port`` (an IPv6 host in brackets, as torchrun writes it) → ``(host, port)``."""
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"not a host:port rendezvous endpoint: {endpoint!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@contextlib.contextmanager
def hosted(
    rendezvous: Rendezvous, python: str, ready_timeout_s: float = READY_TIMEOUT_S
) -> Iterator[Rendezvous]:
    """Serve ``rendezvous``'s store until the block ends; yields the rendezvous the agents are given,
    its endpoint's port the one bound (an endpoint on port 0 asks for any free one: no other process
    can take it between its choice and its use). ``python`` is the interpreter torchrun runs with.
    Raises :class:`StoreError` when the store cannot be started (nothing has run yet)."""
    host, port = split_endpoint(rendezvous.endpoint)
    errors = tempfile.TemporaryFile()  # noqa: SIM115 - closed below; a file, so it never blocks the server
    try:
        proc = subprocess.Popen(
            [python, _SERVER, host, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            start_new_session=True,  # a Ctrl-C or Ctrl-Z meant for the launcher never reaches it
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )
    except OSError as exc:
        errors.close()
        raise StoreError(f"cannot start the rendezvous store at {rendezvous.endpoint}: {exc}") from exc
    try:
        bound = _announced_port(proc, ready_timeout_s)
        if bound is None:
            raise StoreError(
                f"cannot host the rendezvous store at {rendezvous.endpoint}: {_last_words(proc, errors)}"
            )
        yield replace(rendezvous, endpoint=_join(host, bound))
    finally:
        _close(proc)
        errors.close()


def _announced_port(proc: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    """The port the store's process bound, once it says so; None if it exits or stays silent."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    seen = b""
    while b"\n" not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            return None
        chunk = os.read(proc.stdout.fileno(), 64)
        if not chunk:
            return None
        seen += chunk
    first = seen.split(b"\n", 1)[0].strip()
    return int(first) if first.isdigit() else None


def _last_words(proc: subprocess.Popen[bytes], errors: IO[bytes]) -> str:
    """Why the store's process did not start: the last line of what it wrote, or how it ended."""
    try:  # its stdout closed as it exited: reaped in a moment, so the exit code is known
        code: int | None = proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        code = None
    errors.seek(0)
    lines = [ln.strip() for ln in errors.read().decode(errors="replace").splitlines() if ln.strip()]
    said = lines[-1] if lines else ""
    if code is None:
        return said or "no word from it in time"
    return f"{said} (exit {code})" if said else f"it exited {code}"


def _close(proc: subprocess.Popen[bytes]) -> None:
    """Stop serving, at once: the agents are gone, and in a preemption the spot window's seconds
    are the upload's (the server's own orderly exit, torch's teardown, took about 1 s)."""
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    with contextlib.suppress(OSError):
        proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
