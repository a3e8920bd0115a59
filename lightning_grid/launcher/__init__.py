"""The supervisor side: run a script, survive preemptions, restore artifacts, relaunch."""

from lightning_grid.launcher.engine import Engine, Spec
from lightning_grid.launcher.experiment import Outcome, Status

__all__ = ["Engine", "Spec", "Status", "Outcome"]
