"""Where this machine sits in a multi-node job, as the provisioner that started it says.

A provisioner that starts N machines for one job tells each which it is and where the first one
is, each in its own words. :func:`placement` reads them into one :class:`Placement`:

=================  ==========================================================================
``skypilot``       ``SKYPILOT_NODE_RANK``, ``SKYPILOT_NUM_NODES``, ``SKYPILOT_NODE_IPS`` (one IP
                   a line, the head node's first). No port: ``MASTER_PORT`` if set (SkyPilot's
                   own torchrun examples pass one), else torchrun's default, 29500.
``kubeflow``       Kubeflow's PyTorchJob (training-operator v1) and TrainJob (Trainer v2):
                   ``PET_NODE_RANK``, ``PET_NNODES`` (``N`` or ``MIN:MAX``), ``PET_MASTER_ADDR``,
                   ``PET_MASTER_PORT`` — torchrun's own defaults for its options — or, from older
                   operators, ``RANK`` (the pod's index, master 0), ``WORLD_SIZE`` (the pods),
                   ``MASTER_ADDR``, ``MASTER_PORT``.
``jobset``         A JobSet's indexed Job: ``JOB_COMPLETION_INDEX`` (set by Kubernetes), and
                   ``JOBSET_NAME``, ``REPLICATED_JOB_NAME`` (from the pod's annotations through
                   the downward API). The head is pod 0 of Job 0, reachable by its hostname:
                   ``<jobset>-<replicated job>-0-0.<subdomain>`` (the subdomain is the JobSet's
                   name unless ``JOBSET_SUBDOMAIN`` says otherwise). The node count is not in
                   the environment: it comes from ``--num-nodes``.
``slurm``          ``SLURM_NODEID``, ``SLURM_JOB_NUM_NODES``, ``SLURM_JOB_NODELIST`` (its first
                   host, through ``scontrol show hostnames``). Read only when asked: a batch
                   script runs on the first node alone, so the variables there do not mean an
                   agent runs on every node.
=================  ==========================================================================

Pure: the environment is a mapping passed in (the SLURM host list's expansion is the one
subprocess, and it is injectable), and every inconsistency is a one-line :class:`UsageError`
naming the variables.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from lightning_grid.errors import UsageError

__all__ = ["Placement", "placement", "DEFAULT_PORT", "SOURCES"]

#: torchrun's default ``--master-port``: the rendezvous port when the provisioner names none.
DEFAULT_PORT = 29500
#: Every provisioner :func:`placement` knows, in the order it looks for them.
SOURCES = ("skypilot", "kubeflow", "jobset", "slurm")


@dataclass(frozen=True)
class Placement:
    """One machine's place in a multi-node job."""

    node_rank: int  # 0 is the head: it hosts the rendezvous and owns the experiment's story
    num_nodes: int | None  # None: the provisioner does not say (a JobSet: --num-nodes does)
    head_address: str  # where node 0 is reachable from every node
    port: int | None  # the rendezvous port the provisioner names (None: the agent's default)
    source: str  # which provisioner said so (one of SOURCES)
    min_nodes: int | None = None  # an elastic job's lower bound (Kubeflow's PET_NNODES=MIN:MAX)

    @property
    def endpoint(self) -> str:
        """``host:port`` of the rendezvous (IPv6 addresses in brackets, as torchrun parses them)."""
        host = f"[{self.head_address}]" if ":" in self.head_address else self.head_address
        return f"{host}:{self.port or DEFAULT_PORT}"


def placement(
    env: Mapping[str, str],
    *,
    slurm: bool = False,
    hostnames: Callable[[str], list[str]] | None = None,
) -> Placement | None:
    """The placement the environment describes, or None when no provisioner placed this machine.
    ``slurm`` also reads SLURM's variables (off by default: see the module's note);
    ``hostnames`` expands a SLURM host list (default: ``scontrol show hostnames``)."""
    if _given(env, "SKYPILOT_NODE_RANK"):
        return _skypilot(env)
    if _given(env, "PET_NODE_RANK") or (_given(env, "RANK") and _given(env, "MASTER_ADDR")):
        return _kubeflow(env)
    if _given(env, "JOBSET_NAME") and _given(env, "JOB_COMPLETION_INDEX"):
        return _jobset(env)
    if slurm and _given(env, "SLURM_NODEID"):
        return _slurm(env, hostnames or _scontrol_hostnames)
    return None


# -- one reader per provisioner --------------------------------------------------------------------
def _skypilot(env: Mapping[str, str]) -> Placement:
    rank = _index(env, "SKYPILOT_NODE_RANK")
    ips = [line.strip() for line in env.get("SKYPILOT_NODE_IPS", "").splitlines() if line.strip()]
    count = _count(env, "SKYPILOT_NUM_NODES") if _given(env, "SKYPILOT_NUM_NODES") else len(ips)
    if not ips:
        raise UsageError("SKYPILOT_NODE_RANK is set but SKYPILOT_NODE_IPS is empty: no head node address")
    if len(ips) != count:
        raise UsageError(
            f"SKYPILOT_NUM_NODES={count} but SKYPILOT_NODE_IPS lists {len(ips)} address(es): {', '.join(ips)}"
        )
    _check_rank(rank, count, "SKYPILOT_NODE_RANK", "SKYPILOT_NUM_NODES")
    return Placement(rank, count, ips[0], _port(env, "MASTER_PORT"), "skypilot")


