"""The periodic save's snapshot: a private host copy of every tensor of a checkpoint, taken on the
training thread at the cut, so that training goes on while the copy is written.

The host copies are kept from one periodic save to the next and filled again in place. Fresh
memory costs the copy its page faults: on a 2-vCPU VM, copying a 15 MB state into new tensors took
4.4–6.9 ms, into the same tensors again 2.0–3.0 ms, on the training thread at every save. Keeping
them does not raise the peak (the state and one copy, as before); between saves the copy stays
(the memory a periodic save needs anyway), and :meth:`Snapshots.release` gives it back once
training is over.
"""

from __future__ import annotations

from typing import Any

import torch

#: Values that are never copied: immutable, and they cannot hold a tensor.
_ATOMS = frozenset({int, float, bool, str, bytes, complex, type(None)})


def _plain(items: Any) -> bool:
    """Whether a list or tuple holds only atoms (a Python RNG state is a tuple of 625 ints)."""
    return {type(v) for v in items} <= _ATOMS


class Snapshots:
    """Copies of a checkpoint's tensors in host buffers this object keeps.

    A buffer is refilled by the tensor found at the same place of the next checkpoint when shape,
    dtype and strides match (the same model and optimizer: every time); otherwise a new one is
    made. Only one snapshot is alive at a time: :meth:`take` may be called again only once the
    previous snapshot's write has ended (the callback settles the writer before every cut).
    """

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []
        self._used = 0

    def take(self, obj: Any, copies: list[Any] | None = None) -> Any:
        """A private copy of every tensor in ``obj`` (through dicts, lists and tuples).

        With ``copies``, a CUDA tensor is copied into pinned host memory without blocking, in
        the order of its device's current stream: the training step does not wait for the copy,
        and the kernels it queues next (which change the tensor) run after it. One event per
        device is appended to ``copies``; whoever reads the snapshot waits for them first.
        Without ``copies`` every copy is complete on return. Containers of plain values are not
        walked element by element: a tuple is kept, a list copied in one go."""
        devices: set[torch.device] | None = set() if copies is not None else None
        self._used = 0
        snapshot = self._copy(obj, devices)
        del self._buffers[self._used :]  # tensors the checkpoint no longer has
        if copies is not None and devices:
            for device in devices:
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(device))
                copies.append(done)
        return snapshot

    def release(self) -> None:
        """Give the kept buffers back (training is over: no periodic save follows)."""
        self._buffers = []

    def _tensor(self, tensor: torch.Tensor, devices: set[torch.device] | None) -> torch.Tensor:
        tensor = tensor.detach()
        if devices is not None and tensor.is_cuda:
            devices.add(tensor.device)
            # non_blocking to the host: torch allocates the target pinned (cached, reused).
            return tensor.to("cpu", non_blocking=True, copy=True)
        if tensor.device.type != "cpu" or tensor.layout is not torch.strided or tensor.is_quantized:
            return tensor.to("cpu", copy=True)
        index = self._used
        self._used += 1
        if index < len(self._buffers):
            buffer = self._buffers[index]
            if (
                buffer.shape == tensor.shape
                and buffer.dtype == tensor.dtype
                and buffer.stride() == tensor.stride()
            ):
                return buffer.copy_(tensor)
        buffer = torch.empty_like(tensor).copy_(tensor)  # strides kept, as ``.to(copy=True)`` does
        if index < len(self._buffers):
            self._buffers[index] = buffer
        else:
            self._buffers.append(buffer)
        return buffer

    def _copy(self, obj: Any, devices: set[torch.device] | None) -> Any:
        if type(obj) in _ATOMS:
            return obj
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, devices)
        if isinstance(obj, dict):
            copied = {k: v if type(v) in _ATOMS else self._copy(v, devices) for k, v in obj.items()}
            if type(obj) is dict:
                return copied
            try:
                return type(obj)(copied)  # OrderedDict and friends
            except TypeError:
                return copied
        if isinstance(obj, list):
            if _plain(obj):
                return list(obj)
            return [self._copy(v, devices) for v in obj]
        if isinstance(obj, tuple):
            if _plain(obj):
                return obj
            copied_items = [self._copy(v, devices) for v in obj]
            if hasattr(obj, "_make"):  # a namedtuple
                return obj._make(copied_items)
            return tuple(copied_items)
        return obj
