"""Every random number generator a training process draws from, captured and restored as one value.

Lightning's checkpoints hold no RNG state at all, so a resumed run draws different dropout masks,
augmentations and shuffles. The states here are stored as tensors and plain Python containers so
that the checkpoint still loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
import sys
from typing import Any

import torch

__all__ = ["capture", "restore"]


def _numpy() -> Any:
    # Workers and scripts that never imported numpy have no numpy RNG to save; importing it here
    # would not change that and would cost start-up time.
    return sys.modules.get("numpy")


def numpy_state(legacy: tuple[Any, ...]) -> dict[str, Any]:
    """numpy's legacy generator state (``RandomState.get_state()``) as plain values and a tensor:
    a checkpoint then loads with ``weights_only`` and without numpy's pickles."""
    kind, keys, pos, has_gauss, cached = legacy
    return {
        "kind": str(kind),
        "keys": torch.from_numpy(keys.astype("int64")),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def capture(include_cuda: bool = True) -> dict[str, Any]:
    """A snapshot of the python, numpy, torch CPU and (when in use) per-device CUDA generators."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
    }
    np = _numpy()
    if np is not None:
        state["numpy"] = numpy_state(np.random.get_state())
    # is_initialized first: is_available asks the driver (an NVML load) at every call.
    if include_cuda and torch.cuda.is_initialized() and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any]) -> None:
    """Put every generator back exactly where :func:`capture` found it."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    np_state = state.get("numpy")
    if np_state is not None:
        import numpy as np  # a snapshot with numpy state was taken where numpy was in use

        np.random.set_state(
            (
                np_state["kind"],
                np_state["keys"].numpy().astype(np.uint32),
                np_state["pos"],
                np_state["has_gauss"],
                np_state["cached_gaussian"],
            )
        )
    cuda_states = state.get("cuda")
    if cuda_states is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
