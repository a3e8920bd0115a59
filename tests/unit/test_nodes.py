"""Multi-node pieces that need no torchrun: the options, torchrun's command line, the supervisor's
treatment of a notice to one node and of a node that dies, and how an attempt is judged."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

from lightning_grid.errors import UsageError
from lightning_grid.launcher.attempt import conclude
from lightning_grid.launcher.experiment import Outcome
from lightning_grid.launcher.nodes import Rendezvous, torchrun_command
from lightning_grid.launcher.notices import Notice, notice_sources, simulated_node
from lightning_grid.launcher.spec import Spec, parse_simulation, simulation_text
from lightning_grid.launcher.supervisor import PEER_GRACE_S, AttemptResult, Launch, NodeResult, run_attempt


def test_simulation_targets_nodes() -> None:
    assert parse_simulation("8, 1@20") == ((8.0, 20.0), (-1, 1))
    assert parse_simulation("8,20") == ((8.0, 20.0), ())  # single-machine specs stay as they were
    spec = Spec(script="t.py", num_nodes=2, simulate_preemptions=(8.0, 20.0), simulate_nodes=(-1, 1))
    assert parse_simulation(simulation_text(spec)) == ((8.0, 20.0), (-1, 1))
    for bad in ("x@5", "1@", "-2@5", "1@-1"):
        with pytest.raises(UsageError, match="--simulate-preemptions"):
            parse_simulation(bad)


def test_a_random_node_is_one_of_them_and_replayable() -> None:
    spec = Spec(script="t.py", name="e", num_nodes=3, use_spot=True, simulate_preemptions=(5.0, 5.0))
    picks = [simulated_node(spec, n) for n in (1, 2)]
    assert all(0 <= p < 3 for p in picks) and picks == [simulated_node(spec, n) for n in (1, 2)]
    assert simulated_node(Spec(script="t.py", simulate_preemptions=(5.0,)), 1) is None


def test_a_simulated_notice_for_another_machine_is_not_delivered_here() -> None:
    spec = Spec(script="t.py", use_spot=True, num_nodes=2, simulate_preemptions=(0.0,), simulate_nodes=(1,))
    here = notice_sources(spec, 1, signals=_Quiet(), nodes=(0,))[0]
    there = notice_sources(spec, 1, signals=_Quiet(), nodes=(1,))[0]
    everywhere = notice_sources(spec, 1, signals=_Quiet(), nodes=(0, 1))[0]
    assert here.poll() is None
    notice = there.poll()
    assert notice is not None and notice.node is None  # its machine's only node: all of it
    notice = everywhere.poll()
    assert notice is not None and notice.node == 1


class _Quiet:
    def poll(self) -> Notice | None:
        return None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_nodes": 2, "min_nodes": 3}, "--min-nodes 3 is more than --num-nodes 2"),
        ({"num_nodes": 0}, "--num-nodes must be >= 1"),
        ({"nproc_per_node": 0}, "--nproc-per-node must be >= 1"),
        ({"simulate_preemptions": (1.0,), "simulate_nodes": (1,)}, "names node 1"),
        ({"simulate_preemptions": (1.0,), "simulate_nodes": (0, 1)}, "one node per simulated"),
        ({"backend": "slurm", "num_nodes": 2, "min_nodes": 1}, "does not run short-handed"),
    ],
)
def test_node_options_are_checked(changes: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        Spec(script="t.py", **changes).validated()


def test_specs_stored_before_the_rename_still_load() -> None:
    spec = Spec.from_mapping({"script": "t.py", "nodes": 1, "backend": "slurm"})
    assert spec.num_nodes == 1 and not spec.distributed
    assert Spec(script="t.py", nproc_per_node=2).distributed
    assert Spec(script="t.py").capacity_changes(Spec(script="t.py", num_nodes=2, retries=3)) == {
        "num_nodes": 2
    }


def test_torchrun_command() -> None:
    rdzv = Rendezvous("127.0.0.1:29500", "exp-1", num_nodes=3, nproc_per_node=2, min_nodes=2)
    command = torchrun_command("/py", ["/py", "train.py", "--lr", "1"], rdzv, shutdown_timeout=120.5)
    assert command[:3] == ["/py", "-m", "torch.distributed.run"]
    assert command[-3:] == ["train.py", "--lr", "1"]
    flags = dict(zip(command[3:-3:2], command[4:-3:2], strict=False))
    assert flags["--nnodes"] == "2:3" and flags["--nproc-per-node"] == "2"
    assert flags["--rdzv-backend"] == "c10d" and flags["--rdzv-endpoint"] == "127.0.0.1:29500"
    assert flags["--max-restarts"] == "0" and flags["--shutdown-timeout"] == "121"  # the window, not 30 s
    # One --rdzv-conf (torchrun keeps the last): a client of the launcher's store, short-handed after 10 s.
    assert command.count("--rdzv-conf") == 1 and flags["--rdzv-conf"] == "is_host=false,last_call_timeout=10"
    fixed = torchrun_command("/py", ["x.py"], Rendezvous("h:1", "r", 2, 1), 30)
    assert "--nnodes" in fixed and fixed[fixed.index("--rdzv-conf") + 1] == "is_host=false"
    static = Rendezvous("h:1", "r", 2, 1, node_rank=0, backend="static")  # node 0's torchrun hosts it
    assert "--rdzv-conf" not in torchrun_command("/py", ["x.py"], static, 30)


# -- the supervisor with plain processes standing in for nodes -----------------------------------
NODE = """
import os, signal, sys, time
here, node = sys.argv[1], sys.argv[2]
def on_term(*_):
    open(os.path.join(here, f"term{node}"), "w").close()
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open(os.path.join(here, f"up{node}"), "w").close()
mode = sys.argv[3]
deadline = time.time() + 30
while time.time() < deadline:
    if mode == "follow" and os.path.exists(os.path.join(here, "term1")):
        sys.exit(0)  # a peer's notice, learnt as ranks learn it (here: through a file)
    if mode == "die" and os.path.exists(os.path.join(here, "up0")):
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "fail" and os.path.exists(os.path.join(here, "up0")):
        sys.exit(3)
    if mode == "hang":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stuck in a collective: deaf to SIGTERM
    time.sleep(0.05)
