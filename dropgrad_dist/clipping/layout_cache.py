"""The clipper's norm pieces for one list of parameters, found once per gradient layout and reused.

Per step a clip needs: the locally held gradients, which of them enter the norm and in what
dtype, the shard groups their squares are summed over (:class:`dropgrad_dist.layout.norms.NormPlan`),
and, to scale, the gradients grouped by dtype with one factor slot per gradient. All of it
depends on the *layout* only: which parameters, and per gradient its type, dtype, device,
whether it is empty, its layout and its ``DTensor`` placements. A :class:`ClipLayout` keeps them
and is reused while the layout stays; the clipper builds a new one when it changes (new
parameters, a gradient dtype or placement changed, a gradient appeared or vanished). Gradients
reallocated with the same layout (``zero_grad(set_to_none=True)``, then backward) are
recognized by one signature pass and keep the pieces.

Scaling ``g_l <- c_l * g_l`` runs as one ``torch._foreach_mul_`` per dtype over 0-d views of a
factor buffer kept with the layout: the per-parameter factors are written into it by one copy
(gathered by one ``index_select`` when some gradient is absent or of another dtype), rounded to
each gradient's dtype as ``factors.to(dtype)`` would.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence

import torch

from ..layout.norms import NormPlan, norm_plan
from ..layout.shards import _PLAIN_OR_NONE, FlatPiece, local_grads, local_tensor

__all__ = ["ClipLayout"]


def _signature(grad: torch.Tensor | None) -> tuple | None:
    """What the norm pieces depend on in one gradient: never its values or its storage."""
    if grad is None:
        return None
    if type(grad) in _PLAIN_OR_NONE:
        return grad.dtype, grad.device, grad.numel() > 0, grad.layout
    local = local_tensor(grad)
    return (type(grad), tuple(getattr(grad, "placements", ())), getattr(grad, "device_mesh", None),
            local.dtype, local.device, local.numel() > 0, local.layout)


def _pointers(local: Sequence[torch.Tensor | None]) -> list[int | None]:
    return [None if g is None else g.data_ptr() for g in local]


class _DtypeGroup:
    """The gradients of one dtype: their positions, a factor buffer in their dtype and its 0-d views."""

    def __init__(self, dtype: torch.dtype, positions: list[int], every: bool, device: torch.device) -> None:
        self.dtype = dtype
        self.positions = None if every else tuple(positions)
        self.index: torch.Tensor | None = None if every else torch.tensor(positions, dtype=torch.long)
        self.device = device
        self._buffer: torch.Tensor | None = None
        self._views: list[torch.Tensor] = []

    def grads(self, local: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        return list(local) if self.positions is None else [local[i] for i in self.positions]  # type: ignore[misc]

    def factor_views(self, factors: torch.Tensor) -> list[torch.Tensor]:
        """Write ``factors`` (one per parameter) of this group's gradients into the buffer; its 0-d views."""
        if self._buffer is None:
            self._buffer = torch.empty(len(self.positions or factors), dtype=self.dtype, device=self.device)
            self._views = list(self._buffer.unbind())
        if self.index is not None:
            self.index = self.index.to(factors.device)
            factors = factors.index_select(0, self.index)
        self._buffer.copy_(factors)
        return self._views


class ClipLayout:
    """The norm plan and the per-dtype scaling groups of ``params`` under one gradient layout.

    :meth:`local` returns this step's local gradients when the layout is unchanged, else None
    (build a new one). Holds the parameters (their identity is part of the layout) and weak
    references to the gradients it last saw.
    """

    def __init__(self, params: Sequence[torch.Tensor], pieces: Mapping[torch.Tensor, FlatPiece] | None) -> None:
        self.params = list(params)
        self._ids = list(map(id, self.params))
        grads = [p.grad for p in self.params]
        self._signatures = list(map(_signature, grads))
        self._plain = set(map(type, grads)) <= _PLAIN_OR_NONE  # local gradients are the gradients themselves
        local = local_grads(self.params)
        self.plan: NormPlan = norm_plan(self.params, local, pieces)
        self._remember(grads, local)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for index, grad in enumerate(local):
            if grad is not None:
                by_dtype.setdefault(grad.dtype, []).append(index)
        self.dtype_groups = [_DtypeGroup(dtype, positions, len(positions) == len(local), local[positions[0]].device)
                             for dtype, positions in by_dtype.items()]

    def _remember(self, grads: list[torch.Tensor | None], local: list[torch.Tensor | None]) -> None:
        self._grads = [None if g is None else weakref.ref(g) for g in grads]
        self._pointers = _pointers(local)

    def local(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor | None] | None:
        """This step's local gradients of ``params`` if they have this layout, else None."""
        if list(map(id, params)) != self._ids:
            return None
        grads = [p.grad for p in params]
        if all(grad is (None if ref is None else ref()) for grad, ref in zip(grads, self._grads)):
            # The very gradient tensors: only an in-place swap of their data (``module.double()``,
            # ``module.to(device)``, ``resize_``) can change their layout, and it moves their storage.
            local = grads if self._plain else local_grads(params)
            return local if _pointers(local) == self._pointers else None
        if list(map(_signature, grads)) != self._signatures:
            return None
        local = grads if self._plain else local_grads(params)
        self._remember(grads, local)  # new gradient tensors of the same layout (zero_grad(set_to_none=True))
        return local

    def scale_(self, local: Sequence[torch.Tensor | None], coefficient: float) -> None:
        """``g <- coefficient * g`` for every gradient, one ``_foreach_mul_`` per dtype."""
        for group in self.dtype_groups:
            if group.device.type == "cpu":
                # CPU's foreach multiply by a Python scalar loops per tensor; a 0-d tensor of the gradients'
                # dtype takes the fused loop with the same product (the scalar is rounded to that dtype alike).
                torch._foreach_mul_(group.grads(local), torch.tensor(coefficient, dtype=group.dtype))
            else:
                torch._foreach_mul_(group.grads(local), coefficient)

    def scale_each_(self, local: Sequence[torch.Tensor | None], factors: torch.Tensor) -> None:
        """``g_l <- factors[l] * g_l``, each factor rounded to its gradient's dtype; one ``_foreach_mul_`` per dtype."""
        for group in self.dtype_groups:
            torch._foreach_mul_(group.grads(local), group.factor_views(factors))

