"""``lightning-grid agent``: the launcher's front end on the spot VM itself, for provisioners that start it.

A cloud's autoscaling group, a SkyPilot managed job or a Kubernetes Job starts a machine and runs
``lightning-grid agent --artifacts URL --name NAME -- python train.py``. The agent runs one attempt
— the same :func:`lightning_grid.launcher.attempt.run` as the local engine — applies the same
:func:`~lightning_grid.launcher.experiment.decide`, and exits with a status the provisioner
understands: 0 done, 75 (EX_TEMPFAIL) "run me again" (preempted, or a crash with a retry left), 1
failed. The provisioner, not the agent, relaunches.

There is no registry on such machines: the story goes to the artifact store, one object per event
(see :mod:`lightning_grid.launcher.events`), which ``lightning-grid status NAME --artifacts URL``
reads from anywhere. The budgets (restarts, crash retries and their backoff) are replayed from it.

Several machines (``--num-nodes``, or a provisioner that placed more than one: see
:mod:`lightning_grid.launcher.cluster`): the provisioner starts the agent on every node, and each
runs one torchrun agent of the attempt. torchrun meets with ``--rdzv-backend static`` at the head
node's address, every node keeping the rank the provisioner gave it (node 0 runs global rank 0),
or with c10d when ``--min-nodes`` asks for an elastic job (its store then served by node 0's agent
for the attempt, not by a torchrun agent: see :mod:`lightning_grid.launcher.rendezvous_store`).
Node 0 is the *primary*: it alone counts attempts, captures and saves the execution directory, and
writes the story and the decision. The attempt number and the rendezvous id reach the other nodes through a small object
in the store the primary rewrites every second (``<artifacts>/<name>/rendezvous.json``): a node
only believes a copy it saw change, so a stale one left by a machine that is gone never sends it
to an old rendezvous, and no node needs to read the story before another writes to it. Every
node exits with the primary's decision (75 on all of them after a preemption that reached one),
and the others wait for it: SkyPilot cancels a job's other nodes as soon as one exits non-zero,
and must not cut the primary's sync short.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from lightning_grid._io import atomic_write_bytes
from lightning_grid.errors import StoreError, UsageError
from lightning_grid.launcher import attempt, cluster, instances
from lightning_grid.launcher.events import Event, Kind, StoreEventLog
from lightning_grid.launcher.experiment import Budgets, Decision, Outcome, Status, decide
from lightning_grid.launcher.layout import StoreLayout, new_id
from lightning_grid.launcher.nodes import Rendezvous, workers_of
from lightning_grid.launcher.notices import (
    LauncherSignals,
    Notice,
    NoticeSource,
    SlurmSignals,
    notice_sources,
)
from lightning_grid.launcher.spec import Spec, validate_name

__all__ = [
    "AgentSpec",
    "run_agent",
    "read_events",
    "summarize",
    "settle_unended",
    "EX_PREEMPTED",
    "JOIN_TIMEOUT_S",
    "DECISION_TIMEOUT_S",
]

log = logging.getLogger("lightning_grid")

EX_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"


@dataclass(frozen=True)
class AgentSpec:
    command: Sequence[str]
    artifacts: str
    name: str
    workdir: str = "."
    spec: Spec = field(default_factory=lambda: Spec(cloud="auto"))
    log_dir: str | None = None  # where attempt-N.log goes (default: the execution directory)


class _StoreObserver:
    """An attempt's story, told to the artifact store (and one line each on stderr)."""

    def __init__(
        self, events: StoreEventLog, number: int, command: Sequence[str], watch_stop: bool = False
    ) -> None:
        self.events, self.number, self.command = events, number, list(command)
        self.host = socket.gethostname()
        self.watch_stop = watch_stop  # a SLURM job's stop comes through the store (lightning-grid stop)
        self._next_stop_check = 0.0
        self._stopped: bool | str = False
        self.pid: int | None = None  # the attempt's process (a torchrun agent on several nodes)

    def emit(self, kind: Kind, message: str, **data: Any) -> None:
        self._write(Event(kind.value, message, attempt=self.number, data={"host": self.host, **data}))
        if kind in (Kind.NOTICE, Kind.SYNC_FAILED, Kind.WARNING):
            print(f"lightning-grid agent: {message}", file=sys.stderr, flush=True)

    def _write(self, event: Event) -> None:
        """Best effort once the script runs: a store that fails now must neither stop a healthy
        script nor turn its end into "nothing ran" (the attempt still ends and is decided)."""
        try:
            self.events.emit(event)
        except StoreError as exc:
            print(f"lightning-grid agent: an event was not recorded ({exc})", file=sys.stderr, flush=True)

    def started(self, pid: int, log_path: str) -> None:
        self.pid = pid
        self.emit(
            Kind.STARTED, f"attempt {self.number} started on {self.host}", pid=pid, command=self.command
        )

    #: The node this observer speaks for, on a multi-node job's other machines (see _PeerObserver).
    node: int | None = None

    def interrupting(self, notice: Notice, window_s: float) -> None:
        if notice.source == "user":  # a stop goes straight to stopped after the attempt, as locally
            return
        where = {"node": self.node} if self.node is not None else {}
        self._write(
            Event(
                Kind.TRANSITION.value,
                (f"node {self.node}: " if self.node is not None else "") + f"{notice.reason}; SIGTERM sent",
                attempt=self.number,
                from_status=Status.RUNNING.value,
                to_status=Status.INTERRUPTING.value,
                data={"host": self.host, "window_s": window_s, **where},
            )
        )

    def stop_requested(self) -> bool | str:
        """A provisioner stops an agent by stopping its machine (a notice); under SLURM,
        ``lightning-grid stop`` leaves a stop event in the store, read here every few seconds."""
        if not self.watch_stop or self._stopped or time.monotonic() < self._next_stop_check:
            return self._stopped
        self._next_stop_check = time.monotonic() + 2.0
        try:
            self._stopped = self._stop_in(self.events.read())
        except StoreError:
            pass  # unreadable now: ask again later
        return self._stopped

    def _stop_in(self, past: Sequence[Event]) -> bool | str:
        return any(e.kind == Kind.STOP_REQUESTED.value for e in past)