sys.exit(9)
"""


class _After:
    """A notice for one node once every node is up."""

    def __init__(self, folder: Path, count: int, node: int | None) -> None:
        self.folder, self.count, self.node = folder, count, node

    def poll(self) -> Notice | None:
        if all((self.folder / f"up{i}").exists() for i in range(self.count)):
            return Notice("simulator", "test", node=self.node)
        return None


def _run(tmp_path: Path, modes: list[str], notices: list, grace: float = 20.0) -> AttemptResult:
    script = tmp_path / "node.py"
    script.write_text(NODE)
    launches = [
        Launch([sys.executable, str(script), str(tmp_path), str(i), mode], env={"PATH": "/usr/bin:/bin"})
        for i, mode in enumerate(modes)
    ]
    return run_attempt(
        launches,
        cwd=str(tmp_path),
        env=None,
        log_path=str(tmp_path / "log"),
        notices=notices,
        grace_period=grace,
        stop_requested=lambda: False,
        on_start=lambda pid: None,
        on_notice=lambda n, w: None,
        echo=False,
        poll_s=0.02,
    )


def test_a_notice_to_one_node_reaches_that_node_only(tmp_path: Path) -> None:
    result = _run(tmp_path, ["follow", "wait"], [_After(tmp_path, 2, node=1)])
    assert (tmp_path / "term1").exists() and not (tmp_path / "term0").exists()
    assert result.exit_code == 0 and not result.killed_after_grace
    assert [(n.node, n.noticed, n.exit_code) for n in result.nodes] == [(0, False, 0), (1, True, 0)]
    assert not any(n.stopped for n in result.nodes)


def test_a_node_killed_without_notice_ends_the_attempt_at_once(tmp_path: Path) -> None:
    started = time.monotonic()
    result = _run(tmp_path, ["wait", "die"], [])
    assert time.monotonic() - started < 15
    assert result.lost_node == 1 and result.failed_node is None
    assert result.nodes[1].lost and result.nodes[1].exit_code == -signal.SIGKILL
    assert (tmp_path / "term0").exists() and result.nodes[0].stopped  # the survivor was told to stop
    outcome, reason = conclude(result, None, False, resumable=True, grace_period=20.0)
    assert outcome is Outcome.KILLED and "node 1 lost without notice" in reason


def test_survivors_deaf_to_sigterm_are_killed_after_the_peer_grace(tmp_path: Path) -> None:
    started = time.monotonic()
    result = _run(tmp_path, ["hang", "die"], [], grace=120.0)
    took = time.monotonic() - started
    assert PEER_GRACE_S <= took < PEER_GRACE_S + 10, took  # not the 120 s of a notice's window
    assert result.nodes[0].exit_code == -signal.SIGKILL and not result.nodes[0].lost


def test_a_failing_node_is_a_failure_of_the_attempt(tmp_path: Path) -> None:
    result = _run(tmp_path, ["wait", "fail"], [])
    assert result.failed_node == 1 and result.lost_node is None and result.exit_code == 3
    outcome, reason = conclude(result, None, False, resumable=True, grace_period=20.0)
    assert outcome is Outcome.FAILED and reason.startswith("node 1 exited 3")


def test_a_peers_preemption_is_a_preemption_here() -> None:
    """Under an agent, the node without the notice sees its ranks save and exit 0: the marker the
    job's rank 0 wrote says why."""
    result = AttemptResult(
        exit_code=0, notice=None, notice_at=None, sigterm_after_notice_s=None, exit_after_sigterm_s=None,
        killed_after_grace=False, stopped=False, seconds=1.0,
        nodes=(NodeResult(0, 1, 0, noticed=False, lost=False),),
    )  # fmt: skip
    outcome, reason = conclude(result, {"step": 7, "left_at": 7}, False, resumable=True, grace_period=1.0)
    assert outcome is Outcome.PREEMPTED and "step 7" in reason
    assert conclude(result, None, True, resumable=True, grace_period=1.0)[0] is Outcome.SUCCEEDED


