"""The SLURM front end: ``lightning-grid run --backend slurm`` submits, SLURM runs and requeues, we follow.

Who does what::

    this machine (the follower)                 the allocated node (one SLURM run of the job = one attempt)
    ───────────────────────────                 ──────────────────────────────────────────────────────────
    submit: sbatch --requeue a batch script ──▶  srun lightning-grid agent --backend slurm -- python SCRIPT …
    follow: squeue/scontrol state + the           attempt.run: restore → start → watch (SIGTERM from SLURM
            agent's events in the store  ◀──────   = a "slurm" notice with the GraceTime window) → save
            mirrored into the registry             → publish → classify; decide(); events to the store;
    stop:   a stop event in the store, the         relaunch: SLURM requeues a preempted job itself, the
            agent stops in order, then scancel     agent requeues a crash retry (scontrol requeue + BeginTime)

No attempt logic lives here: an attempt is :func:`lightning_grid.launcher.attempt.run` inside the
agent, what follows it is :func:`~lightning_grid.launcher.experiment.decide`. This module only turns
what SLURM and the agent say into the registry's statuses and events, and repairs the one case
nobody on the node can: a job that ended without a word from its agent (``scancel --signal=KILL``,
a node that died, a time limit) is settled as *killed* and requeued when the budget allows.

Why the agent runs as a job step (``srun``) and not as the batch shell itself: SLURM delivers the
preemption's SIGTERM (at the start of the partition's ``GraceTime``) to the job's steps, never to
the batch shell; the batch shell hears only the final SIGTERM/SIGKILL, ``KillWait`` seconds apart.

Several nodes (``--nodes N``): the step is one agent per node, each placed by SLURM's variables
(:func:`lightning_grid.launcher.cluster.placement`, the head through :func:`node_addresses`) and
running torchrun's static rendezvous at node 0, whose agent is the primary. A preemption requeues
the whole job, so every run of it is again one attempt on all its nodes.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from lightning_grid.errors import LightningGridError, StoreError, UsageError
from lightning_grid.launcher.events import Event, Kind, StoreEventLog
from lightning_grid.launcher.experiment import Status, can_transition
from lightning_grid.launcher.registry import ExperimentRow
from lightning_grid.launcher.spec import Spec, options, simulation_text

if TYPE_CHECKING:
    from lightning_grid.launcher.engine import Engine

__all__ = [
    "SlurmError",
    "precheck",
    "batch_script",
    "submit",
    "follow",
    "stop",
    "job_id",
    "job_state",
    "node_window",
    "node_addresses",
    "requeue",
    "SacctRun",
    "SACCT_FORMAT",
    "accounting_off",
    "elapsed_runs",
    "parse_sacct",
]

#: SLURM states in which the job may still run (or is about to run) again.
_LIVE_STATES = frozenset(
    {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
     "RESIZING", "SUSPENDED", "PREEMPTED", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}
)  # fmt: skip
_TIMEOUT_S = 30.0  # one SLURM command; slurmctld answers in milliseconds when it is up


class SlurmError(LightningGridError):
    """SLURM refused or could not be reached; the message is SLURM's own, on one line."""


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " / ".join(lines[-2:]) if lines else ""


def _run(argv: Sequence[str], what: str, timeout: float = _TIMEOUT_S) -> str:
    """A SLURM command's stdout; its failure is one line with SLURM's reason."""
    if shutil.which(argv[0]) is None:
        raise UsageError(
            f"{argv[0]} not found: --backend slurm needs the SLURM client commands on this machine"
        )
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{what}: {argv[0]} did not answer in {timeout:g}s (is slurmctld up?)") from None
    if proc.returncode != 0:
        raise SlurmError(
            f"{what}: {_one_line(proc.stderr or proc.stdout) or f'{argv[0]} exited {proc.returncode}'}"
        )
    return proc.stdout


