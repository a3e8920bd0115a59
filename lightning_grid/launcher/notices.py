"""Where notices of a pending interruption come from: one small class per source, all ``poll()``.

``poll()`` never blocks for long and never raises: an unreachable or garbled metadata service is
logged once and asked again later, never taken for a preemption. Cloud sources rate-limit
themselves (the metadata services ask for polls every few seconds, not every 100 ms).
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import random
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

__all__ = [
    "Notice",
    "NoticeSource",
    "SimulatedPreemption",
    "LauncherSignals",
    "AWSSpotNotices",
    "GCPPreemptionNotices",
    "AzureScheduledEvents",
    "SlurmSignals",
    "cloud_notices",
    "notice_sources",
    "CLOUDS",
]

log = logging.getLogger("lightning_grid")


@dataclass(frozen=True)
class Notice:
    """A pending interruption: who said so, and by when the machine goes away (if known)."""

    source: str
    reason: str
    deadline: float | None = None  # monotonic time
    node: int | None = None  # the one node it reaches (multi-node); None: all of this launcher's


class NoticeSource(Protocol):
    def poll(self) -> Notice | None: ...


class SimulatedPreemption:
    """The local spot simulator: a notice ``after_s`` seconds into the attempt."""

    def __init__(
        self, after_s: float | None, clock: Callable[[], float] = time.monotonic, node: int | None = None
    ) -> None:
        self.after_s = after_s
        self.clock = clock
        self.start = clock()
        self.node = node

    def poll(self) -> Notice | None:
        if self.after_s is not None and self.clock() - self.start >= self.after_s:
            where = f" of node {self.node}" if self.node is not None else ""
            return Notice(
                "simulator", f"simulated spot interruption{where} after {self.after_s:g}s", node=self.node
            )
        return None


class LauncherSignals:
    """SIGTERM/SIGINT to the launcher itself (its machine is going down, or Ctrl-C): interrupt in
    order too. A SIGINT after the first signal (a second Ctrl-C) sets :attr:`escalated`: the
    attempt's supervisor then SIGKILLs the script's process group at once instead of waiting out
    the grace period; its last committed checkpoint stays."""

    #: The instance installed last in this process: the CLI asks it, after the engine returns,
    #: whether a second Ctrl-C ended the run (exit 130).
    latest: LauncherSignals | None = None
    #: Its notice is a signal already received: the supervisor reads it after the script's end too.
    delivered = True

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self.escalated = False
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handler)
        LauncherSignals.latest = self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handler(self, signum: int, frame: object) -> None:
        received = signal.Signals(signum)
        if self.received is None:
            self.received = received
            if received is signal.SIGINT:
                self._announce(
                    "stopping in order: the script gets SIGTERM to save and exit; press Ctrl-C again to kill it now"
                )
        elif received is signal.SIGINT and not self.escalated:
            self.escalated = True
            self._announce("killing the script now (SIGKILL); its last committed checkpoint stays")

    def poll(self) -> Notice | None:
        if self.received is not None:
            return Notice("launcher", f"the launcher received {self.received.name}")
        return None

    @staticmethod
    def _announce(message: str) -> None:
        """One line on stderr from a signal handler: a raw write, which cannot re-enter a buffered
        stream the interrupted code was in the middle of writing to."""
        try:
            os.write(2, f"lightning-grid: {message}\n".encode(errors="replace"))
        except OSError:
            pass


class SlurmSignals:
    """The SIGTERM SLURM sends a job step when it preempts the job (or cancels it, or its time
    limit comes), as a notice with SLURM's own window: the partition's ``GraceTime`` (``KillWait``
    when there is none: the time from SLURM's SIGTERM to its SIGKILL), less ``margin_s`` for the
    agent's own work after the script's exit (publishing, syncing, the story). Wraps the agent's
    :class:`LauncherSignals`: a SIGINT is still the agent's own interruption."""

    delivered = True  # as LauncherSignals: a signal, read after the script's end too

    def __init__(
        self, signals: LauncherSignals, window_s: float, job: str, margin_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.signals = signals
        self.window_s = max(0.0, window_s - margin_s)
        self.job = job
        self.clock = clock
        self._notice: Notice | None = None

    @property
    def escalated(self) -> bool:
        return self.signals.escalated

    def poll(self) -> Notice | None:
        if self._notice is None and self.signals.received is signal.SIGTERM:
            self._notice = Notice(
                "slurm",
                f"SLURM sent job {self.job} SIGTERM (preemption, cancel or time limit): {self.window_s:g}s to SIGKILL",
                self.clock() + self.window_s,
            )
        if self._notice is None:
            return self.signals.poll()
        return self._notice


def _mono_deadline(wall_deadline: float) -> float:
    return time.monotonic() + (wall_deadline - time.time())


class _MetadataSource:
    """Shared plumbing: rate limit, HTTP with a short timeout, log each kind of failure once."""

    name = "metadata"
    DEFAULT_URL = ""
    #: Overrides the base URL (a test server on 127.0.0.1, a metadata proxy).
    URL_ENV = ""

    def __init__(self, base_url: str | None = None, interval_s: float = 2.0, timeout_s: float = 1.0) -> None:
        self.base_url = (base_url or self.DEFAULT_URL).rstrip("/")
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._last_poll = float("-inf")
        self._notice: Notice | None = None
        self._logged: set[str] = set()
        self.early_warnings: list[str] = []

    def _request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        request = urllib.request.Request(self.base_url + path, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310 - configured URL
                return int(response.status), response.read()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read() or b""

    def _log_once(self, kind: str, message: str) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            log.warning("lightning-grid: %s metadata: %s (will keep asking)", self.name, message)

    def poll(self) -> Notice | None:
        if self._notice is not None:
            return self._notice
        now = time.monotonic()
        if now - self._last_poll < self.interval_s:
            return None
        self._last_poll = now
        try:
            self._notice = self._check()
        except Exception as exc:  # unreachable, timeout, garbled, malformed HTTP: never fatal
            self._log_once(type(exc).__name__, str(exc) or type(exc).__name__)
        return self._notice

    def _check(self) -> Notice | None:
        raise NotImplementedError


class AWSSpotNotices(_MetadataSource):
    """EC2 instance metadata, IMDSv2: a session token, then the spot ``instance-action``.

    404 while nothing is scheduled; 200 with ``{"action": "terminate"|"stop"|"hibernate", "time": ...}``
    two minutes before. The token is refreshed before it expires and after a 401. The rebalance
    recommendation is surfaced as an early warning only.
    """

    name = "aws"
    DEFAULT_URL = "http://169.254.169.254"
    URL_ENV = "LIGHTNING_GRID_AWS_METADATA_URL"

    def __init__(self, base_url: str | None = None, token_ttl_s: int = 21600, **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)
        self.token_ttl_s = token_ttl_s
        self._token: str | None = None
        self._token_expires = 0.0

    def _get_token(self) -> str:
        if self._token is None or time.monotonic() > self._token_expires - 60:
            status, body = self._request(
                "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": str(self.token_ttl_s)}
            )
            if status != 200:
                raise ValueError(f"token request answered {status}")
            self._token = body.decode().strip()
            self._token_expires = time.monotonic() + self.token_ttl_s
        return self._token

    def _get(self, path: str) -> tuple[int, bytes]:
        status, body = self._request("GET", path, {"X-aws-ec2-metadata-token": self._get_token()})
        if status == 401:  # expired or revoked: one fresh token, one more try
            self._token = None
            status, body = self._request("GET", path, {"X-aws-ec2-metadata-token": self._get_token()})
        return status, body

    def _check(self) -> Notice | None:
        status, body = self._get("/latest/meta-data/events/recommendations/rebalance")
        if status == 200 and not self.early_warnings:
            self.early_warnings.append(f"rebalance recommendation: {body.decode(errors='replace').strip()}")
            log.warning("lightning-grid: aws: %s", self.early_warnings[-1])
        status, body = self._get("/latest/meta-data/spot/instance-action")
        if status == 404:
            return None
        if status != 200:
            raise ValueError(f"instance-action answered {status}")
        action = json.loads(body)
        when = datetime.fromisoformat(str(action["time"]).replace("Z", "+00:00")).timestamp()
        return Notice(
            "aws", f"spot instance {action['action']} scheduled at {action['time']}", _mono_deadline(when)
        )


class GCPPreemptionNotices(_MetadataSource):
    """GCE metadata: ``instance/preempted`` is ``TRUE`` once a Spot/preemptible VM is being reclaimed;
    the VM then has 30 seconds."""

    name = "gcp"
    DEFAULT_URL = "http://metadata.google.internal"
    URL_ENV = "LIGHTNING_GRID_GCP_METADATA_URL"
    WINDOW_S = 30.0

    def _check(self) -> Notice | None:
        status, body = self._request(
            "GET", "/computeMetadata/v1/instance/preempted", {"Metadata-Flavor": "Google"}
        )
        if status != 200:
            raise ValueError(f"preempted answered {status}")
        value = body.decode().strip().upper()
        if value == "FALSE":
            return None
        if value != "TRUE":
            raise ValueError(f"unexpected preempted value {value[:40]!r}")
        return Notice("gcp", "spot VM preempted", time.monotonic() + self.WINDOW_S)


class AzureScheduledEvents(_MetadataSource):
    """Azure Scheduled Events: an event with ``EventType: "Preempt"`` and its ``NotBefore`` deadline."""

    name = "azure"
    DEFAULT_URL = "http://169.254.169.254"
    URL_ENV = "LIGHTNING_GRID_AZURE_METADATA_URL"

    def _check(self) -> Notice | None:
        status, body = self._request(
            "GET", "/metadata/scheduledevents?api-version=2020-07-01", {"Metadata": "true"}
        )
        if status != 200:
            raise ValueError(f"scheduledevents answered {status}")
        for event in json.loads(body).get("Events", []):
            if event.get("EventType") == "Preempt":
                not_before = event.get("NotBefore")
                deadline = (
                    _mono_deadline(email.utils.parsedate_to_datetime(not_before).timestamp())
                    if not_before
                    else None
                )
                return Notice("azure", f"spot VM eviction scheduled (NotBefore {not_before})", deadline)
        return None


CLOUDS: dict[str, type[_MetadataSource]] = {
    "aws": AWSSpotNotices,
    "gcp": GCPPreemptionNotices,
    "azure": AzureScheduledEvents,
}


def cloud_notices(
    cloud: str, environ: dict[str, str] | None = None, interval_s: float = 2.0
) -> list[NoticeSource]:
    """The notice sources for ``--cloud``: one named cloud, ``none``, or ``auto`` (ask each service)."""
    env = dict(os.environ) if environ is None else environ
    if cloud == "none":
        return []

    def make(name: str) -> _MetadataSource:
        cls = CLOUDS[name]
        return cls(env.get(cls.URL_ENV), interval_s=interval_s)

    if cloud in CLOUDS:
        return [make(cloud)]
    if cloud != "auto":
        raise ValueError(f"unknown cloud {cloud!r}")
    found: list[NoticeSource] = []
    for name in CLOUDS:
        source = make(name)
        source.timeout_s = 0.5
        try:
            source._check()
        except Exception:  # not this cloud
            continue
        found.append(source)
        break
    return found


def notice_sources(
    spec: Any, number: int, signals: NoticeSource, nodes: Sequence[int] = (0,)
) -> list[NoticeSource]:
    """Everything that can interrupt attempt ``number`` of an experiment with this spec (a
    :class:`~lightning_grid.launcher.spec.Spec`) on the ``nodes`` run here: the simulator on spot
    capacity, the launcher's own signals, and the cloud's metadata service. A simulated notice for
    a node that runs elsewhere is that machine's agent's to deliver."""
    simulated = spec.simulate_preemptions
    after = simulated[number - 1] if spec.use_spot and number - 1 < len(simulated) else None
    target = simulated_node(spec, number, nodes)
    position = None
    if target is not None and target not in nodes:
        after = None
    elif target is not None and len(nodes) > 1:
        position = nodes.index(target)
    return [SimulatedPreemption(after, node=position), signals, *cloud_notices(spec.cloud)]


def simulated_node(spec: Any, number: int, nodes: Sequence[int] | None = None) -> int | None:
    """The node attempt ``number``'s simulated notice reaches: the one named (``N@S``), else one of
    the attempt's ``nodes`` at random, as spot capacity is taken one machine at a time (seeded by
    the experiment and attempt, so a story can be replayed). None on a single machine."""
    if spec.num_nodes <= 1:
        return None
    named = spec.simulate_nodes
    if number - 1 < len(named) and named[number - 1] >= 0:
        return int(named[number - 1])
    running = sorted(nodes) if nodes is not None and len(nodes) > 1 else list(range(spec.num_nodes))
    return running[random.Random(f"{spec.name}/{number}").randrange(len(running))]