@pytest.mark.parametrize("source", ["slurm", "launcher"])
def test_a_signal_that_came_as_the_script_left_on_it_is_a_notice_not_a_finish(
    tmp_path: Path, source: str
) -> None:
    """SLURM signals every process of the job step at once; a script that saves and leaves at once
    (exit 0) can be gone before the supervisor's next poll. Here the script signals the launcher
    (this process) itself and exits 0 in the middle of a long poll interval, so the supervisor
    first sees the exit: the attempt must still be a preemption (SLURM requeues it), not a
    success that ends the job. Before: ``notice=None`` and, by ``conclude``, "succeeded"."""
    from lightning_grid.launcher.notices import LauncherSignals, SlurmSignals

    signals = LauncherSignals()
    signals.install()
    try:
        notices = [SlurmSignals(signals, 30.0, "42")] if source == "slurm" else [signals]
        script = tmp_path / "leave.py"
        script.write_text("import os, signal, time\ntime.sleep(0.5)\nos.kill(os.getppid(), signal.SIGTERM)\n")
        result = run_attempt(
            [sys.executable, str(script)],
            cwd=str(tmp_path),
            env={"PATH": "/usr/bin:/bin"},
            log_path=str(tmp_path / "log"),
            notices=notices,
            grace_period=30.0,
            stop_requested=lambda: False,
            on_start=lambda pid: None,
            on_notice=lambda n, w: None,
            echo=False,
            poll_s=3.0,  # the script signals and ends within the first interval
        )
    finally:
        signals.uninstall()
    assert signals.received is signal.SIGTERM and result.exit_code == 0
    assert result.notice is not None and result.notice.source == source, result
    assert result.exit_after_sigterm_s is None  # the launcher sent nothing: the script was gone
    outcome, reason = conclude(result, marker=None, completed=False, resumable=True, grace_period=30.0)
    assert outcome is Outcome.PREEMPTED, reason