def _fields(line: str) -> dict[str, str]:
    """``scontrol show … -o`` output: ``Key=Value`` pairs on one line (values without spaces here)."""
    found: dict[str, str] = {}
    for part in line.split():
        key, sep, value = part.partition("=")
        if sep:
            found[key] = value
    return found


# -- on the node -------------------------------------------------------------------------------------
def node_window(partition: str | None) -> float:
    """Seconds from SLURM's SIGTERM to its SIGKILL: the partition's GraceTime on a preemption, the
    cluster's KillWait when there is none (a cancel or a time limit). 30 s (SLURM's default
    KillWait) when SLURM cannot be asked."""
    with contextlib.suppress(LightningGridError, ValueError):
        if partition:
            grace = float(
                _fields(_run(["scontrol", "show", "partition", partition, "-o"], "partition")).get(
                    "GraceTime", 0
                )
            )
            if grace > 0:
                return grace
        for line in _run(["scontrol", "show", "config"], "config").splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "KillWait":
                return float(value.split()[0])
    return 30.0


def node_addresses(nodelist: str) -> list[str]:
    """A job's nodes (``SLURM_JOB_NODELIST``) as addresses the other nodes can reach, in SLURM's
    order: each node's ``NodeAddr`` (which defaults to its name), so a cluster whose node names
    resolve nowhere (the test cluster's ``lg[1-2]`` on 127.0.0.1) still gives a usable head."""
    hosts = _run(["scontrol", "show", "hostnames", nodelist], "node list").split()
    if not hosts:
        return []
    head = _fields(_run(["scontrol", "show", "node", hosts[0], "-o"], f"node {hosts[0]}"))
    return [head.get("NodeAddr") or hosts[0], *hosts[1:]]


def requeue(job: str, delay_s: float = 0.0) -> str:
    """Put the job back in the queue (a crash retry, or a job SLURM did not requeue itself), not
    before ``delay_s`` from now. A job SLURM is already requeueing (a preemption) answers "pending
    execution": that is the same result. Returns what happened, for the story."""
    try:
        _run(["scontrol", "requeue", job], f"requeue job {job}")
        done = f"requeued job {job}"
    except SlurmError as exc:
        if "pending" not in str(exc).lower():
            raise
        done = f"job {job} is already back in the queue"
    if delay_s > 0:
        with contextlib.suppress(SlurmError):
            _run(
                ["scontrol", "update", f"JobId={job}", f"StartTime=now+{max(1, round(delay_s))}"],
                "begin time",
            )
            done += f", not before {delay_s:g}s from now"
    return done


# -- on the submitting machine -------------------------------------------------------------------------
def _sbatch_options(spec: Spec, name: str, output: str) -> list[str]:
    options = [
        f"--job-name=lg-{name}",
        "--requeue",  # preemption and node failure put the job back in the queue, never drop it
        "--open-mode=append",  # each requeued run appends to the same output file
        f"--output={output}",
        *(  # one agent per node: each starts its node's torchrun
            [f"--nodes={spec.num_nodes}", "--ntasks-per-node=1"]
            if spec.num_nodes > 1
            else ["--nodes=1", "--ntasks=1"]
        ),
    ]
    for flag, value in (("partition", spec.partition), ("gres", spec.gres), ("time", spec.time_limit),
                        ("account", spec.account)):  # fmt: skip
        if value:
            options.append(f"--{flag}={value}")
    return options


def _agent_argv(row: ExperimentRow, home: str, workdir: str) -> list[str]:
    """The agent's command line on the node. Every agent option of the spec is passed on as it
    was submitted (derived from :func:`spec.options`, so a new option needs no edit here)."""
    spec = row.spec
    argv = [
        sys.executable, "-m", "lightning_grid.cli", "agent", "--artifacts", str(spec.artifacts),
        "--name", row.name, "--workdir", workdir, "--log-dir", os.path.join(home, "runs", row.name),
    ]  # fmt: skip
    fixed = {"backend": "slurm", "cloud": "none"}  # SLURM's own signal is the notice
    for info in options(for_agent=True):
        value = fixed.get(info.name, getattr(spec, info.name))
        flag = info.flags[-1]
        if info.is_flag:
            argv += [flag] if value else []
        elif info.name == "simulate_preemptions":
            argv += [flag, simulation_text(spec)] if value else []
        elif value is not None:
            argv += [flag, repr(value) if isinstance(value, float) else str(value)]
    return [*argv, "--", spec.python or sys.executable, spec.script, *spec.args]