class _PeerObserver(_StoreObserver):
    """A node other than the primary: what only it saw — its notice, its shutdown plan, its
    warnings, its exit timing — goes to the store as it is, tagged with the node; its start and
    end become notes, so attempts, outcomes and restarts are counted from node 0's events alone."""

    _AS_IS = (Kind.NOTICE, Kind.PLAN, Kind.WARNING, Kind.EXITED, Kind.PUBLISHED, Kind.SYNC_FAILED)

    def __init__(self, events: StoreEventLog, number: int, command: Sequence[str], node: int) -> None:
        super().__init__(events, number, command, watch_stop=True)
        self.node = node
        self._primary_ended: float | None = None  # when this node first saw the primary's end

    def _stop_in(self, past: Sequence[Event]) -> bool | str:
        """Also the primary's end of this attempt while this node's workers still run, for longer
        than ``PRIMARY_ENDED_GRACE_S``: node 0's script failed, say, and a rank here may wait in a
        collective for a peer that is gone until the collective's timeout (30 minutes by default).
        The grace lets an ordinary end (every node saved at one step; node 0 was quicker) be one."""
        for e in past:
            if e.kind == Kind.ENDED.value and e.attempt == self.number and "node" not in e.data:
                if self._primary_ended is None:
                    self._primary_ended = time.monotonic()
                if time.monotonic() - self._primary_ended >= PRIMARY_ENDED_GRACE_S:
                    return f"node 0's attempt {self.number} is over ({e.data.get('outcome', 'ended')})"
        return super()._stop_in(past)

    def emit(self, kind: Kind, message: str, **data: Any) -> None:
        data = {**data, "node": self.node}
        if kind in self._AS_IS and not (
            kind == Kind.NOTICE and data.get("source") == "user"
        ):  # a stop: a note
            super().emit(kind, f"node {self.node}: {message}", **data)
        else:
            super().emit(Kind.NOTE, f"node {self.node}: {message}", event=kind.value, **data)


