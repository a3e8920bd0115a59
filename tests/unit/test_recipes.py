"""Every recipe in docs/*.md is checked by the tools that will read it.

* SkyPilot tasks (a ```yaml block with ``run:``, ``resources:`` or ``num_nodes:``): SkyPilot's own
  parser, ``sky.Task.from_yaml_config`` (its JSON schema, then the Resources it builds), in a
  subprocess with a throwaway ``HOME`` (importing ``sky`` writes ``~/.sky``). Its client lets
  unknown ``job_recovery`` keys and strategies through for the API server to judge, so the keys
  are checked against the schema's own list, and the strategy against its registry. Then what
  the agent needs of them: 75 recovered without limit, nothing else retried.
* Kubernetes manifests (``apiVersion`` and ``kind``): ``yaml.safe_load`` and the fields the recipes
  rely on (the failure policies that turn 75 and evictions into "run again").
* Every ``lightning-grid agent`` command line in them: the real CLI parses it (the agent itself is
  not run), and a multi-node one agrees with the environment its provisioner will set.

SkyPilot pins ``click<8.2``: where the test environment should not have it, point
``LIGHTNING_GRID_SKYPILOT_PYTHON`` at a Python that has ``skypilot`` installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lightning_grid import cli
from lightning_grid.launcher import agent as agent_mod
from lightning_grid.launcher.agent import EX_PREEMPTED
from tests.helpers import REPO

DOCS = REPO / "docs"
FENCE = re.compile(r"^```yaml[^\n]*\n(.*?)^```", re.M | re.S)

#: What SkyPilot sets on node 1 of a two-node task with 8 GPUs a node, for the recipes' ``$VAR``s.
SKYPILOT_NODE1 = {
    "SKYPILOT_NODE_RANK": "1",
    "SKYPILOT_NUM_NODES": "2",
    "SKYPILOT_NODE_IPS": "10.0.0.5\n10.0.0.6",
    "SKYPILOT_NUM_GPUS_PER_NODE": "8",
}


def _blocks() -> list[tuple[str, Any]]:
    """(where, parsed document) for every YAML document in a ```yaml block of docs/*.md."""
    found = []
    for path in sorted(DOCS.glob("*.md")):
        text = path.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            for document in yaml.safe_load_all(match.group(1)):
                found.append((f"{path.name}:{line}", document))
    return found


def _skypilot() -> list[tuple[str, dict[str, Any]]]:
    return [
        (where, doc)
        for where, doc in _blocks()
        if isinstance(doc, dict)
        and "apiVersion" not in doc
        and any(key in doc for key in ("run", "resources", "num_nodes"))
    ]


def _kubernetes(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        (where, doc)
        for where, doc in _blocks()
        if isinstance(doc, dict) and "apiVersion" in doc and doc.get("kind") == kind
    ]


def _agent_argv(run: str, env: dict[str, str]) -> list[str]:
    """The ``lightning-grid agent`` command of a ``run:`` script, as bash would pass it."""
    lines = run.replace("\\\n", " ").splitlines()
    commands = [line for line in lines if line.strip().startswith("lightning-grid agent")]
    assert len(commands) == 1, f"one agent command in run:, found {len(commands)}"
    assert lines[-1].strip().startswith("lightning-grid agent"), "the agent must be run:'s last command"
    return shlex.split(string.Template(commands[0]).safe_substitute(env))[1:]


def _parse_agent(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> agent_mod.AgentSpec:
    """The CLI's reading of an agent command line (the agent is not run)."""
    seen: list[agent_mod.AgentSpec] = []
    monkeypatch.setattr(cli, "run_agent", lambda spec: seen.append(spec) or 0)
    assert cli.main(argv) == 0, f"lightning-grid {shlex.join(argv)}"
    return seen[0]


# -- SkyPilot ------------------------------------------------------------------------------------------
def test_the_docs_have_single_and_multi_node_skypilot_recipes() -> None:
    recipes = _skypilot()
    assert any(doc.get("num_nodes", 1) == 1 for _, doc in recipes)
    assert any(doc.get("num_nodes", 1) > 1 for _, doc in recipes)


@pytest.mark.parametrize(("where", "recipe"), _skypilot(), ids=[w for w, _ in _skypilot()])
def test_skypilot_recipe_recovers_the_agents_run_me_again(
    where: str, recipe: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    resources = recipe["resources"]
    recovery = resources.get("job_recovery")
    assert resources.get("use_spot") is True, where
    assert isinstance(recovery, dict), f"{where}: job_recovery is needed, or an exit 75 is a user failure"
    codes = recovery.get("recover_on_exit_codes")
    assert EX_PREEMPTED in (codes if isinstance(codes, list) else [codes]), where
    assert recovery.get("max_restarts_on_errors") == 0, f"{where}: the agent alone retries crashes"
    assert recovery.get("strategy", "EAGER_NEXT_REGION").upper() == "EAGER_NEXT_REGION", where
    nodes = int(recipe.get("num_nodes", 1))
    env = {**SKYPILOT_NODE1, "SKYPILOT_NUM_NODES": str(nodes), **recipe.get("envs", {})}
    if nodes == 1:
        env = {"SKYPILOT_NODE_RANK": "0", "SKYPILOT_NUM_NODES": "1", "SKYPILOT_NODE_IPS": "10.0.0.5"}
    agent = _parse_agent(_agent_argv(recipe["run"], env), monkeypatch)
    placed = agent_mod._nodes(agent.spec, env)
    assert (placed.num_nodes if placed else 1) == nodes == agent.spec.num_nodes, where


def _skypilot_python() -> str:
    given = os.environ.get("LIGHTNING_GRID_SKYPILOT_PYTHON")
    if given:
        return given
    if importlib.util.find_spec("sky") is None:
        pytest.skip(
            "skypilot is not installed (pip install -e '.[test]', or set LIGHTNING_GRID_SKYPILOT_PYTHON"
            " to a Python that has it)"
        )
    return sys.executable


#: Runs under SkyPilot's Python: one result per task config read from stdin.
VALIDATE = r"""
import json, sys
import sky
import sky.jobs.recovery_strategy  # registers the recovery strategies
from sky.utils import registry, schemas

recovery_schema = schemas.get_resources_schema()["properties"]["job_recovery"]["anyOf"]
known = set(next(s for s in recovery_schema if s.get("type") == "object")["properties"])
results = []
for config in json.load(sys.stdin):
    try:
        task = sky.Task.from_yaml_config(config)
        for resources in task.resources:
            recovery = resources.job_recovery
            if isinstance(recovery, dict):
                unknown = sorted(set(recovery) - known)
                if unknown:
                    raise ValueError(f"job_recovery keys this SkyPilot does not know: {unknown}")
                if recovery.get("strategy"):
                    registry.JOBS_RECOVERY_STRATEGY_REGISTRY.from_str(recovery["strategy"])
        results.append({"ok": True, "num_nodes": task.num_nodes, "version": sky.__version__})
    except Exception as exc:
        results.append({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
print(json.dumps(results))
"""


def test_skypilot_parses_every_skypilot_recipe(tmp_path: Path) -> None:
    python = _skypilot_python()
    recipes = _skypilot()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKYPILOT_", "LIGHTNING_GRID_"))}
    env.update(HOME=str(tmp_path), PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [python, "-c", VALIDATE],
        input=json.dumps([doc for _, doc in recipes]),
        capture_output=True,
        text=True,
        cwd=REPO,  # the recipes' workdir: . is the repository
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for (where, doc), result in zip(recipes, results, strict=True):
        assert result["ok"], f"{where}: {result.get('error')}"
        assert result["num_nodes"] == doc.get("num_nodes", 1), where


# -- Kubernetes ----------------------------------------------------------------------------------------
def _container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod_spec["containers"]
    return container


def test_kubernetes_job_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = _kubernetes("Job")
    assert jobs, "a Kubernetes Job recipe"
    for where, job in jobs:
        assert job["apiVersion"] == "batch/v1", where
        spec = job["spec"]
        assert spec["template"]["spec"]["restartPolicy"] == "Never", f"{where}: podFailurePolicy needs Never"
        actions = {
            tuple(rule.get("onExitCodes", {}).get("values", [])): rule["action"]
            for rule in spec["podFailurePolicy"]["rules"]
        }
        assert actions[(EX_PREEMPTED,)] == "Ignore", f"{where}: a preemption must not count as a failure"
        assert any(
            rule["action"] == "Ignore" and {"type": "DisruptionTarget"} in rule.get("onPodConditions", [])
            for rule in spec["podFailurePolicy"]["rules"]
        ), where
        command = _container(spec["template"]["spec"])["command"]
        assert command[:2] == ["lightning-grid", "agent"], where
        _parse_agent(command[1:], monkeypatch)


def test_kubernetes_jobset_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    jobsets = _kubernetes("JobSet")
    assert jobsets, "a JobSet recipe"
    for where, jobset in jobsets:
        assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2", where
        policy = jobset["spec"]["failurePolicy"]
        first = policy["rules"][0]
        assert first["action"] == "RestartJobSetAndIgnoreMaxRestarts", where
        assert first["onJobFailureReasons"] == ["PodFailurePolicy"], where
        assert policy.get("restartStrategy") in ("Recreate", "BlockingRecreate", None), where
        (replicated,) = jobset["spec"]["replicatedJobs"]
        assert replicated.get("replicas", 1) == 1, f"{where}: one Job of N pods"
        job = replicated["template"]["spec"]
        assert job["backoffLimit"] == 0 and job["parallelism"] == job["completions"], where
        pod = job["template"]["spec"]
        container = _container(pod)
        assert pod["restartPolicy"] == "Never", where
        rules = job["podFailurePolicy"]["rules"]
        assert any(
            r["action"] == "FailJob"
            and r.get("onExitCodes", {}).get("values") == [EX_PREEMPTED]
            and r["onExitCodes"].get("containerName", container["name"]) == container["name"]
            for r in rules
        ), f"{where}: exit 75 must fail the Job at once (then the JobSet restarts, uncounted)"
        assert any(
            r["action"] == "FailJob" and {"type": "DisruptionTarget"} in r.get("onPodConditions", [])
            for r in rules
        ), where
        # The variables the agent reads, from the annotations JobSet writes on every pod.
        env = {e["name"]: e for e in container["env"]}
        assert env["JOBSET_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == (
            "metadata.annotations['jobset.sigs.k8s.io/jobset-name']"
        )
        assert env["REPLICATED_JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == (
            "metadata.annotations['jobset.sigs.k8s.io/replicatedjob-name']"
        )
        port = int(env["MASTER_PORT"]["value"])
        assert {"containerPort": port} in container.get("ports", []), where
        command = container["command"]
        assert command[:2] == ["lightning-grid", "agent"], where
        agent = _parse_agent(command[1:], monkeypatch)
        assert agent.spec.num_nodes == job["parallelism"], f"{where}: --num-nodes is the pod count"
        # Pod 1 as Kubernetes and the JobSet controller will start it.
        placed = agent_mod._nodes(
            agent.spec,
            {
                "JOB_COMPLETION_INDEX": "1",
                "JOBSET_NAME": jobset["metadata"]["name"],
                "REPLICATED_JOB_NAME": replicated["name"],
                "MASTER_PORT": str(port),
            },
        )
        assert placed is not None and placed.rank == 1 and placed.num_nodes == job["parallelism"]
        name, rjob = jobset["metadata"]["name"], replicated["name"]
        assert placed.placement.endpoint == f"{name}-{rjob}-0-0.{name}:{port}", where