def batch_script(row: ExperimentRow, home: str) -> str:
    """The batch script: every run of the job (the first, and each after a requeue) is one attempt
    of the agent in a fresh execution directory on node-local scratch."""
    spec = row.spec
    output = os.path.join(home, "runs", row.name, "slurm-%j.out")
    workdir = f"${{SLURM_TMPDIR:-${{TMPDIR:-/tmp}}}}/lightning-grid-{row.name}-$SLURM_JOB_ID"
    agent = " ".join(shlex.quote(a) for a in _agent_argv(row, home, "@WORKDIR@"))
    header = "\n".join(f"#SBATCH {o}" for o in _sbatch_options(spec, row.name, output))
    intro = (
        "#!/bin/bash\n"
        f"# lightning-grid experiment {row.name}: written by `lightning-grid run --backend slurm`.\n"
        f"{header}\n"
    )
    gres = [f"--gres={spec.gres}"] if spec.gres else []
    if spec.num_nodes == 1:
        agent = agent.replace("@WORKDIR@", f'"{workdir}"')
        step = ["srun", "--ntasks=1", "--nodes=1", "--kill-on-bad-exit=1", *gres]
        return (
            f"{intro}"
            f'rm -rf "{workdir}"\n'
            "# The agent runs as a job step: SLURM sends a preemption's SIGTERM to steps, not to this shell.\n"
            f"exec {' '.join(step)} {agent}\n"
        )
    # Several nodes: one agent per node, each with its own execution directory (named by its node,
    # which SLURM tells each task: nodes may share a disk, the test cluster's two share a machine).
    # No --kill-on-bad-exit: the other nodes exit with the primary's decision, and a node ending
    # first (75 after a preemption) must not kill the primary before it has decided and requeued.
    # The rendezvous port is the job's own, the same in every run of it (MASTER_PORT overrides).
    node_dir = f"{workdir}-node$SLURM_NODEID"
    node_agent = agent.replace("@WORKDIR@", f'"{node_dir}"')
    per_node = f'rm -rf "{node_dir}" && exec {node_agent}'
    step = ["srun", f"--nodes={spec.num_nodes}", f"--ntasks={spec.num_nodes}", "--ntasks-per-node=1",
            "--kill-on-bad-exit=0", *gres]  # fmt: skip
    return (
        f"{intro}"
        "export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}\n"
        "# The agents run as a job step: SLURM sends a preemption's SIGTERM to steps, not to this shell.\n"
        f"exec {' '.join(step)} /bin/sh -c {shlex.quote(per_node)}\n"
    )


def precheck(spec: Spec) -> None:
    """Before anything is written: the partition exists and SLURM would accept the request
    (``sbatch --test-only``). Bad input is a UsageError with SLURM's reason; slurmctld down is a
    SlurmError (exit 1)."""
    if spec.partition:
        try:
            _run(["scontrol", "show", "partition", spec.partition, "-o"], f"--partition {spec.partition}")
        except SlurmError as exc:
            if "not found" in str(exc).lower() or "invalid partition" in str(exc).lower():
                raise UsageError(f"unknown SLURM partition {spec.partition!r}: {exc}") from None
            raise
    probe = [*_sbatch_options(spec, "check", os.devnull)]
    try:
        _run(["sbatch", "--test-only", *probe, "--wrap", "true"], "sbatch rejected the request")
    except SlurmError as exc:
        if "unable to contact" in str(exc).lower() or "did not answer" in str(exc):
            raise
        raise UsageError(str(exc)) from None