@dataclass(frozen=True)
class _Story:
    """What the events so far say, for the next attempt's decision."""

    attempts: int = 0
    restarts: int = 0
    failures: int = 0
    retry_at: float | None = None
    sync_s: float = 0.0
    status: str | None = None
    checkpoint_step: int | None = None  # the newest checkpoint an attempt left committed


def settle_unended(events: StoreEventLog, spec: Spec, why: str) -> Decision | None:
    """An attempt that started and never ended (its machine vanished, SLURM SIGKILLed its job) is a
    *killed* attempt, decided like any other: a resumable run continues from its newest periodic
    checkpoint, and the restart budget counts it. Both the next agent and the SLURM follower call
    this; the first to find the attempt unended records it. Returns the decision, or None."""
    past = events.read()
    started = [e.attempt for e in past if e.kind == Kind.STARTED.value and e.attempt]
    ended = {e.attempt for e in past if e.kind == Kind.ENDED.value}
    if not started or started[-1] in ended:
        return None
    number = started[-1]
    story = _replay(past)
    outcome = Outcome.KILLED if spec.resumable else Outcome.INTERRUPTED_NOT_RESUMABLE
    events.emit(
        Event(
            Kind.ENDED.value,
            f"ended: {why}",
            attempt=number,
            data={"outcome": outcome.value, "reason": why, "exit_code": None, "steps_redone": None},
        )
    )
    decision = decide(
        outcome, Budgets(story.restarts, spec.max_restarts, story.failures, spec.retries, spec.retry_delay)
    )
    _emit_decision(events, number, decision)
    return decision


def _emit_decision(events: StoreEventLog, number: int, decision: Decision) -> None:
    events.emit(
        Event(
            Kind.DECISION.value,
            decision.reason,
            attempt=number,
            to_status=decision.status.value,
            data={
                "status": decision.status.value,
                "relaunch": decision.relaunch,
                "restarts": decision.restarts,
                "failures": decision.failures,
                "delay_s": decision.delay_s,
                "retry_at": time.time() + decision.delay_s if decision.delay_s else None,
            },
        )
    )


def _replay(events: Sequence[Event]) -> _Story:
    attempts = max((e.attempt or 0 for e in events), default=0)
    decisions = [e for e in events if e.kind == Kind.DECISION.value]
    syncs = [e.data.get("seconds") for e in events if e.kind == Kind.SYNCED.value]
    last = decisions[-1].data if decisions else {}
    steps = [
        int(e.data["checkpoint_step"])
        for e in events
        if e.kind == Kind.ENDED.value and e.data.get("checkpoint_step") is not None
    ]
    return _Story(
        attempts=attempts,
        restarts=int(last.get("restarts", 0)),
        failures=int(last.get("failures", 0)),
        retry_at=last.get("retry_at"),
        sync_s=float(syncs[-1] or 0.0) if syncs else 0.0,
        status=last.get("status"),
        checkpoint_step=max(steps) if steps else None,
    )


#: How long a node other than the primary waits for the primary's word on the attempt (torchrun's
#: own rendezvous timeout), and then for its decision after the attempt (its sync may be long).
JOIN_TIMEOUT_S = 600.0
#: How long another node's attempt may outlive the primary's end of it before it is stopped.
PRIMARY_ENDED_GRACE_S = 10.0
DECISION_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class _Nodes:
    """This machine's part in a multi-node attempt."""

    placement: cluster.Placement
    num_nodes: int
    min_nodes: int | None

    @property
    def rank(self) -> int:
        return self.placement.node_rank

    @property
    def primary(self) -> bool:
        return self.placement.node_rank == 0

    @property
    def backend(self) -> str:
        """``static`` for a provisioner's fixed set of machines: deterministic ranks (node 0 =
        global rank 0), no first-come race; c10d only for an elastic job (``--min-nodes``)."""
        return "c10d" if self.min_nodes is not None and self.min_nodes < self.num_nodes else "static"


