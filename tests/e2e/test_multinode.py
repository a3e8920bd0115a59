"""Multi-node experiments under the launcher: one torchrun agent per node on 127.0.0.1 (c10d
rendezvous, gloo on CPU), real notices to one node, real SIGKILLs of a whole node.

Every test here starts several real processes per attempt (a torchrun agent and its workers per
node), so they are slow on two cores and marked so. Notices come at fixed seconds; the script is
slowed (``NODES_TRAIN_STEP_S``) so that they land in training, but a notice that lands earlier is
still a correct preemption (no checkpoint yet): the weights must match either way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from lightning_grid.launcher.registry import Registry
from tests.helpers import REPO, assert_bit_identical, child_env, grid, grid_status

SCRIPT = REPO / "tests" / "scripts" / "nodes_train.py"
STEP_S = "0.25"
pytestmark = pytest.mark.slow


def _train_args(out: Path, ids: Path, *more: str) -> list[str]:
    ids.mkdir(parents=True, exist_ok=True)
    return [str(SCRIPT), "--out", str(out), "--ids", str(ids), "--epochs", "16", "--workers", "1", *more]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """Uninterrupted runs under the launcher, one per (nodes, processes per node), made once."""
    made: dict[tuple[int, int], Path] = {}

    def get(nodes: int, nproc: int) -> Path:
        if (nodes, nproc) not in made:
            base = tmp_path_factory.mktemp(f"ref-{nodes}x{nproc}")
            out = base / "w.pt"
            proc = grid(
                base / "home",
                "run", "--resumable", "--num_nodes", str(nodes), "--nproc_per_node", str(nproc),
                *_train_args(out, base / "ids"),
            )  # fmt: skip
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            made[(nodes, nproc)] = out
        return made[(nodes, nproc)]

    return get


def _spot_run(home: Path, name: str, options: list[str], train: list[str]) -> dict:
    """``run --use_spot --resumable OPTIONS --name NAME`` to its end (the script slowed so that
    notices land in training); returns the experiment's story."""
    proc = grid(
        home, "run", "--use_spot", "--resumable", "--name", name, *options, *train, NODES_TRAIN_STEP_S=STEP_S
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return grid_status(home, name)


def _batches_by_rank(ids: Path) -> dict[int, list[tuple[int, list[int]]]]:
    rows: dict[int, list[tuple[int, list[int]]]] = {}
    for path in ids.glob("rank*-attempt*.jsonl"):
        rank = int(path.name.split("-")[0][len("rank") :])
        for line in path.read_text().splitlines():
            row = json.loads(line)
            rows.setdefault(rank, []).append((row["step"], row["ids"]))
    return {rank: sorted(found) for rank, found in rows.items()}


def _assert_same_run(reference_out: Path, out: Path, ids: Path) -> None:
    """Three or more processes: every rank trained the same samples at the same steps as the
    uninterrupted run, and the weights are bit-identical. With three or more, a sum's order
    depends on DDP's bucket layout, which the first resumed step takes from the checkpoint
    (``resumable/ddp_buckets.py``; without it: 6e-8 and 2e-7 apart)."""
    assert _batches_by_rank(ids) == _batches_by_rank(reference_out.parent / "ids")
    assert_bit_identical(reference_out, out)


def _attempts(info: dict) -> list[dict]:
    return info["attempts"]


def _events(info: dict, kind: str) -> list[dict]:
    return [e for e in info["events"] if e["kind"] == kind]


def test_notices_to_different_nodes_three_times_are_bit_identical(
    home: Path, tmp_path: Path, reference
) -> None:
    """Three spot notices, to node 1, node 0 and node 1 again: each stops the whole job at one
    step (the other node learns of it through the collective), and the final weights equal an
    uninterrupted two-node run's."""
    out = tmp_path / "w.pt"
    info = _spot_run(
        home,
        "three",
        ["--num_nodes", "2", "--simulate-preemptions", "1@20,0@20,1@20"],
        _train_args(out, tmp_path / "ids"),
    )
    assert info["status"] == "succeeded" and info["restarts"] == 3
    attempts = _attempts(info)
    for number, node in ((1, 1), (2, 0), (3, 1)):
        a = attempts[number - 1]
        assert a["outcome"] == "preempted", a
        assert a["notice_node"] == node
        rows = {n["node"]: n for n in a["nodes"]}
        assert rows[node]["outcome"] == "noticed", rows
        if a["checkpoint_step"]:  # the notice landed in training: the other node learnt of it and saved
            assert rows[1 - node]["outcome"] == "ok", rows
            assert all(n["exit_code"] == 0 for n in a["nodes"]), a["nodes"]  # every rank left with 0
        else:  # before the workers could handle it (still importing): the launcher stops the other
            assert rows[1 - node]["outcome"].startswith("stopped"), rows
    assert any(a["checkpoint_step"] for a in attempts[:3]), "no notice landed in training: slow the script"
    timings = [e["data"]["exit_after_sigterm_s"] for e in _events(info, "exit_timing")]
    print(f"2 nodes: SIGTERM → all ranks exited: {timings}")
    assert info["bill"]["node_seconds_running"] > 1.9 * info["bill"]["seconds_running"]
    assert_bit_identical(reference(2, 1), out)


def test_three_nodes_notice_to_the_last(home: Path, tmp_path: Path, reference) -> None:
    out = tmp_path / "w.pt"
    info = _spot_run(
        home,
        "three-nodes",
        ["--num_nodes", "3", "--simulate-preemptions", "2@30"],
        _train_args(out, tmp_path / "ids"),
    )
    assert info["status"] == "succeeded" and info["restarts"] == 1
    first = _attempts(info)[0]
    assert first["notice_node"] == 2 and len(first["nodes"]) == 3
    print(
        f"3 nodes: SIGTERM → all ranks exited: {[e['data']['exit_after_sigterm_s'] for e in _events(info, 'exit_timing')]}"
    )
    _assert_same_run(reference(3, 1), out, tmp_path / "ids")


def test_two_processes_per_node_notice_to_node_0(home: Path, tmp_path: Path, reference) -> None:
    out = tmp_path / "w.pt"
    info = _spot_run(
        home,
        "two-by-two",
        ["--num_nodes", "2", "--nproc_per_node", "2", "--simulate-preemptions", "0@30"],
        _train_args(out, tmp_path / "ids"),
    )
    assert info["status"] == "succeeded" and info["restarts"] == 1
    assert _attempts(info)[0]["notice_node"] == 0
    _assert_same_run(reference(2, 2), out, tmp_path / "ids")


def _node_processes(name: str, node: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        if env.get("LIGHTNING_GRID_EXPERIMENT") == name and env.get("LIGHTNING_GRID_NODE") == str(node):
            found.append(proc)
    return found


def _steps_done(ids: Path) -> int:
    rows = 0
    for path in ids.glob("rank0-attempt1.jsonl"):
        rows += len(path.read_text().splitlines())
    return rows


def test_a_node_lost_without_notice(home: Path, tmp_path: Path, reference) -> None:
    """SIGKILL of node 1's whole process tree (its torchrun agent and workers), as a machine
    that vanishes: node 0 does not hang in its collective, the attempt ends within the peers'
    grace, and the next one resumes from the newest periodic checkpoint, bit-identically."""
    out = tmp_path / "w.pt"
    ids = tmp_path / "ids"
    argv = [
        sys.executable, "-m", "lightning_grid.cli",
        "run", "--use_spot", "--resumable", "--num_nodes", "2", "--name", "lost",
        "--every_n_train_steps", "5",
        *_train_args(out, ids),
    ]  # fmt: skip
    env = child_env(LIGHTNING_GRID_HOME=str(home), NODES_TRAIN_STEP_S=STEP_S)
    launcher = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while _steps_done(ids) < 12:
            assert launcher.poll() is None and time.monotonic() < deadline, "training never got going"
            time.sleep(0.2)
        victims = _node_processes("lost", 1)
        assert victims, "node 1 has no processes"
        killed_at = time.monotonic()
        for victim in victims:
            victim.send_signal(signal.SIGKILL)
        registry = Registry(str(home))
        while len(registry.attempts("lost")) < 2 and not registry.get("lost").status.is_terminal():
            assert time.monotonic() - killed_at < 120, "the surviving node hangs"
            time.sleep(0.1)
        stopped_after = time.monotonic() - killed_at
        output, _ = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, output[-3000:]
    info = grid_status(home, "lost")
    first = _attempts(info)[0]
    assert first["outcome"] == "killed" and "node 1 lost without notice" in first["reason"], first
    rows = {n["node"]: n for n in first["nodes"]}
    assert rows[1]["outcome"] == "lost (no notice)" and rows[1]["exit_code"] == -signal.SIGKILL
    assert info["status"] == "succeeded" and info["restarts"] == 1
    print(f"node 1 SIGKILLed → attempt over in {stopped_after:.1f}s; steps redone {first['steps_redone']}")
    assert first["steps_redone"] is not None  # the progress note past the newest periodic checkpoint
    assert_bit_identical(reference(2, 1), out)


def _agents(launcher: psutil.Process) -> dict[int, psutil.Process]:
    """The launcher's torchrun agents, by node."""
    found = {}
    for child in launcher.children():
        try:
            if "torch.distributed.run" in child.cmdline():
                found[int(child.environ()["LIGHTNING_GRID_NODE"])] = child
        except (psutil.Error, KeyError):
            continue
    return found


def _hosts_the_rendezvous(agent: psutil.Process) -> bool:
    """Whether this agent (or a process of its) listens on its own ``--rdzv-endpoint``."""
    command = agent.cmdline()
    port = int(command[command.index("--rdzv-endpoint") + 1].rsplit(":", 1)[1])
    for proc in [agent, *agent.children(recursive=True)]:
        try:
            if any(
                c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in proc.net_connections("tcp")
            ):
                return True
        except psutil.Error:
            continue
    return False


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE  # exited; its parent, stopped, has not reaped it
    except psutil.NoSuchProcess:
        return True


def test_a_lost_node_takes_no_rendezvous_with_it(home: Path, tmp_path: Path) -> None:
    """The c10d rendezvous's store outlives every node's agent. A node's machine is lost while the
    launcher is descheduled for a few seconds (CI's two busy cores did that): when it looks again,
    the other node's agent still runs, so the attempt is judged as what it was — node V lost
    without notice, the others stopped: *killed*, and relaunched.

    With the store hosted by an agent (torchrun's own c10d: the first to bind the endpoint), a lost
    node that held it took it along: the other agent failed at its next tick in
    ``num_nodes_waiting()`` (RendezvousConnectionError, exit 1), and the launcher, seeing both
    nodes ended at once, judged the attempt *failed* and ended the experiment. The node lost here is
    the one whose agent hosts the store if any does, so that this test fails every time without the
    fix. The ranks run no collective (``idle_ranks.py``): ranks that do not notice the loss at once
    themselves, as NCCL's (which hang), or ranks in a long save."""
    ready = tmp_path / "ready"
    ready.mkdir()
    argv = [
        sys.executable, "-m", "lightning_grid.cli",
        "run", "--use_spot", "--num_nodes", "2", "--name", "outlived", "--grace-period", "30",
        str(REPO / "tests" / "scripts" / "idle_ranks.py"), str(ready),
    ]  # fmt: skip
    env = child_env(LIGHTNING_GRID_HOME=str(home))
    launcher = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not all((ready / f"ready-{rank}").exists() for rank in (0, 1)):
            assert launcher.poll() is None and time.monotonic() < deadline, "the ranks never started"
            time.sleep(0.2)
        agents = _agents(psutil.Process(launcher.pid))
        assert sorted(agents) == [0, 1], agents
        lost = next((node for node, agent in agents.items() if _hosts_the_rendezvous(agent)), 1)
        other = agents[1 - lost]
        launcher.send_signal(signal.SIGSTOP)
        try:
            for proc in [agents[lost], *agents[lost].children(recursive=True)]:
                proc.kill()
            settled = time.monotonic() + 10  # the other agent's store reads: one every 0.1 s
            while not _gone(other) and time.monotonic() < settled:
                time.sleep(0.1)
        finally:
            launcher.send_signal(signal.SIGCONT)
        output, _ = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    info = grid_status(home, "outlived")
    first = _attempts(info)[0]
    assert first["outcome"] == "killed" and f"node {lost} lost without notice" in first["reason"], (
        first,
        output[-3000:],
    )
    rows = {n["node"]: n for n in first["nodes"]}
    assert rows[lost]["outcome"] == "lost (no notice)" and rows[lost]["exit_code"] == -signal.SIGKILL
    assert rows[1 - lost]["outcome"] == "stopped (a peer could not go on)", rows
    assert "RendezvousConnectionError" not in (home / "runs" / "outlived" / "attempt-1.log").read_text()
    assert launcher.returncode == 0 and info["status"] == "succeeded" and info["restarts"] == 1, output[
        -3000:
    ]


def test_a_save_slower_than_torchruns_shutdown_timeout(home: Path, tmp_path: Path) -> None:
    """torchrun kills its workers 30 s after it is told to stop; the notice's window is the
    launcher's (120 s here): a 35 s save completes and every rank exits 0."""
    out = tmp_path / "w.pt"
    info = _spot_run(
        home,
        "slow-save",
        ["--num_nodes", "2", "--simulate-preemptions", "1@25", "--grace-period", "120"],
        _train_args(out, tmp_path / "ids", "--slow-save", "35"),
    )
    first = _attempts(info)[0]
    assert first["outcome"] == "preempted" and first["checkpoint_step"], first
    exit_after = _events(info, "exit_timing")[0]["data"]["exit_after_sigterm_s"]
    assert 35 <= exit_after < 120, exit_after
    assert info["status"] == "succeeded"


def _trained(ids: Path) -> dict[int, Counter]:
    per_epoch: dict[int, Counter] = {}
    for path in ids.glob("rank*-attempt*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            per_epoch.setdefault(row["epoch"], Counter()).update(row["ids"])
    return per_epoch


def test_sigterm_to_the_launcher_stops_every_node(home: Path, tmp_path: Path, reference) -> None:
    """This machine's own shutdown (SIGTERM to the launcher) reaches every node at once; the
    experiment waits in pending and `run --resume` finishes it, bit-identically."""
    out = tmp_path / "w.pt"
    ids = tmp_path / "ids"
    argv = [
        sys.executable, "-m", "lightning_grid.cli",
        "run", "--use_spot", "--resumable", "--num_nodes", "2", "--name", "both",
        *_train_args(out, ids),
    ]  # fmt: skip
    env = child_env(LIGHTNING_GRID_HOME=str(home), NODES_TRAIN_STEP_S=STEP_S)
    launcher = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while _steps_done(ids) < 8:
        assert launcher.poll() is None and time.monotonic() < deadline, "training never got going"
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)
    output, _ = launcher.communicate(timeout=300)
    info = grid_status(home, "both")
    assert info["status"] == "pending", output[-3000:]
    first = _attempts(info)[0]
    assert first["notice_node"] is None and {n["outcome"] for n in first["nodes"]} == {"noticed"}
    assert first["checkpoint_step"], first
    proc = grid(home, "run", "--resume", "both", NODES_TRAIN_STEP_S="0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_bit_identical(reference(2, 1), out)
    assert all(set(c.values()) == {1} for c in _trained(ids).values())  # nothing trained twice


def test_capacity_comes_back_short_and_the_job_goes_on_with_one_node(home: Path, tmp_path: Path) -> None:
    """Spot capacity for the second attempt is one machine: with --min_nodes 1 torchrun starts
    short-handed, the rest of the interrupted epoch is re-sharded over the one process, and every
    sample of every epoch is trained exactly once."""
    out, ids = tmp_path / "w.pt", tmp_path / "ids"
    info = _spot_run(
        home,
        "short",
        [
            "--num_nodes",
            "2",
            "--min_nodes",
            "1",
            "--simulate-capacity",
            "2,1",
            "--simulate-preemptions",
            "1@25",
        ],
        _train_args(out, ids),
    )
    assert info["status"] == "succeeded" and info["restarts"] == 1
    first, second = _attempts(info)
    assert len(first["nodes"]) == 2 and len(second["nodes"]) == 1, (first["nodes"], second["nodes"])
    assert any("going on short-handed" in e["reason"] for e in info["events"])
    trained = _trained(ids)
    assert sorted(trained) == list(range(16))
    for epoch, counts in trained.items():
        assert set(counts) == set(range(96)) and set(counts.values()) == {1}, (epoch, counts)
    log = (home / "runs" / "short" / "attempt-2.log").read_text()
    assert first["checkpoint_step"] is None or "re-sharded" in log


def test_without_min_nodes_a_short_capacity_waits_in_pending(home: Path, tmp_path: Path, reference) -> None:
    out = tmp_path / "w.pt"
    info = _spot_run(
        home,
        "waits",
        ["--num_nodes", "2", "--simulate-capacity", "2,1,1", "--simulate-preemptions", "0@25"],
        _train_args(out, tmp_path / "ids"),
    )
    waits = [e for e in info["events"] if "at least 2 needed: waiting (pending)" in e["reason"]]
    assert len(waits) == 2 and info["restarts"] == 1 and len(_attempts(info)) == 2
    assert all(len(a["nodes"]) == 2 for a in _attempts(info))
    assert_bit_identical(reference(2, 1), out)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_one_node_all_gpus_nccl(home: Path, tmp_path: Path) -> None:
    import torch

    gpus = torch.cuda.device_count()
    out = tmp_path / "w.pt"
    proc = grid(
        home,
        "run", "--use_spot", "--resumable", "--nproc_per_node", str(gpus), "--name", "gpus",
        "--simulate-preemptions", "25",
        *_train_args(out, tmp_path / "ids", "--accelerator", "gpu"),
        NODES_TRAIN_STEP_S=STEP_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert grid_status(home, "gpus")["status"] == "succeeded"
    assert os.path.exists(out)
