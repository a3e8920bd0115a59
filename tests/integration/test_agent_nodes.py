"""The on-instance agent on two "machines" placed by a provisioner, with real processes.

Two agents run on this machine, each given the environment its provisioner would set (SkyPilot's
``SKYPILOT_NODE_RANK``/``SKYPILOT_NODE_IPS``/``SKYPILOT_NUM_NODES``, or Kubeflow's ``PET_*`` and
``MASTER_ADDR``/``RANK``/``WORLD_SIZE``), meeting at 127.0.0.1 through torchrun's static
rendezvous, sharing a local-folder artifact store, training ``tests/scripts/nodes_train.py``
(DDP on gloo). An interruption reaches one node — under SkyPilot a simulated spot notice
(``--simulate-preemptions 1@30``), under Kubernetes the SIGTERM a drained node's pod gets, sent to
node 0's agent once training runs; both agents must exit 75 ("run me again"), as a provisioner
needs to recover the whole job; started again, both exit 0 and the story says: succeeded, one
restart, training resumed from the checkpoint the interruption left.

Each agent runs in a PID namespace of its own (``unshare``): separate machines do not see each
other's processes, and an agent ends its attempt by killing whatever still carries the attempt's
contract — which, in one shared process table, would be the other node's workers. Where
namespaces cannot be made, these tests skip and say so.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from lightning_grid.launcher.agent import EX_PREEMPTED
from lightning_grid.launcher.nodes import free_port
from tests.helpers import REPO, child_env

pytestmark = pytest.mark.slow

SCRIPT = REPO / "tests" / "scripts" / "nodes_train.py"
NAME = "ddp-two-nodes"
ISOLATE = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--kill-child", "--mount-proc"]


@pytest.fixture(scope="module")
def isolate() -> list[str]:
    try:
        probe = subprocess.run([*ISOLATE, "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot give each agent its own process table (unshare: {exc})")
    if probe.returncode != 0:
        pytest.skip(f"cannot give each agent its own process table: {probe.stderr.strip()}")
    return ISOLATE


def skypilot_env(rank: int, port: int) -> dict[str, str]:
    """What SkyPilot sets on node ``rank`` of a ``num_nodes: 2`` task (``MASTER_PORT`` from its
    ``envs:``, as the recipe in docs/clouds.md has it)."""
    return {
        "SKYPILOT_NODE_RANK": str(rank),
        "SKYPILOT_NUM_NODES": "2",
        "SKYPILOT_NODE_IPS": "127.0.0.1\n127.0.0.1",
        "MASTER_PORT": str(port),
    }


def kubeflow_env(rank: int, port: int) -> dict[str, str]:
    """What Kubeflow's training operator sets in pod ``rank`` of a two-pod PyTorchJob."""
    return {
        "PET_NODE_RANK": str(rank),
        "PET_NNODES": "2",
        "PET_NPROC_PER_NODE": "1",
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": str(port),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": "2",
    }