def _nodes(spec: Spec, env: Mapping[str, str]) -> _Nodes | None:
    """This machine's place in a multi-node job (None: one machine). The provisioner's word on
    the node count and ``--num-nodes`` must agree; a JobSet, which does not say, takes the option."""
    if spec.backend == "slurm":
        if spec.num_nodes <= 1:
            return None  # one node: SLURM's variables add nothing
        from lightning_grid.launcher import slurm

        # One agent per node (the batch script's `srun --ntasks-per-node=1`): SLURM says which
        # node this is; the head's address is its NodeAddr (a node name may resolve nowhere).
        found = cluster.placement(env, slurm=True, hostnames=slurm.node_addresses)
        if found is None:
            raise UsageError(
                f"--num-nodes {spec.num_nodes} with --backend slurm: no SLURM_NODEID, this agent is not"
                " a task of the job's step (lightning-grid run writes the batch script that starts it)"
            )
    else:
        found = cluster.placement(env)
    if found is None:
        if spec.num_nodes > 1:
            raise UsageError(
                f"--num-nodes {spec.num_nodes}: nothing says where this machine is (no SKYPILOT_NODE_RANK,"
                " PET_NODE_RANK, RANK with MASTER_ADDR, or JOBSET_NAME with JOB_COMPLETION_INDEX): run the"
                " agent on every node of a SkyPilot or Kubernetes multi-node job"
            )
        return None
    if found.num_nodes is not None and spec.num_nodes > 1 and found.num_nodes != spec.num_nodes:
        raise UsageError(
            f"--num-nodes {spec.num_nodes}, but {found.source} started {found.num_nodes} node(s)"
        )
    count = found.num_nodes if found.num_nodes is not None else spec.num_nodes
    if found.node_rank >= count:
        raise UsageError(f"{found.source} says this is node {found.node_rank}, but --num-nodes is {count}")
    if count == 1:
        return None
    low = spec.min_nodes if spec.min_nodes is not None else found.min_nodes
    return _Nodes(replace(found, num_nodes=count), count, low)


class _Lease:
    """``<artifacts>/<name>/rendezvous.json``: the primary's word to the other nodes — which
    attempt this is and the id of its rendezvous. The primary rewrites it every second or so (a
    beat counter changes each time), so a node believes only a copy it saw *change*: one left by
    a machine that is gone (the last attempt's) never moves, and is never taken for the current
    one. One object, one writer: no story needs to be read before someone else writes to it."""

    def __init__(self, layout: StoreLayout) -> None:
        self.url = f"{layout.base}/rendezvous.json"
        self.fs, self.path = fsspec.core.url_to_fs(self.url)

    def write(self, record: Mapping[str, Any]) -> None:
        data = json.dumps(dict(record), sort_keys=True).encode()
        try:
            if isinstance(self.fs, LocalFileSystem):
                atomic_write_bytes(self.path, data)
            else:
                self.fs.pipe_file(self.path, data)
        except Exception as exc:  # any backend's failure
            raise StoreError(f"cannot write {self.url}: {exc}") from exc

    def read(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self.fs.cat_file(self.path)))
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # torn (a store without atomic replace): the next beat is whole
        except Exception as exc:  # any backend's failure
            raise StoreError(f"store unreachable: {self.url}: {exc}") from exc


class _Beacon(threading.Thread):
    """The primary's heartbeat on the lease: every ``fast_s`` until its torchrun agent has workers
    (every node has joined by then), every ``slow_s`` after (a late elastic node can still read
    it; an object store is not asked a thousand times an hour). Best effort: a failed beat is
    retried at the next."""

    def __init__(
        self,
        lease: _Lease,
        record: Mapping[str, Any],
        settled: Callable[[], bool],
        fast_s: float = 1.0,
        slow_s: float = 15.0,
    ) -> None:
        super().__init__(daemon=True, name="lightning-grid-beacon")
        self.lease, self.record, self.settled = lease, dict(record), settled
        self.fast_s, self.slow_s = fast_s, slow_s
        self.beat = 0
        self.done = threading.Event()

    def pulse(self) -> None:
        self.beat += 1
        self.lease.write({**self.record, "beat": self.beat, "time": time.time()})

    def run(self) -> None:
        while not self.done.wait(self.slow_s if self.settled() else self.fast_s):
            try:
                self.pulse()
            except Exception:  # noqa: BLE001 - the store hiccuped: the next beat tries again
                pass

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=5)


@dataclass(frozen=True)
class _Word:
    """What a node other than the primary hears while it waits: the record of an attempt to join,
    or the primary's decision for an attempt that started and ended without this node."""

    record: dict[str, Any] | None = None
    decision: dict[str, Any] | None = None


def _follow(
    lease: _Lease,
    endpoint: str,
    ended: Callable[[int], bool],
    decided_after: Callable[[], dict[str, Any] | None],
    timeout_s: float,
    poll_s: float = 0.5,
    decided_every: int = 4,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> _Word | None:
    """On a node other than the primary: the primary's record for the attempt about to start, or
    None if none came within ``timeout_s``. Believed only once seen to change (see :class:`_Lease`),
    only for this job's rendezvous address, and only for an attempt that has not ended.

    An attempt can also start and end between two looks (the script failed at once on node 0): so
    every ``decided_every`` polls, ``decided_after`` is asked for a decision on an attempt newer than
    those decided when this node began to wait; one found ends the wait, and this node exits as
    the primary did, instead of waiting out ``timeout_s`` for an attempt that is over."""
    seen = lease.read()
    deadline = clock() + timeout_s
    polls = 0
    while clock() < deadline:
        sleep(poll_s)
        polls += 1
        if polls % decided_every == 0:
            decision = decided_after()
            if decision is not None:
                return _Word(decision=decision)
        try:
            now = lease.read()
        except StoreError:
            continue  # unreachable for now: ask again
        if now is None or now == seen:
            continue
        seen = now
        if now.get("endpoint") != endpoint or not isinstance(now.get("attempt"), int):
            continue  # another job's head (a relaunch elsewhere): not ours
        if ended(int(now["attempt"])):
            continue  # the last attempt's primary, still beating on its way out
        return _Word(record=now)
    return None


def _exit_code(status: str | None, relaunch: bool) -> int:
    if status in (Status.SUCCEEDED.value, Status.STOPPED.value):
        return 0
    return EX_PREEMPTED if relaunch else 1


def _await_decision(
    events: StoreEventLog,
    number: int,
    signals: LauncherSignals,
    timeout_s: float,
    poll_s: float = 2.0,
) -> dict[str, Any] | None:
    """On a node other than the primary, after its part of the attempt: the primary's decision
    for it (None: none came in time, or this machine is going down)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and signals.received is None:
        try:
            found = [e for e in events.read() if e.kind == Kind.DECISION.value and e.attempt == number]
        except StoreError:
            found = []
        if found:
            return found[-1].data
        time.sleep(poll_s)
    return None


_PYTHON = re.compile(r"python[0-9.]*")


def _under_torchrun(command: list[str]) -> list[str]:
    """The command with its interpreter's full path: torchrun starts the workers with a Python of
    its own choosing, so the attempt names the one the user gave (``python`` on the PATH)."""
    word = command[0]
    if not _PYTHON.fullmatch(os.path.basename(word)):
        raise UsageError(
            f"several processes or nodes run a Python script under torchrun: give -- python SCRIPT ...,"
            f" not {word}"
        )
    rest = command[1:]
    # torchrun starts the interpreter itself: it takes a script, or -m MODULE, and no Python options.
    if not rest or (rest[0].startswith("-") and not (rest[0] == "-m" and len(rest) > 1)):
        given = " ".join(command[:2])
        raise UsageError(
            f"several processes or nodes run a Python script under torchrun: give -- python SCRIPT ... or"
            f" -- python -m MODULE ..., not {given} (torchrun starts Python itself; it takes no Python options)"
        )
    return [shutil.which(word) or os.path.abspath(word), *rest]


def _nothing_ran(exc: BaseException) -> int:
    print(f"lightning-grid agent: {exc}; nothing ran: exit {EX_PREEMPTED} (run me again)", file=sys.stderr)
    return EX_PREEMPTED


def run_agent(agent: AgentSpec, environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    command = list(agent.command)
    if not command:
        raise UsageError(
            "give the command to run after --, e.g.: lightning-grid agent ... -- python train.py"
        )
    if shutil.which(command[0]) is None and not os.path.exists(command[0]):
        raise UsageError(f"command not found: {command[0]}")
    validate_name(agent.name)
    slurm_job = env.get("SLURM_JOB_ID") if agent.spec.backend == "slurm" else None
    if agent.spec.backend == "slurm" and not slurm_job:
        raise UsageError(
            "--backend slurm: this is not a SLURM job (no SLURM_JOB_ID); lightning-grid run submits it"
        )
    multi = _nodes(agent.spec, env)
    # A provisioner's agent is resumable by definition; a SLURM job keeps what the user submitted.
    forced: dict[str, Any] = {} if slurm_job else {"resumable": True, "use_spot": True}
    if multi is not None:
        forced.update(num_nodes=multi.num_nodes, min_nodes=multi.min_nodes)
    # The script runs in --workdir: a relative store path would move with it.
    artifacts_url = agent.artifacts if "://" in agent.artifacts else os.path.abspath(agent.artifacts)
    if multi is not None or agent.spec.nproc_per_node > 1:
        command = _under_torchrun(command)
        forced["python"] = command[0]
    spec = agent.spec.with_(name=agent.name, artifacts=artifacts_url, **forced).validated()
    workdir = os.path.abspath(agent.workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UsageError(f"--workdir {agent.workdir} is not a directory")
    instance = instances.lookup(spec.instance_type)
    available = instances.gpu_count()
    devices = instances.visible_devices(instance, available, env.get("CUDA_VISIBLE_DEVICES"))
    try:  # before the store is touched: a bad --workdir leaves nothing behind
        os.makedirs(workdir, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot use --workdir {agent.workdir}: {exc.strerror}") from None
    layout = StoreLayout.of(artifacts_url, agent.name)
    events = StoreEventLog(layout)
    primary = multi is None or multi.primary
    try:
        if slurm_job and primary:  # a SLURM job's runs never overlap: an unended attempt was killed
            settle_unended(
                events, spec, "the previous run of the job ended without a word from its agent (killed)"
            )
        story = _replay(events.read())
        if primary and layout.owner() is None:
            layout.claim(new_id(), agent.name)  # every agent of this experiment shares the store's id
    except StoreError as exc:  # the store is down: nothing ran, another try may reach it
        return _nothing_ran(exc)
    if story.status in (Status.SUCCEEDED.value, Status.FAILED.value, Status.STOPPED.value):
        # A provisioner that starts a finished job again must not pay for it to redo anything.
        print(f"lightning-grid agent: {agent.name} has already ended ({story.status})", file=sys.stderr)
        return 0 if story.status == Status.SUCCEEDED.value else 1
    wait = story.retry_at - time.time() if story.retry_at is not None else 0.0
    if wait > 0 and primary:
        print(f"lightning-grid agent: retrying in {wait:.0f}s", file=sys.stderr, flush=True)
        time.sleep(wait)
    rendezvous: Rendezvous | None = None
    beacon: _Beacon | None = None
    observer: _StoreObserver
    if multi is None:
        number = story.attempts + 1
        if spec.nproc_per_node > 1:  # several processes on this one machine: torchrun, as locally
            rendezvous = Rendezvous("127.0.0.1:0", f"{agent.name}-{number}", 1, spec.nproc_per_node)
        observer = _StoreObserver(events, number, command, watch_stop=slurm_job is not None)
    elif multi.primary:
        number = story.attempts + 1
        rendezvous = Rendezvous(
            endpoint=multi.placement.endpoint,
            run_id=f"{agent.name}-{number}-{new_id()[:8]}",
            num_nodes=multi.num_nodes,
            nproc_per_node=spec.nproc_per_node,
            min_nodes=multi.min_nodes if multi.backend == "c10d" else None,
            node_rank=0 if multi.backend == "static" else None,
            backend=multi.backend,
        )
        observer = _StoreObserver(events, number, command, watch_stop=slurm_job is not None)
        record = {"attempt": number, "run_id": rendezvous.run_id, "endpoint": rendezvous.endpoint}

        def settled() -> bool:
            return observer.pid is not None and bool(workers_of(observer.pid))

        beacon = _Beacon(_Lease(layout), record, settled)
        try:
            beacon.pulse()  # before anything runs: a store that refuses it means nothing ran
            observer.emit(
                Kind.NOTE,
                f"attempt {number}: {multi.num_nodes} nodes ({multi.placement.source}) meet at"
                f" {rendezvous.endpoint} ({multi.backend} rendezvous {rendezvous.run_id})",
                nodes=multi.num_nodes,
                endpoint=rendezvous.endpoint,
                rendezvous=rendezvous.run_id,
                backend=multi.backend,
                source=multi.placement.source,
            )
        except StoreError as exc:
            return _nothing_ran(exc)
        beacon.start()
    else:
        print(
            f"lightning-grid agent: node {multi.rank} of {multi.num_nodes}: waiting for node 0 at"
            f" {multi.placement.endpoint}",
            file=sys.stderr,
            flush=True,
        )
        lease = _Lease(layout)

        def ended(number: int) -> bool:
            try:
                past = events.read()
            except StoreError:
                return False
            return any(
                e.attempt == number and e.kind in (Kind.ENDED.value, Kind.DECISION.value) for e in past
            )

        try:  # attempts already decided when this node began to wait: not the one it waits for
            decided_before = max(
                (e.attempt or 0 for e in events.read() if e.kind == Kind.DECISION.value), default=0
            )
        except StoreError as exc:
            return _nothing_ran(exc)

        def decided_after() -> dict[str, Any] | None:
            try:
                past = events.read()
            except StoreError:
                return None
            found = [e for e in past if e.kind == Kind.DECISION.value and (e.attempt or 0) > decided_before]
            return {**found[-1].data, "attempt": found[-1].attempt} if found else None

        try:
            heard = _follow(
                lease, multi.placement.endpoint, ended, decided_after, JOIN_TIMEOUT_S + max(0.0, wait)
            )
        except StoreError as exc:
            return _nothing_ran(exc)
        if heard is None:
            return _nothing_ran(
                StoreError(f"node 0 did not announce an attempt at {multi.placement.endpoint} in time")
            )
        if heard.decision is not None:
            code = _exit_code(heard.decision.get("status"), bool(heard.decision.get("relaunch")))
            print(
                f"lightning-grid agent: node {multi.rank}: node 0's attempt {heard.decision['attempt']} ended"
                f" before this node joined it ({heard.decision.get('status')}): exit {code}",
                file=sys.stderr,
            )
            return code
        assert heard.record is not None
        number = int(heard.record["attempt"])
        rendezvous = Rendezvous(
            endpoint=multi.placement.endpoint,
            run_id=str(heard.record["run_id"]),
            num_nodes=multi.num_nodes,
            nproc_per_node=spec.nproc_per_node,
            min_nodes=multi.min_nodes if multi.backend == "c10d" else None,
            node_rank=multi.rank if multi.backend == "static" else None,
            backend=multi.backend,
        )
        observer = _PeerObserver(events, number, command, multi.rank)
    node = multi.rank if multi is not None else 0
    log_name = f"attempt-{number}.log" if node == 0 else f"attempt-{number}-node{node}.log"
    setup = attempt.AttemptSetup(
        number=number,
        spec=spec,
        command=command,
        workdir=workdir,
        layout=layout,
        # The log sits in the execution directory, so it reaches the store with it (a name with
        # the private ".lightning_grid-" prefix would never be synced).
        log_path=os.path.join(agent.log_dir, log_name)
        if agent.log_dir
        else os.path.join(workdir, f"lightning_grid-{log_name}"),
        # Our own files live in the workdir's .lightning_grid folder, which is never synced.
        private_dir=os.path.join(workdir, ".lightning_grid"),
        devices=devices,
        sync_s=story.sync_s,
        fresh=False,
        last_checkpoint_step=story.checkpoint_step if primary else None,
        rendezvous=rendezvous,
        nodes=(node,),
        primary=primary,
    )
    signals = LauncherSignals()
    signals.install()
    own: NoticeSource = signals
    if slurm_job:
        from lightning_grid.launcher import slurm

        own = SlurmSignals(signals, slurm.node_window(env.get("SLURM_JOB_PARTITION")), slurm_job)
    try:
        report = attempt.run(setup, notice_sources(spec, number, own, setup.nodes), observer)
    except StoreError as exc:
        # Nothing ran and nothing is lost; the story cannot be written either. Another machine
        # (the provisioner's next try) may reach the store: "run me again".
        signals.uninstall()
        return _nothing_ran(exc)
    except BaseException:
        signals.uninstall()
        raise
    finally:
        if beacon is not None:
            beacon.stop()
    # The handlers stay until the decision is written: a second SIGTERM (SLURM's at the end of
    # GraceTime, a pod's) must not end the agent between the attempt's end and its decision.
    decision = decide(
        report.outcome,
        Budgets(story.restarts, spec.max_restarts, story.failures, spec.retries, spec.retry_delay),
    )
    if not primary:
        # The primary decides for every node; this one exits as it does. Without its word in time
        # (its machine went), the same rule on the same story gives the same answer.
        try:
            word = _await_decision(events, number, signals, DECISION_TIMEOUT_S)
        finally:
            signals.uninstall()
        if word is not None:
            return _exit_code(word.get("status"), bool(word.get("relaunch")))
        if signals.received is not None:
            return EX_PREEMPTED
        return _exit_code(decision.status.value, decision.relaunch)
    try:
        _emit_decision(events, number, decision)
    except StoreError as exc:  # the attempt is over; the next agent settles it from its story
        print(f"lightning-grid agent: the decision could not be recorded: {exc}", file=sys.stderr)
    finally:
        signals.uninstall()
    if slurm_job and decision.relaunch:
        # SLURM requeues a preempted job by itself, but not one whose script crashed, nor one that
        # finished its save before the end of GraceTime: ask, with the crash retry's backoff.
        from lightning_grid.launcher import slurm

        try:
            print(
                f"lightning-grid agent: {slurm.requeue(slurm_job, decision.delay_s)}",
                file=sys.stderr,
                flush=True,
            )
        except Exception as exc:  # noqa: BLE001 - the follower requeues a job that ended unrequeued
            print(
                f"lightning-grid agent: could not requeue job {slurm_job}: {exc}", file=sys.stderr, flush=True
            )
    return _exit_code(decision.status.value, decision.relaunch)


def read_events(artifacts_url: str, name: str) -> list[Event]:
    validate_name(name)
    return StoreEventLog(StoreLayout.of(artifacts_url, name)).read()


_ATTEMPT_FIELDS = (
    "exit_code",
    "outcome",
    "reason",
    "notice_source",
    "window_s",
    "plan",
    "checkpoint_step",
    "steps_redone",
    "sigterm_after_notice_s",
    "exit_after_sigterm_s",
    "synced_after_notice_s",
    "host",
)


def summarize(name: str, events: Sequence[Event]) -> dict[str, Any]:
    """The ``status --json`` shape, from the events agents left in the store."""
    if not events:
        raise UsageError(f"no experiment named {name!r} in that artifact store")
    ended = [e for e in events if e.kind == Kind.ENDED.value]
    story = _replay(events)
    if story.status is not None:
        status = story.status
    elif ended:  # agents from before decisions were recorded
        last = ended[-1].data.get("outcome")
        status = {"succeeded": "succeeded", "preempted": "pending", "killed": "pending"}.get(
            str(last), str(last)
        )
    else:
        status = "running"
    if ended and story.attempts > len(ended) and status == Status.PENDING.value:
        status = Status.RUNNING.value  # a newer attempt has started and not ended yet
    return {
        "name": name,
        "status": status,
        "restarts": story.restarts
        if story.status is not None
        else sum(e.data.get("outcome") in ("preempted", "killed") for e in ended),
        "failures": story.failures,
        "retry_at": story.retry_at,
        "attempts": [{"number": e.attempt, **{k: e.data.get(k) for k in _ATTEMPT_FIELDS}} for e in ended],
        "events": [
            {"time": e.time, "kind": e.kind, "attempt": e.attempt, "message": e.message, "data": e.data}
            for e in events
        ],
    }
