"""The two points of a GNP/SAM step: ``theta`` moved by ``e`` and restored, the two gradients mixed.

Per parameter group ``k``: ``e = r_k T^2 g1 / ||T g1||`` (``T = |theta|`` element-wise under ASAM,
else 1; the norm is global); after the second pass ``theta`` is restored bitwise from its copy and
``.grad <- alpha g2 + (1 - alpha) c g1`` (:func:`mix_gradients_`).

The copies of ``g1`` and ``theta`` live in :class:`PassBuffers`: allocated once per *layout* (which
parameters have a gradient, in which group, the local shapes, dtypes and devices of their
gradients and values) and reused step after step, so a step does foreach ops over cached lists and
allocates nothing per tensor. A changed layout (a parameter group added, a gradient left None by
``zero_grad(set_to_none=True)``, a dtype, device or shape change, an FSDP reshard that changes a
rank's local pieces) rebuilds them, freeing the old ones first: never two copies at once. Each
buffer list is a set of views into one flat tensor per (dtype, device), which the local
perturbation all-reduces in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..layout.shards import _PLAIN_OR_NONE, _is_dtensor, local_grads, local_tensor

__all__ = ["FirstPass", "Layout", "PassBuffers", "average_first", "mix_gradients_", "perturb_", "restore_"]


def _flat_views(tensors: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Uninitialized buffers shaped like ``tensors``: views into one flat tensor per (dtype, device)."""
    sizes: dict[tuple[torch.dtype, torch.device], int] = {}
    for tensor in tensors:
        key = (tensor.dtype, tensor.device)
        sizes[key] = sizes.get(key, 0) + tensor.numel()
    flats = {key: torch.empty(size, dtype=key[0], device=key[1]) for key, size in sizes.items()}
    offsets = dict.fromkeys(sizes, 0)
    views = []
    for tensor in tensors:
        key = (tensor.dtype, tensor.device)
        views.append(flats[key][offsets[key]:offsets[key] + tensor.numel()].view(tensor.shape))
        offsets[key] += tensor.numel()
    return list(flats.values()), views


class Layout:
    """The parameters with a gradient (in group order), each group's slice of them, and the buffers for
    their first gradient (``first``, flat per dtype and device in ``first_flats``) and values (``theta``)."""

    __slots__ = ("complex", "first", "first_flats", "groups", "params", "plain", "theta")

    def __init__(self, params: list[torch.Tensor], groups: list[tuple[int, slice]], grads: Sequence[torch.Tensor],
                 values: Sequence[torch.Tensor], plain: bool) -> None:
        self.params = params
        self.groups = groups  # (index into param_groups, slice of params)
        self.plain = plain  # no DTensor: the parameters are their own local values
        self.complex = any(g.is_complex() for g in grads)
        self.first_flats, self.first = _flat_views(grads)
        self.theta = _flat_views(values)[1]

    def values(self) -> list[torch.Tensor]:
        """The locally held values of :attr:`params` (a DTensor's shard), modified in place by the perturbation."""
        return self.params if self.plain else [local_tensor(p.detach()) for p in self.params]


class PassBuffers:
    """The :class:`Layout` of the current step, rebuilt only when the layout changes (:attr:`rebuilds` counts)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._layout: Layout | None = None
        self.rebuilds = 0

    def layout(self, param_groups: Sequence[dict[str, Any]]) -> tuple[Layout, list[torch.Tensor]]:
        """The layout for the gradients now in ``.grad`` and those gradients' local tensors."""
        params = [p for group in param_groups for p in group["params"]]
        grads = local_grads(params)
        plain = set(map(type, params)) <= _PLAIN_OR_NONE  # a DTensor parameter has DTensor gradients
        key = (list(map(id, params)), [len(group["params"]) for group in param_groups],
               [None if g is None else (g.shape, g.dtype, g.device) for g in grads], plain)
        held = [g for g in grads if g is not None]
        if key != self._key:
            self._key, self._layout = None, None  # free the old buffers before allocating new ones
            self._layout = _build(param_groups, params, grads, plain)
            self._key = key
            self.rebuilds += 1
        return self._layout, held


def _build(param_groups: Sequence[dict[str, Any]], params: list[torch.Tensor], grads: list[torch.Tensor | None],
           plain: bool) -> Layout:
    with_grad, groups, start = [], [], 0
    flat_index = 0
    for index, group in enumerate(param_groups):
        for param in group["params"]:
            if grads[flat_index] is not None:
                with_grad.append(param)
            flat_index += 1
        if len(with_grad) > start:
            groups.append((index, slice(start, len(with_grad))))
            start = len(with_grad)
    held = [g for g in grads if g is not None]
    if any(g.layout != torch.strided for g in held):
        raise ValueError("GradientNormPenalty/SAM needs dense gradients, got a sparse one (e.g. from "
                         "nn.Embedding(sparse=True)); use dense gradients")
    values = with_grad if plain else [local_tensor(p.detach()) for p in with_grad]
    return Layout(with_grad, groups, held, values, plain)


