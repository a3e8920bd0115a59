"""``Experiment``: the Python face of the launcher, on the same engine and the same spec as the CLI."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from lightning_grid.errors import UsageError
from lightning_grid.launcher.engine import Engine
from lightning_grid.launcher.experiment import Status
from lightning_grid.launcher.report import describe
from lightning_grid.launcher.spec import Spec, parse_capacity, parse_simulation

__all__ = ["Experiment"]

_OPTIONS = frozenset(f.name for f in fields(Spec)) - {"script", "args"}


class Experiment:
    """A supervised run of a script.

    ``Experiment("mnist.py", resumable=True, use_spot=True, instance_type="p3.2xlarge").run()``
    blocks until the experiment ends (or is left pending) and returns its final :class:`Status`.

    The keyword options are the fields of :class:`lightning_grid.launcher.spec.Spec` — the same
    options, defaults and checks as ``lightning-grid run`` (``use_spot``, ``resumable``,
    ``instance_type``, ``max_restarts``, ``retries``, ``retry_delay``, ``artifacts``,
    ``simulate_preemptions``, ``grace_period``, ``cloud``, ``every_n_train_steps``,
    ``every_n_seconds``, ``name``). ``home`` and ``echo`` belong to this process, not the experiment.
    """

    def __init__(
        self,
        script: str,
        args: Sequence[str] = (),
        *,
        home: str | None = None,
        echo: bool = True,
        **options: Any,
    ) -> None:
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise UsageError(
                f"unknown Experiment option(s): {', '.join(unknown)}; valid: {', '.join(sorted(_OPTIONS))}"
            )
        if "simulate_preemptions" in options:
            seconds, nodes = parse_simulation(options["simulate_preemptions"])
            options["simulate_preemptions"] = seconds
            options.setdefault("simulate_nodes", nodes)
        if "simulate_capacity" in options:
            options["simulate_capacity"] = parse_capacity(options["simulate_capacity"])
        if isinstance(args, str):  # tuple("--lr 1") would be its characters
            raise UsageError(f"args must be a list of strings, got {args!r}")
        self._engine = Engine(home=home, echo=echo)
        self._spec = Spec(script=script, args=tuple(args), **options).validated()
        self.name: str | None = self._spec.name
        self._submitted = False

    def submit(self) -> Experiment:
        row = self._engine.submit(self._spec)
        self.name = row.name
        self._submitted = True
        return self

    def run(self) -> Status:
        """Submit (once: an existing experiment of the same name is an error, never silently
        another's) and supervise until it ends or is left pending."""
        if not self._submitted:
            self.submit()
        assert self.name is not None
        return self._engine.run(self.name).status

    def stop(self) -> Status:
        return self._engine.stop(self._require_name()).status

    @property
    def status(self) -> Status:
        return self._engine.registry.get(self._require_name()).status

    def describe(self) -> dict[str, Any]:
        """Everything ``lightning-grid status NAME --json`` shows."""
        return describe(self._engine.registry, self._require_name())

    def _require_name(self) -> str:
        if self.name is None:
            raise RuntimeError("submit() or run() the experiment first")
        return self.name