def submit(engine: Engine, row: ExperimentRow) -> str:
    """sbatch the experiment; returns the SLURM job id (also recorded in the registry's story)."""
    folder = os.path.join(engine.home, "runs", row.name)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "job.sbatch")
    with open(path, "w") as handle:
        handle.write(batch_script(row, engine.home))
    try:
        out = _run(["sbatch", "--parsable", path], "sbatch")
    except LightningGridError as exc:
        engine.registry.transition(row.name, Status.FAILED, f"sbatch failed: {exc}")
        raise
    job = out.strip().split(";")[0]
    engine.registry.record(
        row.name, Kind.NOTE, f"submitted to SLURM as job {job}", slurm_job_id=job, script=path
    )
    engine.say(f"{row.name}: SLURM job {job} (partition {row.spec.partition or 'default'})")
    return job


def resume_failed(engine: Engine, row: ExperimentRow) -> str:
    """The user's word to continue a failed experiment (the cause fixed: space freed, a bug
    fixed): the agents' story in the store gets the decision first (they replay their budgets
    from it, and a "failed" story would make the next agent refuse), then a new job is submitted.
    Its committed checkpoints are still there to continue from."""
    why = "resumed by the user after it failed"
    StoreEventLog(row.layout).emit(
        Event(
            Kind.DECISION.value,
            why,
            data={
                "status": Status.PENDING.value,
                "relaunch": True,
                "restarts": row.restarts,
                "failures": row.failures,
                "retry_at": None,
                "delay_s": 0.0,
            },
        )  # fmt: skip
    )
    engine.registry.transition(row.name, Status.PENDING, why)
    return submit(engine, engine.registry.get(row.name))


def job_id(engine: Engine, name: str) -> str | None:
    ids = [e.data["slurm_job_id"] for e in engine.registry.events(name) if e.data.get("slurm_job_id")]
    return str(ids[-1]) if ids else None


def job_state(job: str) -> dict[str, str] | None:
    """``scontrol show job`` as fields (JobState, Reason, Restarts, RunTime …); None: SLURM no
    longer knows the job (it ended longer than MinJobAge ago)."""
    try:
        out = _run(["scontrol", "show", "job", job, "-o"], f"job {job}")
    except SlurmError as exc:
        if "invalid job id" in str(exc).lower():
            return None
        raise
    return _fields(out)


# -- what SLURM accounted: every run of a job, from slurmdbd ------------------------------------------
#: sacct's complaint (exit 1) when slurm.conf says ``AccountingStorageType=accounting_storage/none``:
#: "Slurm accounting storage is disabled" (22.05; some versions prefix "sacct: error: ").
_ACCOUNTING_OFF = "accounting storage is disabled"
#: The columns :func:`parse_sacct` reads, in this order (``sacct --format``).
SACCT_FORMAT = "JobID,State,Start,End,Elapsed,ElapsedRaw,AllocCPUS,NNodes"


@dataclass(frozen=True)
class SacctRun:
    """One run of a job as slurmdbd recorded it: a requeued job has one per start."""

    job: str
    state: str
    start: str
    end: str
    elapsed_s: int
    cpus: int
    nodes: int

    @property
    def node_seconds(self) -> int:
        return self.elapsed_s * self.nodes

    @property
    def cpu_seconds(self) -> int:
        return self.elapsed_s * self.cpus


def _elapsed_s(raw: str, clock: str) -> int | None:
    """``ElapsedRaw`` (seconds), else ``Elapsed`` (``[D-]HH:MM:SS``, also ``MM:SS``): the two
    columns say the same thing, and either may be blank or odd in a partial record."""
    if raw.isdigit():
        return int(raw)
    days, _, rest = clock.rpartition("-")
    parts = rest.split(":")
    if not rest or len(parts) > 3 or not all(p.isdigit() for p in parts) or (days and not days.isdigit()):
        return None
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + int(part)
    return seconds + int(days or 0) * 86400