def _kubeflow(env: Mapping[str, str]) -> Placement:
    rank_name = "PET_NODE_RANK" if _given(env, "PET_NODE_RANK") else "RANK"
    rank = _index(env, rank_name)
    head_name = "PET_MASTER_ADDR" if _given(env, "PET_MASTER_ADDR") else "MASTER_ADDR"
    head = env.get(head_name, "").strip()
    if not head:
        raise UsageError(
            f"{rank_name} is set but neither PET_MASTER_ADDR nor MASTER_ADDR: no head node address"
        )
    low: int | None = None
    if _given(env, "PET_NNODES"):
        count_name = "PET_NNODES"
        low, count = _nnodes(env["PET_NNODES"])
    elif _given(env, "WORLD_SIZE"):  # operators before PET_NNODES: one process per pod
        count_name = "WORLD_SIZE"
        count = _count(env, "WORLD_SIZE")
    else:
        raise UsageError(f"{rank_name} is set but neither PET_NNODES nor WORLD_SIZE: how many nodes?")
    _check_rank(rank, count, rank_name, count_name)
    port_name = "PET_MASTER_PORT" if _given(env, "PET_MASTER_PORT") else "MASTER_PORT"
    return Placement(rank, count, head, _port(env, port_name), "kubeflow", low if low != count else None)


def _jobset(env: Mapping[str, str]) -> Placement:
    rank = _index(env, "JOB_COMPLETION_INDEX")
    if _given(env, "JOB_INDEX") and _index(env, "JOB_INDEX") != 0:
        raise UsageError(
            f"JOB_INDEX={env['JOB_INDEX'].strip()}: the agent runs one Job of N pods per JobSet"
            " (replicas: 1, parallelism = completions = N)"
        )
    jobset, job = env["JOBSET_NAME"].strip(), env.get("REPLICATED_JOB_NAME", "").strip()
    if not job:
        raise UsageError("JOBSET_NAME is set but REPLICATED_JOB_NAME is not: cannot name the head pod")
    subdomain = env.get("JOBSET_SUBDOMAIN", "").strip() or jobset
    return Placement(rank, None, f"{jobset}-{job}-0-0.{subdomain}", _port(env, "MASTER_PORT"), "jobset")


def _slurm(env: Mapping[str, str], hostnames: Callable[[str], list[str]]) -> Placement:
    rank = _index(env, "SLURM_NODEID")
    count_name = "SLURM_JOB_NUM_NODES" if _given(env, "SLURM_JOB_NUM_NODES") else "SLURM_NNODES"
    if not _given(env, count_name):
        raise UsageError("SLURM_NODEID is set but neither SLURM_JOB_NUM_NODES nor SLURM_NNODES")
    count = _count(env, count_name)
    _check_rank(rank, count, "SLURM_NODEID", count_name)
    nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")).strip()
    hosts = hostnames(nodelist) if nodelist else []
    if not hosts:
        raise UsageError("SLURM_NODEID is set but SLURM_JOB_NODELIST names no host: no head node address")
    return Placement(rank, count, hosts[0], _port(env, "MASTER_PORT"), "slurm")


# -- parsing, one message per mistake --------------------------------------------------------------
def _given(env: Mapping[str, str], name: str) -> bool:
    return bool(env.get(name, "").strip())


def _index(env: Mapping[str, str], name: str) -> int:
    text = env.get(name, "").strip()
    if not text.isdigit():
        raise UsageError(f"{name} must be a whole number >= 0, got {text!r}")
    return int(text)


def _count(env: Mapping[str, str], name: str) -> int:
    value = _index(env, name)
    if value < 1:
        raise UsageError(f"{name} must be at least 1, got {value}")
    return value


def _nnodes(text: str) -> tuple[int | None, int]:
    """``"4"`` → ``(None, 4)``; ``"2:4"`` → ``(2, 4)`` (torchrun's ``--nnodes``)."""
    low, colon, high = text.strip().partition(":")
    if not colon:
        return None, _count({"PET_NNODES": low}, "PET_NNODES")
    if not (low.isdigit() and high.isdigit()) or not 1 <= int(low) <= int(high):
        raise UsageError(f"PET_NNODES must be N or MIN:MAX with 1 <= MIN <= MAX, got {text.strip()!r}")
    return int(low), int(high)


def _port(env: Mapping[str, str], name: str) -> int | None:
    text = env.get(name, "").strip()
    if not text:
        return None
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise UsageError(f"{name} must be a TCP port (1-65535), got {text!r}")
    return int(text)


def _check_rank(rank: int, count: int, rank_name: str, count_name: str) -> None:
    if rank >= count:
        raise UsageError(f"{rank_name}={rank} but {count_name}={count}: node ranks go 0..{count - 1}")


_RANGE = re.compile(r"^(?P<prefix>[^\[,]+)(?:\[(?P<ranges>[^\]]+)\])?")


def _scontrol_hostnames(nodelist: str) -> list[str]:
    """SLURM's own expansion of a host list; where ``scontrol`` is missing, the first entry's
    common form (``node[03-05,9]`` → ``node03``…)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return out.stdout.split()
    except (OSError, subprocess.SubprocessError):
        match = _RANGE.match(nodelist)
        if match is None:
            return []
        prefix, ranges = match.group("prefix"), match.group("ranges")
        if not ranges:
            return [prefix]
        first = ranges.split(",")[0].split("-")[0]
        return [f"{prefix}{first}"]