def _agents(
    tmp_path: Path,
    isolate: list[str],
    provisioner,
    round_: str,
    simulate: str | None,
    sigterm: int | None,
    script: list[str] | None = None,
    options: tuple[str, ...] = (),
) -> list[tuple[int, str]]:
    """Both nodes' agents, started together as a provisioner does; their exit codes and output.
    ``simulate``: the agents' --simulate-preemptions; ``sigterm``: the node whose agent gets a
    SIGTERM once both ranks have trained a few steps (a pod on a drained node)."""
    port = free_port()
    store, ids = tmp_path / "store", tmp_path / "ids"
    ids.mkdir(exist_ok=True)
    procs = []
    for rank in (0, 1):
        workdir = tmp_path / f"node{rank}"  # each machine's own disk
        command = [
            *isolate,
            sys.executable, "-m", "lightning_grid.cli", "agent",
            "--cloud", "none", "--artifacts", str(store), "--name", NAME, "--workdir", str(workdir),
            "--num-nodes", "2", "--grace-period", "60", *options,
            *(["--simulate-preemptions", simulate] if simulate else []),
            "--", "python",
            *(script or [str(SCRIPT), "--out", str(tmp_path / "out.pt"), "--ids", str(ids), "--epochs", "20"]),
        ]  # fmt: skip
        # 20 epochs x 12 steps x 0.2 s = 48 s of training: the notice at 30 s lands inside it both
        # on an idle machine (with 8 epochs, CI's training was over before 30 s) and a loaded one.
        env = child_env(NODES_TRAIN_STEP_S="0.2", **provisioner(rank, port))
        log = open(tmp_path / f"agent{rank}-{round_}.log", "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        if sigterm is not None:
            _sigterm_once_training(procs[sigterm][0], ids, round_)
        results = []
        for proc, log in procs:
            code = proc.wait(timeout=300)
            log.close()
            results.append((code, Path(log.name).read_text()[-3000:]))
        return results
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
            log.close()


def _sigterm_once_training(isolated: subprocess.Popen, ids: Path, attempt: str, steps: int = 4) -> None:
    """SIGTERM to the agent inside ``unshare`` (its only child) once both ranks have logged
    ``steps`` training steps of ``attempt``."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        logged = [ids / f"rank{rank}-attempt{attempt}.jsonl" for rank in (0, 1)]
        if all(p.exists() and len(p.read_text().splitlines()) >= steps for p in logged):
            (agent,) = psutil.Process(isolated.pid).children()
            agent.send_signal(signal.SIGTERM)
            return
        assert isolated.poll() is None, "the agent ended before training ran"
        time.sleep(0.2)
    raise AssertionError("training did not start within 240 s")


def _status(tmp_path: Path) -> dict:
    """The story through the CLI, as a user reads it from anywhere."""
    args = [
        sys.executable,
        "-m",
        "lightning_grid.cli",
        "status",
        NAME,
        "--artifacts",
        str(tmp_path / "store"),
    ]
    shown = subprocess.run(args, env=child_env(), capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    as_json = subprocess.run([*args, "--json"], env=child_env(), capture_output=True, text=True, timeout=60)
    assert as_json.returncode == 0, as_json.stderr
    return {"text": shown.stdout, **json.loads(as_json.stdout)}


def _first_step(ids: Path, attempt: int) -> int:
    rows = [json.loads(line) for line in (ids / f"rank0-attempt{attempt}.jsonl").read_text().splitlines()]
    return int(rows[0]["step"])


@pytest.mark.parametrize(
    ("provisioner", "simulate", "sigterm", "preempted_node"),
    [(skypilot_env, "1@30", None, 1), (kubeflow_env, None, 0, 0)],
    ids=["skypilot-spot-notice-on-node-1", "kubeflow-pod-sigterm-on-node-0"],
)
def test_two_agents_survive_a_preemption(
    tmp_path: Path,
    isolate: list[str],
    provisioner,
    simulate: str | None,
    sigterm: int | None,
    preempted_node: int,
) -> None:
    first = _agents(tmp_path, isolate, provisioner, "1", simulate, sigterm)
    # One machine was interrupted; every node saved at one step and says "run me again", so the
    # provisioner recovers the job (SkyPilot: recover_on_exit_codes [75]; JobSet: a restart).
    assert [code for code, _ in first] == [EX_PREEMPTED, EX_PREEMPTED], first
    story = _status(tmp_path)
    assert story["status"] == "pending" and story["restarts"] == 1, story["text"]
    notices = [e for e in story["events"] if e["kind"] == "notice"]
    assert [e["data"].get("node", 0) for e in notices] == [preempted_node], story["text"]
    (attempt,) = story["attempts"]  # node 0's account alone: one attempt, preempted
    assert attempt["outcome"] == "preempted" and attempt["checkpoint_step"], story["text"]

    second = _agents(tmp_path, isolate, provisioner, "2", simulate, None)
    assert [code for code, _ in second] == [0, 0], second
    story = _status(tmp_path)
    assert f"{NAME}  succeeded  restarts 1" in story["text"], story["text"]
    assert [a["outcome"] for a in story["attempts"]] == ["preempted", "succeeded"], story["text"]
    # The relaunch continued from the checkpoint the preemption left, on both nodes' ranks.
    assert _first_step(tmp_path / "ids", 2) == attempt["checkpoint_step"]
    assert (tmp_path / "ids" / "rank1-attempt2.jsonl").exists()
    assert (tmp_path / "out.pt").exists()


def test_a_failure_on_node_0_ends_the_other_node_too(tmp_path: Path, isolate: list[str]) -> None:
    """Node 0's script fails at once while node 1's rank blocks (as one waiting in a collective
    for a peer that is gone does, for up to 30 minutes): node 0 decides "failed", and node 1 stops
    its workers and exits as node 0 did, within seconds, instead of running on (billed) until a
    timeout. Before, node 1 ran until killed."""
    started = time.monotonic()
    results = _agents(
        tmp_path,
        isolate,
        skypilot_env,
        "1",
        None,
        None,
        script=[str(REPO / "tests" / "scripts" / "rank0_fails.py")],
    )
    took = time.monotonic() - started
    assert [code for code, _ in results] == [1, 1], results
    story = _status(tmp_path)
    assert story["status"] == "failed" and story["restarts"] == 0, story["text"]
    assert not [e for e in story["events"] if e["kind"] == "notice"], story["text"]  # a stop, not a notice
    assert "node 0's attempt 1 is over (failed)" in story["text"], story["text"]
    print(f"node 0 failed → both agents exited after {took:.1f}s")


def test_an_elastic_job_meets_at_the_store_node_0s_agent_serves(tmp_path: Path, isolate: list[str]) -> None:
    """``--min-nodes``: c10d instead of the static rendezvous. Node 0's agent serves the store at
    the head's address for the attempt (no torchrun agent hosts it: every one is started with
    ``is_host=false``), and the other machine's torchrun reaches it there: both ranks run in one
    world of two, and the job succeeds."""
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    for rank in (0, 1):
        (ranks / f"exit-{rank}").write_text("0")  # each rank leaves as soon as it has started
    script = [str(REPO / "tests" / "scripts" / "idle_ranks.py"), str(ranks)]
    results = _agents(
        tmp_path, isolate, skypilot_env, "1", None, None, script=script, options=("--min-nodes", "1")
    )
    assert [code for code, _ in results] == [0, 0], results
    assert sorted(p.name for p in ranks.glob("ready-*")) == ["ready-0", "ready-1"]
    story = _status(tmp_path)
    assert story["status"] == "succeeded", story["text"]
    assert "c10d rendezvous" in story["text"], story["text"]
