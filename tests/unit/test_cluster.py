"""Where a provisioner put this machine (``launcher/cluster.py``), and how the agent turns that into
its part of a multi-node attempt: one table of environments per provisioner, one of mistakes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_grid.errors import StoreError, UsageError
from lightning_grid.launcher import agent as agent_mod
from lightning_grid.launcher.cluster import DEFAULT_PORT, Placement, placement
from lightning_grid.launcher.layout import StoreLayout
from lightning_grid.launcher.nodes import Rendezvous, torchrun_command
from lightning_grid.launcher.spec import Spec

IPS = "10.0.0.5\n10.0.0.6\n10.0.0.7"

# (case, environment, expected placement)
PLACEMENTS = [
    (
        "skypilot head",
        {"SKYPILOT_NODE_RANK": "0", "SKYPILOT_NUM_NODES": "3", "SKYPILOT_NODE_IPS": IPS},
        Placement(0, 3, "10.0.0.5", None, "skypilot"),
    ),
    (
        "skypilot worker, a port in envs, a trailing newline",
        {
            "SKYPILOT_NODE_RANK": "2",
            "SKYPILOT_NUM_NODES": "3",
            "SKYPILOT_NODE_IPS": IPS + "\n",
            "MASTER_PORT": "8008",
        },
        Placement(2, 3, "10.0.0.5", 8008, "skypilot"),
    ),
    (
        "skypilot single node",
        {"SKYPILOT_NODE_RANK": "0", "SKYPILOT_NUM_NODES": "1", "SKYPILOT_NODE_IPS": "10.0.0.5"},
        Placement(0, 1, "10.0.0.5", None, "skypilot"),
    ),
    (
        "kubeflow PyTorchJob (PET_ variables win over RANK/WORLD_SIZE, which count processes)",
        {
            "PET_NODE_RANK": "1",
            "PET_NNODES": "2",
            "PET_NPROC_PER_NODE": "4",
            "RANK": "1",
            "WORLD_SIZE": "8",
            "MASTER_ADDR": "train-master-0",
            "MASTER_PORT": "23456",
        },
        Placement(1, 2, "train-master-0", 23456, "kubeflow"),
    ),
    (
        "kubeflow TrainJob (Trainer v2: PET_ only, also inside a JobSet)",
        {
            "PET_NODE_RANK": "0",
            "PET_NNODES": "4",
            "PET_MASTER_ADDR": "mnist-node-0-0.mnist",
            "PET_MASTER_PORT": "29400",
            "JOB_COMPLETION_INDEX": "0",
            "JOBSET_NAME": "mnist",
            "REPLICATED_JOB_NAME": "node",
        },
        Placement(0, 4, "mnist-node-0-0.mnist", 29400, "kubeflow"),
    ),
    (
        "kubeflow elastic (PET_NNODES=MIN:MAX)",
        {"PET_NODE_RANK": "1", "PET_NNODES": "2:4", "MASTER_ADDR": "head", "MASTER_PORT": "1234"},
        Placement(1, 4, "head", 1234, "kubeflow", min_nodes=2),
    ),
    (
        "older PyTorchJob (RANK = pod index, WORLD_SIZE = pods)",
        {"RANK": "2", "WORLD_SIZE": "3", "MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456"},
        Placement(2, 3, "job-master-0", 23456, "kubeflow"),
    ),
    (
        "jobset (the node count comes from --num-nodes)",
        {"JOB_COMPLETION_INDEX": "1", "JOBSET_NAME": "mnist", "REPLICATED_JOB_NAME": "node"},
        Placement(1, None, "mnist-node-0-0.mnist", None, "jobset"),
    ),
    (
        "jobset with its own subdomain and port",
        {
            "JOB_COMPLETION_INDEX": "0",
            "JOB_INDEX": "0",
            "JOBSET_NAME": "mnist",
            "REPLICATED_JOB_NAME": "node",
            "JOBSET_SUBDOMAIN": "net",
            "MASTER_PORT": "3389",
        },
        Placement(0, None, "mnist-node-0-0.net", 3389, "jobset"),
    ),
    ("nothing: one machine", {"PATH": "/bin", "WORLD_SIZE": "4"}, None),
    ("SLURM is not read unless asked", {"SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "2"}, None),
]


@pytest.mark.parametrize(("case", "env", "expected"), PLACEMENTS, ids=[p[0] for p in PLACEMENTS])
def test_placement(case: str, env: dict[str, str], expected: Placement | None) -> None:
    assert placement(env) == expected


# (case, environment, a fragment of the one-line error)
MISTAKES = [
    ("rank past the count", {"SKYPILOT_NODE_RANK": "3", "SKYPILOT_NUM_NODES": "3", "SKYPILOT_NODE_IPS": IPS},
     "SKYPILOT_NODE_RANK=3 but SKYPILOT_NUM_NODES=3: node ranks go 0..2"),
    ("no addresses", {"SKYPILOT_NODE_RANK": "0", "SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_IPS": ""},
     "SKYPILOT_NODE_IPS is empty"),
    ("addresses and count disagree", {"SKYPILOT_NODE_RANK": "0", "SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_IPS": IPS},
     "SKYPILOT_NUM_NODES=2 but SKYPILOT_NODE_IPS lists 3"),
    ("a rank that is not a number", {"SKYPILOT_NODE_RANK": "one", "SKYPILOT_NODE_IPS": IPS},
     "SKYPILOT_NODE_RANK must be a whole number >= 0, got 'one'"),
    ("no head", {"PET_NODE_RANK": "1", "PET_NNODES": "2"}, "neither PET_MASTER_ADDR nor MASTER_ADDR"),
    ("no count", {"PET_NODE_RANK": "1", "MASTER_ADDR": "h"}, "neither PET_NNODES nor WORLD_SIZE"),
    ("kubeflow rank past the count", {"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h"},
     "RANK=2 but WORLD_SIZE=2"),
    ("a bad range", {"PET_NODE_RANK": "0", "PET_NNODES": "4:2", "MASTER_ADDR": "h"}, "PET_NNODES must be N or MIN:MAX"),
    ("a bad port", {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "70000"},
     "MASTER_PORT must be a TCP port"),
    ("jobset without its replicated job", {"JOB_COMPLETION_INDEX": "0", "JOBSET_NAME": "j"},
     "REPLICATED_JOB_NAME is not"),
    ("jobset of several Jobs", {"JOB_COMPLETION_INDEX": "0", "JOB_INDEX": "1", "JOBSET_NAME": "j",
                                "REPLICATED_JOB_NAME": "n"}, "one Job of N pods"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "env", "message"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_inconsistent_environments_are_one_line_errors(case: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(UsageError) as info:
        placement(env)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_slurm_placement_when_asked() -> None:
    env = {"SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    found = placement(env, slurm=True, hostnames=lambda nodelist: ["gpu07", "gpu08"])
    assert found == Placement(1, 2, "gpu07", None, "slurm")
    with pytest.raises(UsageError, match="SLURM_NODEID=2 but SLURM_JOB_NUM_NODES=2"):
        placement({**env, "SLURM_NODEID": "2"}, slurm=True, hostnames=lambda _: ["a"])
    # Without scontrol: the first entry of the common bracket form.
    assert placement(env, slurm=True) == Placement(1, 2, "gpu07", None, "slurm")


def test_endpoint() -> None:
    assert Placement(0, 2, "10.0.0.5", None, "skypilot").endpoint == f"10.0.0.5:{DEFAULT_PORT}"
    assert Placement(0, 2, "fd00::5", 8008, "skypilot").endpoint == "[fd00::5]:8008"


# -- the agent's reading of a placement ---------------------------------------------------------------
SKY2 = {"SKYPILOT_NODE_RANK": "1", "SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_IPS": "10.0.0.5\n10.0.0.6"}


def test_the_agent_takes_the_node_count_from_the_provisioner_or_the_option() -> None:
    nodes = agent_mod._nodes(Spec(), SKY2)
    assert nodes is not None and (nodes.rank, nodes.num_nodes, nodes.primary) == (1, 2, False)
    assert nodes.backend == "static"  # fixed machines: node 0 is global rank 0
    assert agent_mod._nodes(Spec(num_nodes=2), SKY2) is not None
    jobset = {"JOB_COMPLETION_INDEX": "0", "JOBSET_NAME": "j", "REPLICATED_JOB_NAME": "n"}
    assert agent_mod._nodes(Spec(), jobset) is None  # a JobSet of one pod: one machine
    picked = agent_mod._nodes(Spec(num_nodes=3, min_nodes=2), jobset)
    assert picked is not None and picked.num_nodes == 3 and picked.backend == "c10d"  # elastic
    single = {"SKYPILOT_NODE_RANK": "0", "SKYPILOT_NUM_NODES": "1", "SKYPILOT_NODE_IPS": "10.0.0.5"}
    assert agent_mod._nodes(Spec(), single) is None


@pytest.mark.parametrize(
    ("spec", "env", "message"),
    [
        (Spec(num_nodes=2), {}, "--num-nodes 2: nothing says where this machine is"),
        (Spec(num_nodes=3), SKY2, "--num-nodes 3, but skypilot started 2 node(s)"),
        (Spec(), {"JOB_COMPLETION_INDEX": "1", "JOBSET_NAME": "j", "REPLICATED_JOB_NAME": "n"},
         "jobset says this is node 1, but --num-nodes is 1"),
    ],
)  # fmt: skip
def test_the_agent_refuses_what_does_not_add_up(spec: Spec, env: dict[str, str], message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        agent_mod._nodes(spec, env)


def test_torchrun_runs_a_python_script() -> None:
    command = agent_mod._under_torchrun(["python", "train.py", "--lr", "1"])
    assert command[0].endswith("python") and command[1:] == ["train.py", "--lr", "1"]
    with pytest.raises(UsageError, match="give -- python SCRIPT"):
        agent_mod._under_torchrun(["bash", "run.sh"])
    assert agent_mod._under_torchrun(["python", "-m", "pkg.train", "--lr", "1"])[1:] == [
        "-m",
        "pkg.train",
        "--lr",
        "1",
    ]
    for bad in (["python"], ["python", "-c", "print(1)"], ["python", "-u", "train.py"], ["python", "-m"]):
        with pytest.raises(UsageError, match="-m MODULE"):
            agent_mod._under_torchrun(bad)


def test_static_rendezvous_keeps_the_given_rank() -> None:
    rdzv = Rendezvous(
        "10.0.0.5:29500", "exp-2-ab", num_nodes=2, nproc_per_node=8, node_rank=1, backend="static"
    )
    command = torchrun_command("/py", ["/py", "train.py"], rdzv, shutdown_timeout=120)
    flags = dict(zip(command[3:-1:2], command[4:-1:2], strict=False))
    assert flags["--rdzv-backend"] == "static" and flags["--node-rank"] == "1" and flags["--nnodes"] == "2"
    assert flags["--rdzv-id"] == "exp-2-ab" and flags["--rdzv-endpoint"] == "10.0.0.5:29500"


# -- the primary's word to the other nodes --------------------------------------------------------------
class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class _ScriptedLease:
    """What successive reads of the lease return (the last one forever)."""

    def __init__(self, reads: list[dict | None]) -> None:
        self.reads = reads

    def read(self) -> dict | None:
        return self.reads.pop(0) if len(self.reads) > 1 else self.reads[0]


def _word(attempt: int, beat: int, endpoint: str = "h:1") -> dict:
    return {"attempt": attempt, "run_id": f"r{attempt}", "endpoint": endpoint, "beat": beat}


@pytest.mark.parametrize(
    ("case", "reads", "ended", "expected"),
    [
        ("the primary beats: its next beat is believed", [_word(3, 1), _word(3, 2)], set(), 3),
        ("nothing yet, then the primary's first beat", [None, None, _word(1, 1)], set(), 1),
        ("a stale copy that never moves is never believed", [_word(2, 9)], set(), None),
        ("a stale copy, then the new primary", [_word(2, 9), _word(2, 9), _word(3, 1)], set(), 3),
        ("another head's copy is not ours", [None, _word(4, 1, "other:1")], set(), None),
        ("the last attempt's primary on its way out", [_word(2, 8), _word(2, 9), _word(3, 1)], {2}, 3),
    ],
)
def test_follow(case: str, reads: list, ended: set[int], expected: int | None) -> None:
    clock = _Clock()
    word = agent_mod._follow(
        _ScriptedLease(reads),  # type: ignore[arg-type]
        "h:1",
        lambda number: number in ended,
        lambda: None,
        timeout_s=10,
        clock=clock,
        sleep=clock.sleep,
    )
    assert (word.record["attempt"] if word and word.record else None) == expected


def test_follow_an_attempt_that_ended_before_this_node_joined() -> None:
    """Node 0's script failed at once: its attempt started and was decided between two looks at
    the lease (seen: the waiting node's first read already had the last beat). The waiting node
    hears the decision within ``decided_every`` polls instead of waiting out the timeout."""
    clock = _Clock()
    decisions = iter([None, None, {"status": "failed", "relaunch": False, "attempt": 1}])
    word = agent_mod._follow(
        _ScriptedLease([_word(1, 3)]),  # type: ignore[arg-type]
        "h:1",
        lambda number: True,
        lambda: next(decisions),
        timeout_s=600,
        decided_every=4,
        clock=clock,
        sleep=clock.sleep,
    )
    assert word is not None and word.record is None and word.decision is not None
    assert word.decision["status"] == "failed" and clock.now == pytest.approx(12 * 0.5)


def test_lease_in_a_folder_store(tmp_path: Path) -> None:
    lease = agent_mod._Lease(StoreLayout.of(str(tmp_path), "exp"))
    assert lease.read() is None
    beacon = agent_mod._Beacon(lease, {"attempt": 1, "run_id": "r", "endpoint": "h:1"}, lambda: False)
    beacon.pulse()
    beacon.pulse()
    assert lease.read() == {**json.loads((tmp_path / "exp" / "rendezvous.json").read_text())}
    assert lease.read()["beat"] == 2  # type: ignore[index]
    (tmp_path / "exp" / "rendezvous.json").write_text("{torn")
    assert lease.read() is None  # a torn copy is no word at all


def test_lease_on_a_store_that_is_down() -> None:
    lease = agent_mod._Lease(StoreLayout.of("memory://grid", "exp"))
    lease.fs = _Broken()  # type: ignore[assignment]
    with pytest.raises(StoreError):
        lease.read()


class _Broken:
    def cat_file(self, path: str) -> bytes:
        raise ConnectionError("down")
