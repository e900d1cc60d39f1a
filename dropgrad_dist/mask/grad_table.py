"""A piece table of many gradients built once per layout: per step only pointers and salts change.

``drop_tensors_`` rebuilds its pieces (keys hashed, rates coded, batches grouped) on every call:
about a microsecond of Python per tensor. A training loop masks gradients of the same layout step
after step, so :class:`GradTable` keeps the table's layout columns and per step refreshes, in one
numpy pass, what can change: the data pointers (``zero_grad(set_to_none=True)`` reallocates) and
the salts (they depend on the step). The table is rebuilt when the *layout* changes: which
gradients exist, their type, shape, dtype, device and contiguity, a DTensor's mesh and placements,
or the rates. The rows are those :func:`.dispatch.drop_tensors_` would build, so the masks are
bitwise those of :func:`.dispatch.drop_` per tensor.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np
import torch

from ..layout.shards import dtensor_segments
from . import backends
from .definition import MASK32, SALT_BLOCK, MaskStream, _key_hash, _rate_code, _salts
from .dispatch import refuse_overlap
from .pieces import TABLE_COLUMNS

__all__ = ["GradTable"]

_PLAIN_OR_NONE = frozenset((torch.Tensor, torch.nn.Parameter, type(None)))
_REAL_DTYPES = frozenset((torch.float32, torch.float64, torch.bfloat16, torch.float16))


class _Batch:
    """The rows of one (device, dtype): which local tensor each row lies in, and its fixed columns."""

    def __init__(self, owners: list[int], offsets: list[int], counts: list[int], words: list[int],
                 starts: list[int], rates: list[float], dtype: torch.dtype, element_size: int) -> None:
        self.owners = np.array(owners, dtype=np.int64)
        self.element_size = element_size
        self.device: torch.device | None = None
        self.byte_offsets = np.array(offsets, dtype=np.int64) * element_size
        self.words = np.array(words, dtype=np.uint64)
        start_array = np.array(starts, dtype=np.int64)
        self.blocks = (start_array >> 31).astype(np.uint64)
        self.within = (start_array & (SALT_BLOCK - 1)).astype(np.uint64)
        self.table = np.zeros((len(owners), TABLE_COLUMNS), dtype=np.int64)
        self.table[:, 2] = counts
        codes = {rate: _rate_code(rate, 1.0, dtype) for rate in set(rates)}
        self.table[:, 4] = [codes[rate][0] for rate in rates]
        self.table[:, 5] = np.array([codes[rate][1] for rate in rates], dtype=np.float64).view(np.int64)
        self.fits = bool(((start_array & (SALT_BLOCK - 1)) + np.array(counts, dtype=np.int64) <= SALT_BLOCK).all())


class GradTable:
    """Masks ``grads[k]`` with ``(keys[k], rates[k], starts[k])`` through a table cached per layout.

    :meth:`drop_` returns False (and masks nothing) where the cached path does not apply: a
    gradient that is not a plain or DTensor dense real contiguous tensor, no native kernel for a
    device, a piece crossing a salt block, tracing by torch.compile. The caller then takes the
    per-tensor path. ``keys``, ``rates`` and ``starts`` must be the same objects from step to step
    while unchanged: the layout compares them by identity.
    """

    def __init__(self) -> None:
        self._layout: tuple | None = None
        self._batches: list[_Batch] | None = None  # None: the layout is not cacheable
        self.rebuilds = 0  # how many times the table was built (tests check the cache is refreshed)

    def drop_(self, grads: Sequence[torch.Tensor | None], keys: Sequence[str], rates: Sequence[float],
              starts: Sequence[int], *, seed: int, step: int,
              stream: MaskStream = MaskStream.GRAD) -> tuple[list[int], Sequence[torch.Tensor | None]] | None:
        """Mask the gradients (rate 0 and None skipped) in place.

        Returns the positions masked and every gradient's local tensor, or None where nothing was done.
        """
        if torch.compiler.is_compiling():
            return None
        if set(map(type, grads)) <= _PLAIN_OR_NONE:
            locals_ = grads
            meshes: object = None
        else:
            locals_ = [_local(grad) for grad in grads]
            meshes = [None if grad is None or grad is local else (grad.device_mesh, grad.placements, grad.shape)
                      for grad, local in zip(grads, locals_)]
        holes = type(None) in set(map(type, locals_))
        try:
            layout = (keys, rates, starts, meshes, *_shapes_and_contiguity(locals_, holes))
        except (RuntimeError, AttributeError):  # a sparse layout: the per-tensor path explains
            return None
        if layout != self._layout:
            self._layout = None  # a failed build must not leave a stale table
            self._batches = _build(grads, locals_, keys, rates, starts)
            self._layout = layout
            self.rebuilds += 1
        if self._batches is None:
            return None
        positions = _apply(self._batches, locals_, holes, seed, step, stream)
        return None if positions is None else (positions, locals_)


_SHAPE_DTYPE_DEVICE = operator.attrgetter("shape", "dtype", "device")


def _shapes_and_contiguity(locals_: Sequence[torch.Tensor | None], holes: bool) -> tuple[list, bool]:
    """Each tensor's ``(shape, dtype, device)`` (None for None) and whether all are contiguous.

    Without a None (``holes``), ``map`` over C callables: no Python frame per tensor on every step.
    """
    if not holes:
        return list(map(_SHAPE_DTYPE_DEVICE, locals_)), all(map(torch.Tensor.is_contiguous, locals_))
    present = [t for t in locals_ if t is not None]
    return ([None if t is None else _SHAPE_DTYPE_DEVICE(t) for t in locals_],
            all(map(torch.Tensor.is_contiguous, present)))


def _local(grad: torch.Tensor | None) -> torch.Tensor | None:
    if grad is None or type(grad) in backends._PLAIN:
        return grad
    local = getattr(grad, "_local_tensor", None)  # a DTensor's shard; other subclasses: not cacheable
    return local if type(local) in backends._PLAIN else None


def _build(grads: Sequence[torch.Tensor | None], locals_: Sequence[torch.Tensor | None], keys: Sequence[str],
           rates: Sequence[float], starts: Sequence[int]) -> list[_Batch] | None:
    columns: dict[tuple, tuple[list, ...]] = {}
    for k, (grad, local) in enumerate(zip(grads, locals_)):
        if grad is None or rates[k] <= 0.0:
            continue
        if (local is None or local.layout is not torch.strided or local.dtype not in _REAL_DTYPES
                or not local.is_contiguous() or type(starts[k]) is not int or starts[k] < 0):
            return None
        if grad is local:
            pieces = [(0, starts[k], local.numel())] if local.numel() else []
        else:
            if starts[k]:
                return None
            base = local.data_ptr()
            size = local.element_size()
            pieces = [((view.data_ptr() - base) // size, start, view.numel())
                      for view, start in dtensor_segments(grad, local) if view.numel()]
        group = columns.setdefault((local.device, local.dtype), ([], [], [], [], [], []))
        word = _key_hash(keys[k])
        for offset, start, count in pieces:
            for column, value in zip(group, (k, offset, count, word, start, rates[k])):
                column.append(value)
    batches = []
    for (device, dtype), group in columns.items():
        if group[0]:
            batch = _Batch(*group, dtype, torch.empty((), dtype=dtype).element_size())
            if not batch.fits:
                return None
            batch.device = device
            batches.append(batch)
    return batches


def _apply(batches: list[_Batch], locals_: Sequence[torch.Tensor | None], holes: bool, seed: int, step: int,
           stream: MaskStream) -> list[int] | None:
    kernels = []
    for batch in batches:  # the backend may change between steps: choose before masking anything
        first = locals_[batch.owners[0]]
        kernel = backends._native_kernel(first)
        if kernel is None:
            return None
        kernels.append(kernel)
    pointers = (np.array([0 if t is None else t.data_ptr() for t in locals_], dtype=np.int64) if holes
                else np.fromiter(map(torch.Tensor.data_ptr, locals_), dtype=np.int64, count=len(locals_)))
    spans: dict[torch.device, list[np.ndarray]] = {}
    for batch in batches:
        batch.table[:, 0] = pointers[batch.owners] + batch.byte_offsets
        spans.setdefault(batch.device, []).append(_spans(batch))
    refuse_overlap(spans)  # overlapping gradients would be masked twice
    for batch, kernel in zip(batches, kernels):
        batch.table[:, 3] = ((_salts(seed, step, stream, batch.words, batch.blocks) + batch.within)
                             & np.uint64(MASK32)).view(np.int64)
        kernel.many(batch.table, batch.device)
    owners = np.unique(np.concatenate([batch.owners for batch in batches])).tolist() if batches else []
    masked = list(map(locals_.__getitem__, owners))
    backends.bump_versions(masked)  # the kernel wrote through pointers: tell autograd
    return owners


def _spans(batch: _Batch) -> np.ndarray:
    begins = batch.table[:, 0]
    ends = begins + batch.table[:, 2] * batch.element_size
    return np.stack([begins, ends], axis=1)[ends > begins]