def parse_sacct(out: str, job: str) -> list[SacctRun]:
    """The job's allocation lines of ``sacct -P -n --format=SACCT_FORMAT`` output, one per run,
    in sacct's order (oldest first).

    Lines of its steps (``JOB.batch``, ``JOB.0``, ``JOB.extern``), blank lines, lines of another
    job and lines too short or unparsable are skipped rather than trusted: one odd record must not
    cost the others. A run that has not started (pending after a requeue: Start ``Unknown``) is no
    run yet.
    """
    runs: list[SacctRun] = []
    for line in out.splitlines():
        cols = [c.strip() for c in line.split("|")]
        if len(cols) < 8 or cols[0] != job:
            continue
        job_id, state, start, end, clock, raw, cpus, nodes = cols[:8]
        seconds = _elapsed_s(raw, clock)
        if seconds is None or start in ("", "Unknown", "None"):
            continue
        # "CANCELLED by 0": the state's first word is the state.
        runs.append(
            SacctRun(
                job=job_id, state=state.split(" ")[0], start=start, end=end, elapsed_s=seconds,
                cpus=int(cpus) if cpus.isdigit() else 0, nodes=int(nodes) if nodes.isdigit() else 1,
            )
        )  # fmt: skip
    return runs


def accounting_off(message: str) -> bool:
    """Whether a failed sacct said that this cluster keeps no accounting at all."""
    return _ACCOUNTING_OFF in message.lower()


def elapsed_runs(job: str, since: float | None = None, timeout: float = 10.0) -> list[SacctRun]:
    """Every run of ``job``, its elapsed seconds, CPUs and nodes, as slurmdbd accounted them.

    ``--duplicates``: without it sacct shows only a requeued job's newest run, and the bill wants
    every run the cluster charged for. ``since`` (the experiment's creation, epoch seconds) keeps
    out an older job with the same id (a cluster restarted with a clean state counts its job ids
    again, the database keeps them all).

    A failure is a :class:`SlurmError` with sacct's own line (:func:`accounting_off` tells
    "no accounting on this cluster" from the others: slurmdbd down, no sacct), or a
    :class:`~lightning_grid.errors.UsageError` when there is no sacct at all.
    """
    argv = ["sacct", "-j", job, "--duplicates", "--allocations", f"--format={SACCT_FORMAT}", "-P", "-n"]
    if since is not None:
        argv += ["-S", time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since - 60))]
    return parse_sacct(_run(argv, f"sacct of job {job}", timeout=timeout), job)


