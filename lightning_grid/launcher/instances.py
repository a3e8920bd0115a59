"""The instance-type catalogue: GPUs and prices from a dated data file, and the devices a type gets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from lightning_grid.errors import UsageError

__all__ = ["InstanceType", "catalogue", "lookup", "visible_devices", "gpu_count"]


@dataclass(frozen=True)
class InstanceType:
    name: str
    cloud: str
    gpus: int
    gpu: str
    gpu_memory_gb: int
    on_demand: float  # USD per hour
    spot: float  # USD per hour, typical


@lru_cache(maxsize=1)
def catalogue() -> dict[str, InstanceType]:
    raw = json.loads(resources.files("lightning_grid.launcher").joinpath("instances.json").read_text())
    return {name: InstanceType(name=name, **spec) for name, spec in raw["types"].items()}


def lookup(name: str) -> InstanceType:
    types = catalogue()
    if name not in types:
        raise UsageError(f"unknown instance type {name!r}; valid types: {', '.join(sorted(types))}")
    return types[name]


def visible_devices(instance: InstanceType, available_gpus: int, allowed: str | None = None) -> str | None:
    """``CUDA_VISIBLE_DEVICES`` for a run of this type on this machine (None: leave it unset).

    ``allowed`` is the launcher's own ``CUDA_VISIBLE_DEVICES``: the run gets the first of those
    devices (ids, UUIDs or MIG names), never devices the launcher itself was not given.
    """
    if instance.gpus == 0:
        return "" if instance.name == "cpu" else None
    if available_gpus == 0:
        return ""  # no GPU here at all: the type is simulated on the CPU (the launcher says so)
    if instance.gpus > available_gpus:
        raise UsageError(
            f"instance type {instance.name!r} needs {instance.gpus} GPU(s), this machine has {available_gpus}"
        )
    if allowed is not None:
        return ",".join([d.strip() for d in allowed.split(",") if d.strip()][: instance.gpus])
    return ",".join(str(i) for i in range(instance.gpus))


def gpu_count() -> int:
    """GPUs this launcher may hand out, without importing torch (the launcher stays small and quick)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    proc_dir = "/proc/driver/nvidia/gpus"
    if os.path.isdir(proc_dir):
        return len(os.listdir(proc_dir))
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return 0
        return sum(line.startswith("GPU ") for line in out.splitlines())
    return 0
