"""The per-bucket piece table of the DDP hook, built once per bucket layout.

A DDP bucket is a flat buffer holding its parameters' gradients back to back. The hook masks it
with one engine call over ``(numel, key, start, rate)`` pieces. Building them walks every
parameter (ownership check, plan lookup, complex test), so the table is cached per layout: the
parameters' identities in bucket order, the flat buffer's size, dtype and layout. DDP rebuilds its
buckets after the first iterations (and ``bucket.index()`` then names other parameters), which
gives a new key and so a new table. A table is rebuilt when the plan's configuration object
changes (an assigned ``drop_rate`` re-resolves the entries); under a schedule only the rates are
refreshed, when the plan's default rate changes. A real bucket's pieces are checked once, into a
:class:`~dropgrad_dist.mask.SegmentTable` that holds no buffer (DDP's rebuilt buckets are freed):
each round only the buffer's address and the salts are written.
"""

from typing import NamedTuple

import torch
import torch.distributed as dist

from .. import mask as _mask
from ..dropgrad.plan import DropPlan, ParamEntry

Piece = tuple[int, str | None, int, float | None]  # (numel, key, start, rate): the engine's segment

# Layouts kept at once: DDP has a handful of buckets, and one rebuild doubles them at most.
_MAX_LAYOUTS = 256


class Segment(NamedTuple):
    """One parameter's stretch of a bucket: ``buffer[offset:offset + length]``."""

    offset: int
    length: int
    entry: ParamEntry | None  # None: DropGrad leaves this parameter untouched
    is_complex: bool  # DDP all-reduces a complex gradient as pairs of reals


class BucketTable:
    """The segments of one bucket layout, its engine pieces at the current rates and their checked table."""

    __slots__ = ("segments", "has_complex", "config", "_pieces", "_rate", "_engine")

    def __init__(self, segments: list[Segment], config: object) -> None:
        self.segments = segments
        self.has_complex = any(segment.is_complex for segment in segments)
        self.config = config  # the plan configuration the entries come from
        self._pieces: list[Piece] | None = None
        self._rate: float | None = None  # the default rate the pieces were built at
        self._engine: _mask.SegmentTable | None = None  # the pieces checked once (real buckets)

    def pieces(self, plan: DropPlan) -> list[Piece]:
        """``(length, key, 0, rate)`` per segment (``(length, None, 0, None)`` untouched), at ``plan``'s rates."""
        rate = plan.default_rate()
        if self._pieces is None or rate != self._rate:
            self._pieces = [(s.length, None, 0, None) if s.entry is None else
                            (s.length, s.entry.key, 0, plan.rate_of(s.entry)) for s in self.segments]
            self._rate = rate
            if self._engine is not None:  # same layout, new rates: the checked segments stay
                self._engine.rerate([piece[3] for piece in self._pieces])
        return self._pieces

    def engine(self, plan: DropPlan, buffer: torch.Tensor) -> _mask.SegmentTable:
        """The pieces at ``plan``'s rates as a :class:`~dropgrad_dist.mask.SegmentTable` (a real ``buffer``).

        Built once per layout and rate: a round then costs one numpy pass, whatever the number of parameters.
        """
        pieces = self.pieces(plan)
        if self._engine is None:
            self._engine = _mask.SegmentTable(buffer, pieces)
        return self._engine


class BucketTables:
    """:class:`BucketTable` per bucket layout, built on first sight of the layout."""

    __slots__ = ("_tables", "builds")

    def __init__(self) -> None:
        self._tables: dict[tuple, BucketTable] = {}
        self.builds = 0  # tables built so far (a new layout each)

    def table(self, bucket: dist.GradBucket, plan: DropPlan, known: set) -> BucketTable:
        """The table of ``bucket``'s layout; ``known``: the parameters the state was built from."""
        buffer, params = bucket.buffer(), bucket.parameters()
        key = (tuple(map(id, params)), buffer.numel(), buffer.dtype, buffer.layout)
        table = self._tables.get(key)
        if table is None or table.config is not plan.config():
            table = BucketTable(_segments(buffer, params, plan, known), plan.config())
            if len(self._tables) >= _MAX_LAYOUTS:
                self._tables.clear()
            self._tables[key] = table
            self.builds += 1
        return table

    def clear(self) -> None:
        self._tables.clear()


def _segments(buffer: torch.Tensor, params: list[torch.Tensor], plan: DropPlan, known: set) -> list[Segment]:
    """The segments of ``params`` laid back to back over ``buffer``, checked to cover it exactly."""
    if buffer.layout != torch.strided:
        raise ValueError("DropGrad's DDP hook does not support sparse gradients (an embedding with "
                         "sparse=True?); use dense gradients")
    segments, offset = [], 0
    for param in params:
        if param not in known:
            raise ValueError("a DDP bucket holds a parameter this DropGradHookState was not built "
                             "from: build the state from the DDP model it is registered on")
        length = param.numel() * (2 if param.is_complex() else 1)
        segments.append(Segment(offset, length, plan.entry(param), param.is_complex()))
        offset += length
    if offset != buffer.numel():
        raise RuntimeError(f"unexpected DDP bucket layout: parameters hold {offset} elements, "
                           f"the bucket {buffer.numel()}")
    return segments


def mask_table_(buffer: torch.Tensor, table: BucketTable, plan: DropPlan, *, seed: int, step: int, scale: float,
                keep: torch.Tensor | None) -> None:
    """In place: ``buffer * keep / (1 - p) * scale`` on masked segments, ``buffer * scale`` elsewhere.

    Real buckets: one engine call. Buckets holding complex parameters go segment by segment (a
    complex number is one coordinate, its two reals dropped together).
    """
    if not table.has_complex:
        if keep is None:
            table.engine(plan, buffer).drop_(buffer, seed=seed, step=step, extra_scale=scale)
        else:
            _mask.drop_segments_(buffer, table.pieces(plan), seed=seed, step=step, extra_scale=scale, mask_out=keep)
        return
    for offset, length, entry, is_complex in table.segments:
        view = buffer[offset:offset + length]
        keep_view = None if keep is None else keep[offset:offset + length]
        if entry is None:
            view.mul_(scale)
            if keep_view is not None:
                keep_view.fill_(True)
            continue
        args = dict(seed=seed, step=step, key=entry.key, rate=plan.rate_of(entry), extra_scale=scale)
        if not is_complex:
            _mask.drop_(view, mask_out=keep_view, **args)
            continue
        pair_keep = None if keep_view is None else torch.empty(length // 2, dtype=torch.bool, device=view.device)
        _mask.drop_pairs_(view.view(-1, 2), mask_out=pair_keep, **args)
        if keep_view is not None:
            keep_view.view(-1, 2).copy_(pair_keep[:, None])