@dataclass
class FirstPass:
    """What the first step leaves for the second: the parameters with a first gradient and that gradient."""

    params: list[torch.Tensor]
    first: list[torch.Tensor]  # g1 (local tensors; g1 / ||g1|| for mix="normalized")
    layout: Layout | None = None  # whose buffers hold first and theta (None: first is owned, theta never moved)
    moved: bool = False  # theta was moved: restore it from layout.theta
    finite: bool = True  # False: ||g1|| is not finite, theta never moved, the step must not apply
    penalized: bool = True  # False: a plain step of the periodic variant (g = g1)
    averaging: Any = None  # the running rank-average of g1 (local perturbation)
    batch_norm: Any = None  # a second_pass.BatchNormSnapshot
    hook: Any = None  # the DropGradHookState that masks the second pass

    @classmethod
    def plain(cls, params: Sequence[torch.Tensor]) -> FirstPass:
        """A plain step's: copies of the gradients in ``.grad`` (they become ``.grad`` again), nothing moved."""
        with_grad = [p for p in params if p.grad is not None]
        return cls(with_grad, [local_tensor(p.grad).clone() for p in with_grad], penalized=False)

    def set_first_as_grad(self) -> None:
        """``.grad <- g1`` (copies where ``first`` is a reused buffer) for a step on the first gradient alone."""
        first = [g.clone() for g in self.first] if self.layout is not None else self.first
        for param, g1 in zip(self.params, first):
            param.grad = _like_param(param, g1)


@torch.no_grad()
def perturb_(layout: Layout, grads: list[torch.Tensor], radii: Sequence[float], adaptive: Sequence[bool],
             global_norm: Callable[[], float], normalize: bool = False) -> float:
    """Save ``g1`` and ``theta`` into the layout's buffers and move ``theta`` by ``e`` (per group ``k``:
    ``r_k T^2 g1 / ||T g1||``); ``.grad`` is ``g1`` again afterwards. Returns ``||T g1||`` (not finite: nothing moved).

    ``grads``: the local gradients of ``layout.params``; ``radii``/``adaptive``: per ``param_groups`` entry;
    ``global_norm``: the global norm of the gradients now in ``.grad``; ``normalize``: the saved ``g1``
    becomes ``g1 / ||g1||`` (the plain norm, also under ASAM) for ``mix="normalized"``.
    """
    torch._foreach_copy_(layout.first, grads)
    values = layout.values()
    scaled = [part for index, part in layout.groups if adaptive[index]]
    for part in scaled:  # .grad <- g1 * theta for ||T g1|| (a real product's sign does not change the norm)
        torch._foreach_mul_(grads[part], torch._foreach_abs(values[part]) if layout.complex else values[part])
    norm = global_norm()
    if math.isfinite(norm):
        torch._foreach_copy_(layout.theta, values)
        for index, part in layout.groups if norm > 0.0 else ():
            step = layout.first[part]
            if adaptive[index]:  # .grad as scratch: theta^2 * g1, the product's order fixed for bitwise results
                step = grads[part]
                torch._foreach_copy_(step, layout.theta[part])
                torch._foreach_mul_(step, layout.theta[part])
                torch._foreach_mul_(step, layout.first[part])
            torch._foreach_add_(values[part], step, alpha=radii[index] / norm)
    for part in scaled:
        torch._foreach_copy_(grads[part], layout.first[part])
    if normalize and math.isfinite(norm):
        plain = global_norm() if scaled else norm
        torch._foreach_mul_(layout.first, 1.0 / plain if plain > 0.0 else 0.0)
    return norm


@torch.no_grad()
def restore_(first_pass: FirstPass) -> None:
    """Put ``theta`` back (bitwise, from its copy) and the BatchNorm statistics of the first pass."""
    if first_pass.moved:
        torch._foreach_copy_(first_pass.layout.values(), first_pass.layout.theta)
    if first_pass.batch_norm is not None:
        first_pass.batch_norm.restore()


def average_first(layout: Layout, group: Any) -> Any:
    """Start averaging the per-replica first gradients across ``group`` (local perturbation); ``.wait()`` ends it."""
    if len(layout.first_flats) == 1:  # the flat buffer itself: averaged in place
        work = dist.all_reduce(layout.first_flats[0], op=dist.ReduceOp.AVG, group=group, async_op=True)
        return work
    flat = torch.cat([g.reshape(-1) for g in layout.first])  # mixed dtypes: one collective in the promoted type
    work = dist.all_reduce(flat, op=dist.ReduceOp.AVG, group=group, async_op=True)

    class _Averaging:
        def wait(self) -> None:
            work.wait()
            offset = 0
            for g in layout.first:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    return _Averaging()


@torch.no_grad()
def mix_gradients_(all_params: Sequence[torch.Tensor], first_pass: FirstPass, alpha: float,
                   first_scale: float = 1.0) -> None:
    """``.grad <- alpha g2 + (1 - alpha) c g1`` over the union of both passes' gradients (a missing one is
    zero); ``c`` (``first_scale``) is 1, or the loss scale for the unit ``g1`` of ``mix="normalized"``. ``g1`` is
    first rank-averaged (local perturbation) and masked like the DDP hook masked ``g2`` (where it did)."""
    if first_pass.averaging is not None:
        first_pass.averaging.wait()
    if first_pass.hook is not None:
        first_pass.hook.mask_like_hook_(first_pass.params, first_pass.first)
    for param, grad in zip(first_pass.params, [p.grad for p in first_pass.params]):
        if grad is None:  # no gradient at the perturbed point: g2 = 0
            param.grad = torch.zeros_like(param)
    second = [g for g in local_grads(all_params) if g is not None]
    if alpha != 1.0:  # g2 * 1.0 is g2
        torch._foreach_mul_(second, alpha)
    if alpha < 1.0:
        torch._foreach_add_(local_grads(first_pass.params), first_pass.first, alpha=(1.0 - alpha) * first_scale)


def _like_param(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``local`` (a local gradient tensor) as a gradient of ``param`` (a DTensor with ``param``'s layout)."""
    if _is_dtensor(param):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape,
                                  stride=param.stride(), run_check=False)
    return local
