"""The c10d rendezvous store the launcher hosts (``launcher/rendezvous_store.py``), and the torch
behaviour it relies on, with real processes.

torchrun's c10d agents given ``--rdzv-conf is_host=false`` (as :func:`torchrun_command` gives every
c10d rendezvous) never host the store, even on the endpoint's own machine: they are clients of the
store the launcher serves. So an agent that leaves without torchrun's exit barrier (its worker
failed) leaves the others running with their workers; with torchrun's own hosting, the agent that
bound the endpoint first took the store with it and every other one failed at its next tick
(``RendezvousConnectionError`` in ``num_nodes_waiting()``, exit 1).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
from torch.distributed import TCPStore

from lightning_grid.errors import StoreError
from lightning_grid.launcher.nodes import Rendezvous, torchrun_command
from lightning_grid.launcher.rendezvous_store import hosted, split_endpoint
from tests.helpers import REPO, child_env

IDLE = REPO / "tests" / "scripts" / "idle_ranks.py"


def _port(rendezvous: Rendezvous) -> int:
    return split_endpoint(rendezvous.endpoint)[1]


def _listening(proc: psutil.Process, port: int) -> bool:
    try:
        return any(
            c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in proc.net_connections("tcp")
        )
    except psutil.Error:
        return False


def _wait_for(what: str, check, timeout_s: float = 120.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_split_endpoint() -> None:
    assert split_endpoint("127.0.0.1:0") == ("127.0.0.1", 0)
    assert split_endpoint("head-0.jobset:29500") == ("head-0.jobset", 29500)
    assert split_endpoint("[fd00::5]:29400") == ("fd00::5", 29400)
    for bad in ("127.0.0.1", ":29500", "h:port"):
        with pytest.raises(ValueError, match="host:port"):
            split_endpoint(bad)


def test_the_store_serves_on_the_port_it_bound_until_the_block_ends() -> None:
    with hosted(Rendezvous("127.0.0.1:0", "r", 2, 1), sys.executable) as rendezvous:
        port = _port(rendezvous)
        assert port > 0 and rendezvous.run_id == "r" and rendezvous.num_nodes == 2
        client = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))
        client.set("torch.rendezvous.r", "state")
        again = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))
        assert again.get("torch.rendezvous.r") == b"state"
        servers = [p for p in psutil.Process().children() if _listening(p, port)]
        assert len(servers) == 1  # a process of ours, not this one
        server = servers[0]
        del client, again
    assert not server.is_running()  # gone with the block (reaped by it)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_a_port_already_taken_is_a_store_error_before_anything_runs() -> None:
    in_use = r"cannot host the rendezvous store at 127\.0\.0\.1:\d+: .*in use"
    with (
        hosted(Rendezvous("127.0.0.1:0", "r", 2, 1), sys.executable) as taken,
        pytest.raises(StoreError, match=in_use),
        hosted(taken, sys.executable),
    ):
        pass  # pragma: no cover


def test_an_interpreter_without_torch_is_a_store_error(tmp_path: Path) -> None:
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} -I -S "$@"\n')  # no site-packages: no torch
    python.chmod(0o755)
    rendezvous = Rendezvous("127.0.0.1:0", "r", 2, 1)
    with (
        pytest.raises(StoreError, match="rendezvous store.*No module named 'torch'"),
        hosted(rendezvous, str(python)),
    ):
        pass  # pragma: no cover


@pytest.mark.slow
def test_torchrun_agents_are_clients_and_outlive_a_peer_that_left(tmp_path: Path) -> None:
    """Two torchrun agents on 127.0.0.1 (the local engine's layout). Neither hosts the store; rank
    0's worker fails, its agent leaves at once (torchrun's exit barrier follows only a success), and
    the other agent, which reads the store at every tick while its worker runs, goes on."""
    env = child_env()
    agents: list[subprocess.Popen[bytes]] = []
    logs = [tmp_path / f"agent{n}.log" for n in (0, 1)]
    try:
        with hosted(Rendezvous("127.0.0.1:0", "pin", num_nodes=2, nproc_per_node=1), sys.executable) as rdzv:
            port = _port(rdzv)
            command = torchrun_command(sys.executable, [sys.executable, str(IDLE), str(tmp_path)], rdzv, 30)
            for log in logs:
                with open(log, "wb") as out:
                    agents.append(subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT))
            _wait_for("both ranks", lambda: all((tmp_path / f"ready-{r}").exists() for r in (0, 1)))
            ranks = {int(p.name.split("-")[1]): int(p.read_text()) for p in tmp_path.glob("ready-*")}
            for agent, log in zip(agents, logs, strict=True):  # neither the agents nor their workers host it
                tree = [psutil.Process(agent.pid), *psutil.Process(agent.pid).children(recursive=True)]
                assert not any(_listening(p, port) for p in tree), log.read_text()
            leaver = [a.pid for a in agents].index(psutil.Process(ranks[0]).ppid())
            stayer = 1 - leaver
            (tmp_path / "exit-0").write_text("3")
            assert agents[leaver].wait(timeout=60) == 1, logs[leaver].read_text()
            time.sleep(3)  # 30 of the other agent's ticks, each of which reads the store
            assert agents[stayer].poll() is None, logs[stayer].read_text()[-3000:]
            assert psutil.pid_exists(ranks[1])
            assert "RendezvousConnectionError" not in logs[stayer].read_text()
    finally:
        for agent in agents:
            if agent.poll() is None:
                for proc in psutil.Process(agent.pid).children(recursive=True):
                    proc.kill()
                agent.kill()
            agent.wait()