# -- following the job: SLURM's state and the agent's story, into the registry ---------------------------
class _Mirror:
    """Copies the agent's events from the store into the registry, each once, as transitions the
    table allows (a replayed or out-of-order event becomes a note, never a crashed follower)."""

    def __init__(self, engine: Engine, name: str) -> None:
        self.engine, self.registry, self.name = engine, engine.registry, name
        row = self.registry.get(name)
        self.log = StoreEventLog(row.layout)
        # A follower that starts again (run --resume) skips what an earlier one mirrored: the store's
        # events older than the registry's newest write.
        last = max((e.time for e in self.registry.events(name)), default=0.0)
        self.seen = sum(1 for e in self.log.read() if e.time <= last)
        self.spec = row.spec

    def events(self) -> list[Event]:
        return self.log.read()

    def run(self) -> list[Event]:
        events = self.events()
        for event in events[self.seen :]:
            self._apply(event)
            self.seen += 1
        return events

    def _move(self, target: Status, reason: str, attempt: int | None, **counters: Any) -> bool:
        """Move to ``target`` if the table allows it (through ``restoring`` from ``pending``)."""
        current = self.registry.get(self.name).status
        if current is target:
            return False
        if current is Status.PENDING and target is Status.RUNNING:
            self.registry.transition(self.name, Status.RESTORING, f"restoring for attempt {attempt}", attempt)
            current = Status.RESTORING
        if not can_transition(current, target):
            return False
        self.registry.transition(self.name, target, reason, attempt=attempt, **counters)
        return True

    def _apply(self, e: Event) -> None:
        n = e.attempt
        data = {**e.data, "store_event": True}
        kind = e.kind
        if kind == Kind.STARTED.value and n is not None:
            log_path = os.path.join(self.engine.home, "runs", self.name, f"attempt-{n}.log")
            if n not in {a.number for a in self.registry.attempts(self.name)}:
                self.registry.start_attempt(self.name, n, int(e.data.get("pid") or 0), log_path)
            self.registry.record(self.name, Kind.STARTED, f"attempt {n}: {e.message}", attempt=n, **data)
            self._move(Status.RUNNING, f"attempt {n} started on {e.data.get('host')}", n)
            return
        if kind in (Kind.RESTORED.value, Kind.CAPTURED.value):
            self._move(Status.RESTORING, f"restoring for attempt {n}", n)
        if kind == Kind.TRANSITION.value and e.to_status == Status.INTERRUPTING.value:
            if not self._move(Status.INTERRUPTING, e.message, n):
                self.registry.record(self.name, Kind.NOTE, e.message, attempt=n, **data)
            return
        if kind == Kind.ENDED.value and n is not None:
            fields = {k: e.data.get(k) for k in ("exit_code", "outcome", "reason", "notice_at", "checkpoint_step",
                                                  "steps_redone")}  # fmt: skip
            if n in {a.number for a in self.registry.attempts(self.name)}:
                self.registry.update_attempt(self.name, n, ended=e.time, **fields)
        if kind == Kind.DECISION.value:
            d = e.data
            moved = self._move(
                Status(d["status"]), e.message, n, restarts=int(d.get("restarts", 0)),
                failures=int(d.get("failures", 0)), retry_at=d.get("retry_at"),
            )  # fmt: skip
            if not moved:
                self.registry.record(self.name, Kind.DECISION, e.message, attempt=n, **data)
            return
        try:
            known = Kind(kind)
        except ValueError:
            known = Kind.NOTE
        self.registry.record(
            self.name, known, f"attempt {n}: {e.message}" if n else e.message, attempt=n, **data
        )


def _echo_logs(engine: Engine, name: str, offsets: dict[int, int], out: IO[bytes]) -> None:
    for a in engine.registry.attempts(name):
        offset = offsets.get(a.number, 0)
        with contextlib.suppress(FileNotFoundError), open(a.log_path, "rb") as handle:
            handle.seek(offset)
            chunk = handle.read(1 << 20)
            if chunk:
                out.write(chunk)
                out.flush()
                offsets[a.number] = offset + len(chunk)


def settle_if_silent(engine: Engine, name: str, job: str, state: str, mirror: _Mirror) -> None:
    """A run of the job that ended without its agent's end (SIGKILL, a dead node, the time limit)
    is one *killed* attempt, decided like any other; a job SLURM no longer runs is requeued when
    that decision relaunches. Only while the job is not running: a starting agent settles itself."""
    from lightning_grid.launcher.agent import settle_unended

    row = engine.registry.get(name)
    decision = settle_unended(
        mirror.log, row.spec, f"SLURM job {job} ended {state} without a word from the agent"
    )
    mirror.run()
    if state in _LIVE_STATES or row.stop_requested:
        return
    story = engine.registry.get(name)
    if decision is not None and not decision.relaunch:
        return
    if story.status is Status.PENDING:
        delay = max(0.0, (story.retry_at or 0.0) - time.time())
        engine.registry.note(name, requeue(job, delay))
    elif story.status in (Status.QUEUED, Status.RUNNING, Status.RESTORING, Status.INTERRUPTING):
        # The job ended before any agent could say anything (the batch script itself failed).
        mirror._move(
            Status.FAILED,
            f"SLURM job {job} ended {state} before the agent ran: {_output_tail(engine, name, job)}",
            None,
        )


