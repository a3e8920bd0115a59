"""The first step after a resume reduces its gradients in the bucket layout the uninterrupted run used.

Why this exists: DDP all-reduces gradients as flat buffers, one per bucket. Its first iteration
uses the parameters' definition order; before the second, it rebuilds the buckets in the order the
gradients became ready in the first backward. A collective sums each element in an order that
depends on where the element sits in the buffer (the chunks of a ring), so with three or more
processes the same gradients reduced in another layout can differ in the last bit (with two, every
sum is a + b). A run that was never interrupted reduces step k ≥ 2 in the rebuilt layout; a process
resumed at step k would reduce its first step in the initial one — measured: 3 processes, 2e-7 apart
at the end. So the checkpoint carries the rebuilt layout, and the resumed process reduces that one
backward in it, through a DDP communication hook (DDP's public extension point). From its second
step on, DDP's own rebuilt buckets are the saved ones and the hook only all-reduces what it is given,
scaling exactly as DDP's built-in reduction does.

Two torch details are relied on, both pinned by ``tests/unit/test_ddp_buckets.py``: the rebuilt
layout is read from DDP's logging data (``_get_ddp_logging_data``), and its indices number the
parameters as ``DistributedDataParallel._build_params_for_reducer`` does.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)

Layout = list[list[int]]


def capture(model: Any) -> Layout | None:
    """DDP's rebuilt bucket layout (parameter indices per bucket), or None where there is none yet
    (no DDP; or the buckets have not been rebuilt, before the second iteration)."""
    if not isinstance(model, DistributedDataParallel):
        return None
    try:
        text = model._get_ddp_logging_data().get("rebuilt_per_bucket_param_indices")
    except (AttributeError, RuntimeError):
        return None
    if not text:
        return None
    return [[int(i) for i in bucket.split()] for bucket in str(text).split(",") if bucket.strip()]


def reducer_parameters(model: DistributedDataParallel) -> list[torch.nn.Parameter]:
    """The parameters in the order DDP's reducer numbers them: every module's own parameters that
    need a gradient and are not ignored, in ``named_modules`` order, shared ones once."""
    ignored: set[str] = getattr(model, "parameters_to_ignore", set())
    seen: set[int] = set()
    params = []
    for module_name, module in model.module.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or f"{module_name}.{name}" in ignored or id(param) in seen:
                continue
            seen.add(id(param))
            params.append(param)
    return params


class _Replay:
    """The hook's state: the layout the next backward is reduced in (then None), and that
    backward's buckets held until the last one arrives."""

    def __init__(self, group: Any, world: int, layout: Layout, index_of: dict[int, int]) -> None:
        self.group = group
        self.world = world
        self.layout: Layout | None = layout
        self.index_of = index_of
        self.held: list[tuple[torch.futures.Future[torch.Tensor], torch.Tensor]] = []
        self.grads: dict[int, torch.Tensor] = {}

    def scale(self, buffer: torch.Tensor) -> None:
        # As DDP's own reduction scales a gradient it copies into a bucket: times 1/world (not
        # divided by world: the two round differently).
        buffer.mul_(1.0 / self.world)


def _hook(state: _Replay, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    buffer = bucket.buffer()
    state.scale(buffer)
    if state.layout is None:
        work = dist.all_reduce(buffer, group=state.group, async_op=True)
        assert work is not None
        return work.get_future().then(lambda fut: fut.value()[0])
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    state.held.append((future, buffer))
    for param, grad in zip(bucket.parameters(), bucket.gradients(), strict=True):
        state.grads[state.index_of[id(param)]] = grad  # a view of this bucket's buffer
    if bucket.is_last():
        _reduce_in(state.layout, state.grads, state.group)
        for held, reduced in state.held:
            held.set_result(reduced)
        state.layout, state.held, state.grads = None, [], {}
    return future


# DDP checks the hook's annotations as objects; ``from __future__ import annotations`` made strings.
_hook.__annotations__ = {
    "state": _Replay,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}


def _reduce_in(layout: Layout, grads: dict[int, torch.Tensor], group: Any) -> None:
    """All-reduce the gradients bucket by bucket of ``layout``, each as one flat buffer in the
    saved order, and write the sums back into the views."""
    for indices in layout:
        flat = torch.cat([grads[i].reshape(-1) for i in indices])
        dist.all_reduce(flat, group=group)
        offset = 0
        for i in indices:
            n = grads[i].numel()
            grads[i].copy_(flat[offset : offset + n].view_as(grads[i]))
            offset += n


def replay(model: Any, layout: Layout | None) -> bool:
    """Reduce the next backward of ``model`` in ``layout``. False, with the reason logged, where it
    cannot or need not be done."""
    if layout is None or not isinstance(model, DistributedDataParallel):
        return False
    group = model.process_group
    world = dist.get_world_size(group)
    if world < 3:
        return False  # a + b: the layout cannot change a sum of two
    params = reducer_parameters(model)
    wanted = sorted(i for bucket in layout for i in bucket)
    if wanted != list(range(len(params))) or getattr(model, "mixed_precision", None) is not None:
        log.info(
            "lightning_grid: the saved gradient buckets do not fit this model; the first step reduces as DDP does"
        )
        return False
    if model.gradient_as_bucket_view:
        # DDP then scales a gradient by multiplying or dividing depending on whether it was kept
        # between steps (``zero_grad(set_to_none=False)``), which a hook cannot see; a wrong guess
        # would change every later step, not one.
        log.info(
            "lightning_grid: gradient_as_bucket_view is on, so the first resumed step reduces in DDP's initial"
            " bucket layout (with 3+ processes the weights may differ from an uninterrupted run in the last bit)"
        )
        return False
    state = _Replay(group, world, layout, {id(p): i for i, p in enumerate(params)})
    try:
        model.register_comm_hook(state, _hook)
    except RuntimeError as exc:  # the user registered one: DDP takes a single hook
        log.info(
            "lightning_grid: a DDP communication hook is set, so the first resumed step reduces in DDP's"
            " initial bucket layout (with 3+ processes the weights may differ from an uninterrupted run in"
            " the last bit): %s",
            exc,
        )
        return False
    return True
