"""``Experiment``: the Python face of the launcher, on the same engine as the CLI."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_grid.launcher.engine import Engine, Spec
from lightning_grid.launcher.experiment import Status
from lightning_grid.launcher.report import describe

__all__ = ["Experiment"]


class Experiment:
    """A supervised run of a script.

    ``Experiment("mnist.py", resumable=True, use_spot=True, instance_type="p3.2xlarge").run()``
    blocks until the experiment ends (or is left pending) and returns its final :class:`Status`.
    """

    def __init__(
        self,
        script: str,
        args: Sequence[str] = (),
        *,
        name: str | None = None,
        resumable: bool = False,
        use_spot: bool = False,
        instance_type: str = "local",
        max_restarts: int = 20,
        retries: int = 0,
        artifacts: str | None = None,
        simulate_preemptions: Sequence[float] = (),
        grace_period: float = 120.0,
        cloud: str = "none",
        every_n_train_steps: int | None = None,
        every_n_seconds: float | None = None,
        home: str | None = None,
        echo: bool = True,
    ) -> None:
        self._engine = Engine(home=home, echo=echo)
        self._spec = Spec(
            script=script, args=list(args), name=name, resumable=resumable, use_spot=use_spot,
            instance_type=instance_type, max_restarts=max_restarts, retries=retries, artifacts=artifacts,
            simulate_preemptions=list(simulate_preemptions), grace_period=grace_period, cloud=cloud,
            every_n_train_steps=every_n_train_steps, every_n_seconds=every_n_seconds,
        )  # fmt: skip
        self.name: str | None = name

    def submit(self) -> Experiment:
        row = self._engine.submit(self._spec)
        self.name = row.name
        return self

    def run(self) -> Status:
        if self.name is None or not self._engine.registry.exists(self.name):
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