def _output_tail(engine: Engine, name: str, job: str) -> str:
    path = os.path.join(engine.home, "runs", name, f"slurm-{job}.out")
    with contextlib.suppress(OSError), open(path, "rb") as handle:
        handle.seek(max(0, os.path.getsize(path) - 2048))
        return _one_line(handle.read().decode(errors="replace"))[-300:]
    return "no output"


def follow(engine: Engine, name: str, poll_s: float = 1.0) -> ExperimentRow:
    """Follow the job until the experiment ends: mirror the agent's story, watch SLURM's state,
    requeue a job that ended without its agent. Ctrl-C leaves the job to SLURM."""
    job = job_id(engine, name)
    if job is None:
        raise LightningGridError(f"{name} has no SLURM job id in its story")
    mirror = _Mirror(engine, name)
    offsets: dict[int, int] = {}
    out = sys.stdout.buffer
    last_state = None
    try:
        while True:
            try:
                mirror.run()
                info = job_state(job)
            except (StoreError, SlurmError) as exc:  # unreadable for now: ask again
                engine.say(f"warning: {exc}")
                time.sleep(5 * poll_s)
                continue
            if engine.echo:
                _echo_logs(engine, name, offsets, out)
            row = engine.registry.get(name)
            if row.status.is_terminal():
                return row
            state = (info or {}).get("JobState", "GONE")
            if state != last_state:
                reason = (info or {}).get("Reason", "")
                engine.registry.note(
                    name, f"SLURM job {job}: {state}{f' ({reason})' if reason not in ('', 'None') else ''}"
                )
                last_state = state
            if row.stop_requested and state not in _LIVE_STATES:
                if not engine.registry.get(name).status.is_terminal():
                    engine.registry.transition(name, Status.STOPPED, "stopped by the user")
                return engine.registry.get(name)
            if state in ("PENDING", "GONE") or state not in _LIVE_STATES:
                settle_if_silent(engine, name, job, state, mirror)
            time.sleep(poll_s)
    except KeyboardInterrupt:
        engine.say(f"{name} goes on in SLURM as job {job}; follow it: lightning-grid logs {name} -f;"
                   f" stop it: lightning-grid stop {name}")  # fmt: skip
        return engine.registry.get(name)


def stop(engine: Engine, name: str) -> ExperimentRow:
    """Stop in order: a stop event in the store (a running agent stops its script: SIGTERM, save,
    exit), then, once it is done or its grace period is over, ``scancel``: nothing stays queued."""
    row = engine.registry.get(name)
    if row.status.is_terminal():
        return row
    engine.registry.request_stop(name)
    job = job_id(engine, name)
    StoreEventLog(row.layout).emit(Event(Kind.STOP_REQUESTED.value, "stop requested by the user"))
    info = job_state(job) if job else None
    if info is not None and info.get("JobState") == "RUNNING":
        deadline = time.monotonic() + row.spec.grace_period + 30
        mirror = _Mirror(engine, name)
        while time.monotonic() < deadline:
            events = mirror.events()
            decided = [e for e in events if e.kind == Kind.DECISION.value]
            if decided and decided[-1].time > row.updated and decided[-1].data.get("status") == "stopped":
                break
            info = job_state(job) if job else None
            if info is None or info.get("JobState") not in ("RUNNING", "COMPLETING"):
                break
            time.sleep(0.5)
        with contextlib.suppress(LightningGridError):
            mirror.run()
    if job:
        try:
            _run(["scancel", job], f"scancel {job}")
        except SlurmError as exc:
            if "invalid job id" not in str(exc).lower():
                raise  # slurmctld down: say so, the job may still be queued
            # SLURM no longer knows the job (purged after it ended): nothing is queued or running.
    row = engine.registry.get(name)
    if not row.status.is_terminal():
        engine.registry.transition(name, Status.STOPPED, f"stopped by the user (SLURM job {job} cancelled)")
    return engine.registry.get(name)
