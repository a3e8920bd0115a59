"""Machines of one attempt: torchrun's command line, its rendezvous, and the workers on each node.

Multi-node runs go through torch.distributed.elastic's own agent (``torchrun``), never a
rendezvous of ours: every node runs one torchrun agent, the agents meet at a c10d rendezvous
and start ``nproc_per_node`` workers each. The c10d rendezvous's store is hosted by the launcher on
node 0's machine, never by an agent, so that no agent's exit takes it from the others (see
:mod:`lightning_grid.launcher.rendezvous_store`).

Two torchrun behaviours shape what the launcher does around it:

* torchrun's agent catches SIGTERM and kills its workers ``--shutdown-timeout`` seconds later
  (30 s by default). A notice's window is ours (AWS: 120 s), so the launcher signals the
  *workers* directly and leaves the agent alone; the agent also gets the window as its shutdown
  timeout, for a machine going down that signals every process at once.
* torchrun starts each worker in a session of its own, so a signal to the agent's process group
  never reaches them: the workers are found as the agent's children.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import psutil

__all__ = ["Rendezvous", "torchrun_command", "free_port", "workers_of"]


@dataclass(frozen=True)
class Rendezvous:
    """Where and how the nodes of one attempt meet."""

    endpoint: str  # host:port of the c10d store (the first node's address; port 0: any, when hosted)
    run_id: str  # unique per attempt: a late agent of an earlier attempt never joins this one
    num_nodes: int
    nproc_per_node: int
    min_nodes: int | None = None  # go on with fewer (torchrun's --nnodes MIN:MAX)
    node_rank: int | None = None  # a preferred rank (c10d honours it only as a hint)
    #: torchrun's --rdzv-backend. ``c10d`` (the local engine's, and an elastic job's): the agents
    #: meet at a store node 0's launcher hosts (every agent is its client: ``is_host=false``), and
    #: node ranks are first come, first served.
    #: ``static`` (a provisioner's fixed machines): node ``node_rank`` 0 hosts the store at the
    #: endpoint and every node keeps the rank it was given, so node 0 runs global rank 0 (how
    #: SkyPilot's own docs run torchrun). It needs ``node_rank`` and a fixed node count.
    backend: str = "c10d"

    @property
    def nnodes(self) -> str:
        low = self.min_nodes if self.min_nodes is not None else self.num_nodes
        return str(self.num_nodes) if low == self.num_nodes else f"{low}:{self.num_nodes}"


def torchrun_command(
    python: str, script: Sequence[str], rendezvous: Rendezvous, shutdown_timeout: float
) -> list[str]:
    """``python -m torch.distributed.run …`` for one node. No restarts inside torchrun
    (``--max-restarts 0``): an attempt that loses a worker ends, and the launcher decides (resume
    from the newest checkpoint, or count a failure) with everything it knows."""
    command = [
        python, "-m", "torch.distributed.run",
        "--nnodes", rendezvous.nnodes,
        "--nproc-per-node", str(rendezvous.nproc_per_node),
        "--rdzv-backend", rendezvous.backend,
        "--rdzv-endpoint", rendezvous.endpoint,
        "--rdzv-id", rendezvous.run_id,
        "--max-restarts", "0",
        "--shutdown-timeout", str(max(1, int(shutdown_timeout + 0.999))),
    ]  # fmt: skip
    conf = []  # one --rdzv-conf: torchrun keeps only the last one given
    if rendezvous.backend == "c10d":
        conf.append("is_host=false")  # a client of the launcher's store, never its host
    if rendezvous.min_nodes is not None and rendezvous.min_nodes < rendezvous.num_nodes:
        # Short-handed: wait this long for the missing machines once the minimum is there.
        conf.append("last_call_timeout=10")
    if conf:
        command += ["--rdzv-conf", ",".join(conf)]
    if rendezvous.node_rank is not None:
        command += ["--node-rank", str(rendezvous.node_rank)]
    return [*command, *script[1:]] if script and script[0] == python else [*command, *script]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the rendezvous binds it a moment later)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def workers_of(agent_pid: int) -> list[psutil.Process]:
    """The training processes a torchrun agent started (its direct children; their own children
    are data-loader workers, which the training process stops itself)."""
    try:
        return [p for p in psutil.Process(agent_pid).children() if p.is_running()]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []
