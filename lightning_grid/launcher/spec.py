"""One value for an experiment's options, from the CLI and the SDK to the registry and the contract.

Each option is a field of :class:`Spec` with its default, its help text and its validation, here and
nowhere else. The CLI builds its options from :func:`options`, the SDK's ``Experiment`` takes the
same keywords, the registry stores the whole value as JSON (so a new option needs no new column),
and the attempt runner reads it. Adding an option is a field here plus the code that uses it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

from lightning_grid.errors import UsageError

__all__ = [
    "Spec",
    "OptionInfo",
    "options",
    "parse_simulation",
    "simulation_text",
    "parse_capacity",
    "CLOUDS",
    "NAME_PATTERN",
    "validate_name",
    "MAX_RETRY_DELAY_S",
    "BACKENDS",
]

CLOUDS = ("none", "auto", "aws", "gcp", "azure")
#: Where attempts run: this machine (the engine relaunches) or a SLURM cluster (SLURM requeues).
BACKENDS = ("local", "slurm")
#: The options that only mean something to a scheduler: given without ``--backend slurm`` they
#: would be silently ignored, so they are an error instead.
_SLURM_ONLY = ("partition", "gres", "time_limit", "account")
#: Experiment names become folders in the store and file names under the home: no separators,
#: no leading dot, nothing a shell or a URL would read differently. (``\Z``, not ``$``: ``$`` also
#: matches before a final newline.)
NAME_PATTERN = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
#: The longest wait between two crash retries: a backoff exists to let a transient cause pass
#: (a flaky mount, an exhausted quota), not to park an experiment for hours.
MAX_RETRY_DELAY_S = 300.0
#: SQLite stores 64-bit signed integers; anything larger would fail on the way in.
_MAX_INT = 2**63 - 1


def _opt(default: Any, help: str, *, cli: bool = True, agent: bool = False, **more: Any) -> Any:
    """A Spec field with what the CLI needs to offer it (``cli``) and whether the agent takes it."""
    meta = {"help": help, "cli": cli, "agent": agent, **more}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Spec:
    """What the user asked for. Frozen: one value travels unchanged from submit to every attempt."""

    script: str = _opt("", "The script to run.", cli=False)
    args: tuple[str, ...] = _opt((), "Arguments for the script.", cli=False)
    name: str | None = _opt(None, "Default: generated, unique, human-readable.", metavar="NAME")
    resumable: bool = _opt(
        False, "The script is safe to resume: relaunch it after an interruption.", agent=True
    )
    use_spot: bool = _opt(False, "Run on interruptible capacity (notices, preemptions).")
    instance_type: str = _opt(
        "local", "Instance type: its GPU count sets the devices the script sees.", agent=True
    )
    max_restarts: int = _opt(20, "Preemptions survived before the experiment fails.", agent=True, minimum=0)
    retries: int = _opt(0, "Relaunches after the script fails on its own (exit ≠ 0).", agent=True, minimum=0)
    retry_delay: float = _opt(
        5.0,
        f"Seconds before the first crash retry; doubles with each, at most {MAX_RETRY_DELAY_S:g}s.",
        agent=True,
        minimum=0.0,
    )
    python: str | None = _opt(
        None, "The Python that runs SCRIPT (a conda env's, say). Default: the launcher's own.", metavar="PATH"
    )
    artifacts: str | None = _opt(
        None, "fsspec URL of the artifact store. Default: under LIGHTNING_GRID_HOME.", metavar="URL"
    )
    simulate_preemptions: tuple[float, ...] = _opt(
        (),
        "S1,S2,...: attempt k gets a spot notice after S_k seconds; N@S: on node N only (multi-node;"
        " default: one node at random, as spot takes them).",
        agent=True,
        metavar="[N@]S1,...",
    )
    #: The node each simulated notice targets (-1: one at random), parallel to simulate_preemptions;
    #: written as ``N@S`` in the same option.
    simulate_nodes: tuple[int, ...] = _opt((), "Nodes of the simulated notices.", cli=False, agent=True)
    simulate_capacity: tuple[int, ...] = _opt(
        (),
        "C1,C2,...: with --num-nodes, attempt k finds only C_k machines (spot capacity that comes back"
        " short); it waits in pending for more, or goes on with --min-nodes.",
        metavar="C1,C2,...",
    )
    grace_period: float = _opt(
        120.0, "Seconds from a notice to SIGKILL when the notice names no deadline.", agent=True, minimum=0.0
    )
    cloud: str = _opt(
        "none",
        "Watch this cloud's metadata service for interruption notices (auto: probe each once).",
        agent=True,
        choices=CLOUDS,
    )
    every_n_train_steps: int | None = _opt(
        None,
        "With --resumable: also checkpoint every N optimizer steps (survives SIGKILL; no script change).",
        agent=True,
        minimum=1,
        metavar="N",
    )
    every_n_seconds: float | None = _opt(
        None, "With --resumable: also checkpoint every T seconds of training.", agent=True, metavar="T"
    )

    backend: str = _opt(
        "local",
        "Where attempts run: this machine, or a SLURM cluster (sbatch; SLURM requeues after preemptions).",
        agent=True,
        choices=BACKENDS,
    )
    partition: str | None = _opt(
        None,
        "With --backend slurm: the partition (e.g. a preemptible one). Default: the cluster's.",
        metavar="NAME",
    )
    num_nodes: int = _opt(
        1,
        "Machines per attempt (a torchrun agent on each; locally: agents on 127.0.0.1).",
        agent=True,
        minimum=1,
        metavar="N",
        aliases=("--nodes",),
        capacity=True,
    )
    nproc_per_node: int = _opt(
        1,
        "Training processes per machine (torchrun's --nproc-per-node; e.g. its GPU count).",
        agent=True,
        minimum=1,
        metavar="P",
        capacity=True,
    )
    min_nodes: int | None = _opt(
        None,
        "Go on short-handed with at least this many machines (torchrun's --nnodes MIN:MAX) instead of"
        " waiting for all. Default: all of --num_nodes.",
        agent=True,
        minimum=1,
        metavar="N",
        capacity=True,
    )
    gres: str | None = _opt(
        None, "With --backend slurm: generic resources per node, e.g. gpu:1.", metavar="GRES"
    )
    time_limit: str | None = _opt(
        None,
        "With --backend slurm: the job's time limit, as sbatch --time takes it (e.g. 4:00:00).",
        metavar="TIME",
    )
    account: str | None = _opt(None, "With --backend slurm: the account to charge.", metavar="ACCOUNT")

    # -- validation: every rule for every option, in one place ---------------------------------------
    def validated(self) -> Spec:
        """This spec, checked; raises :class:`UsageError` naming the option as the CLI spells it."""
        for f in fields(self):
            value = getattr(self, f.name)
            flag = _flag(f.name)
            _check_type(f.name, flag, str(f.type), value)
            if isinstance(value, bool) or value is None:
                continue
            if isinstance(value, (int, float)):
                _check_number(flag, value, f.metadata.get("minimum"), strict=f.name == "every_n_seconds")
            if "choices" in f.metadata and value not in f.metadata["choices"]:
                raise UsageError(
                    f"unknown {flag} {value!r}; choose one of: {', '.join(f.metadata['choices'])}"
                )
            if isinstance(value, str) and (
                "\x00" in value or (f.name not in ("script", "name") and "\n" in value)
            ):
                raise UsageError(f"{flag} must not contain a NUL or a newline: {value!r}")
        for seconds in self.simulate_preemptions:
            _check_number("--simulate-preemptions", seconds, 0.0)
        if any("\x00" in a for a in self.args):
            raise UsageError("script arguments must not contain a NUL byte")
        if self.name is not None:
            validate_name(self.name)
        if self.grace_period <= 0:
            raise UsageError(f"--grace-period must be > 0 seconds, got {self.grace_period:g}")
        if self.backend != "slurm":
            given = [_flag(n) for n in _SLURM_ONLY if getattr(self, n) is not None]
            if given:
                raise UsageError(f"{given[0]} needs --backend slurm")
        elif self.min_nodes is not None and self.min_nodes < self.num_nodes:
            # A SLURM job starts with all its nodes or not at all: nothing to go short-handed on.
            raise UsageError(
                f"--min-nodes {self.min_nodes}: a SLURM job gets all its --num-nodes {self.num_nodes} nodes"
                " or waits in the queue; the SLURM backend does not run short-handed"
            )
        if self.min_nodes is not None and self.min_nodes > self.num_nodes:
            raise UsageError(f"--min-nodes {self.min_nodes} is more than --num-nodes {self.num_nodes}")
        for capacity in self.simulate_capacity:
            if not 0 <= capacity <= self.num_nodes:
                raise UsageError(
                    f"--simulate-capacity {capacity}: between 0 and --num-nodes {self.num_nodes} machines"
                )
        if len(self.simulate_nodes) not in (0, len(self.simulate_preemptions)):
            raise UsageError("simulate_nodes must give one node per simulated preemption")
        for node in self.simulate_nodes:
            if not -1 <= node < self.num_nodes:
                raise UsageError(
                    f"--simulate-preemptions names node {node}, but the experiment has"
                    f" {self.num_nodes} node(s) (0..{self.num_nodes - 1})"
                )
        for key in _SLURM_ONLY:
            value = getattr(self, key)
            if value is not None and (
                not value.strip() or any(c.isspace() or c in "#'\"\\$`" for c in value)
            ):
                raise UsageError(
                    f"{_flag(key)} must be one word without quotes, '#', '$' or spaces, got {value!r}"
                )
        return self

    # -- the registry's copy -------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Spec:
        """Tolerant both ways: keys a newer version added are ignored, keys it lacks get defaults."""
        return cls.from_mapping(json.loads(text))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Spec:
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            key = _RENAMED.get(key, key)
            if key not in known:
                continue
            if isinstance(value, list):
                value = tuple(value)
            values[key] = value
        return cls(**values)

    def with_(self, **changes: Any) -> Spec:
        return replace(self, **changes)

    def command(self, python: str) -> list[str]:
        """The attempt's command line under the local launcher."""
        return [python, self.script, *self.args]

    @property
    def distributed(self) -> bool:
        """Whether attempts run under torchrun (several machines, or several processes on one)."""
        return self.num_nodes > 1 or self.nproc_per_node > 1

    def capacity_changes(self, other: Spec) -> dict[str, Any]:
        """The capacity options (nodes, processes) in which ``other`` differs from this spec: the
        only ones a resumed experiment may change, since spot capacity may come back short."""
        return {
            f.name: getattr(other, f.name)
            for f in fields(self)
            if f.metadata.get("capacity") and getattr(other, f.name) != getattr(self, f.name)
        }


#: Fields renamed since a spec was first stored in a registry (old name → new name).
_RENAMED = {"nodes": "num_nodes"}


@dataclass(frozen=True)
class OptionInfo:
    """What a front end needs to offer one Spec field as an option."""

    name: str
    flags: tuple[str, ...]
    kind: type
    default: Any
    help: str
    is_flag: bool = False
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    agent: bool = False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_KINDS = {"bool": bool, "int": int, "float": float, "str": str}


def options(for_agent: bool = False) -> list[OptionInfo]:
    """Every CLI option of ``run`` (or of ``agent``), derived from the fields: spelled with ``-``
    and, where the name has an underscore, with ``_`` too (Grid's and SkyPilot's users type both)."""
    found = []
    for f in fields(Spec):
        if not f.metadata.get("cli") or (for_agent and not f.metadata.get("agent")):
            continue
        dashed, underscored = _flag(f.name), "--" + f.name
        flags = (underscored, dashed) if underscored != dashed else (dashed,)
        flags = (*f.metadata.get("aliases", ()), *flags)
        annotation = str(f.type).split("|")[0].strip()
        kind = _KINDS.get(annotation, str)
        default = f.default if f.default is not MISSING else None
        if f.name == "simulate_capacity":
            kind, default = str, None  # "2,1" on the command line; parse_capacity reads it
        if f.name == "simulate_preemptions":
            kind, default = str, None  # "8,20" on the command line; parse_simulation reads it
        found.append(
            OptionInfo(
                name=f.name,
                flags=flags,
                kind=kind,
                default=default,
                help=f.metadata["help"],
                is_flag=kind is bool,
                choices=f.metadata.get("choices"),
                metavar=f.metadata.get("metavar"),
                agent=bool(f.metadata.get("agent")),
            )
        )
    return found


def validate_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise UsageError(
            f"invalid experiment name {name!r}: letters, digits, '.', '_', '-', not starting with"
            " '.', '_' or '-' (max 64)"
        )
    return name


def parse_simulation(text: str | Sequence[float] | None) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """``"8,1@20"`` → ``((8.0, 20.0), (-1, 1))``: attempt k gets a simulated notice after the k-th
    number of seconds, on the node before its ``@`` (-1: a node at random). Nodes are () when no
    entry names one, so single-machine specs stay as they always were."""
    if not text:
        return (), ()
    if not isinstance(text, str):
        return tuple(float(v) for v in text), ()
    seconds: list[float] = []
    nodes: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        node, at, after = part.rpartition("@")
        try:
            seconds.append(float(after))
            nodes.append(int(node) if at else -1)
        except ValueError:
            raise UsageError(
                f"--simulate-preemptions must be seconds (or NODE@seconds) separated by commas, got {text!r}"
            ) from None
    if not seconds:
        raise UsageError(f"--simulate-preemptions must be non-negative seconds, got {text!r}")
    for value in seconds:
        _check_number("--simulate-preemptions", value, 0.0)
    for target in nodes:
        if target < -1:
            raise UsageError(f"--simulate-preemptions: node {target} must be >= 0, got {text!r}")
    return tuple(seconds), (tuple(nodes) if any(n >= 0 for n in nodes) else ())


def parse_capacity(text: str | Sequence[int] | None) -> tuple[int, ...]:
    """``"2,1"`` → ``(2, 1)``: machines each attempt finds (simulated)."""
    if not text:
        return ()
    if not isinstance(text, str):
        return tuple(int(v) for v in text)
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(
            f"--simulate-capacity must be machine counts separated by commas, got {text!r}"
        ) from None


def simulation_text(spec: Spec) -> str:
    """The inverse of :func:`parse_simulation`, for a command line (the agent's, SLURM's)."""
    nodes = spec.simulate_nodes or (-1,) * len(spec.simulate_preemptions)
    return ",".join(
        (f"{node}@" if node >= 0 else "") + repr(after)
        for after, node in zip(spec.simulate_preemptions, nodes, strict=True)
    )


def _check_type(name: str, flag: str, annotation: str, value: Any) -> None:
    """The SDK passes Python values: a wrong type is a clear error here, not a TypeError later
    (``max_restarts="3"``; ``args="--lr 1"``, which would be split into characters)."""
    kind = annotation.split("|")[0].strip()
    if value is None and "None" in annotation:
        return
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
    }.get(kind)
    if kind.startswith("tuple["):
        inner = kind[len("tuple[") :].split(",")[0].strip()
        items_ok = all(
            isinstance(v, str) if inner == "str" else isinstance(v, (int, float)) and not isinstance(v, bool)
            for v in value
        ) if isinstance(value, tuple) else False  # fmt: skip
        ok = items_ok
    if ok is False:
        what = (
            "a list of strings" if name == "args" else kind.replace("tuple[float, ...]", "a list of numbers")
        )
        raise UsageError(f"{flag if name != 'args' else 'args'} must be {what}, got {value!r}")


def _check_number(flag: str, value: float, minimum: float | None, strict: bool = False) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{flag} must be a finite number, got {value!r}")
    if abs(value) > _MAX_INT:
        raise UsageError(f"{flag} is out of range: {value!r}")
    if strict and value <= 0:
        raise UsageError(f"{flag} must be > 0, got {value:g}")
    if minimum is not None and value < minimum:
        raise UsageError(f"{flag} must be >= {minimum:g}, got {value:g}")
