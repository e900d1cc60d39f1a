"""The mask engine's checked segment table (the DDP hook's buckets): bitwise ``drop_`` per segment.

A :class:`SegmentTable` checks its segments once and per call writes only the buffer's address and
the salts. Its masks, packs and unpacks must be bitwise those of the per-call entry points and of
``drop_`` on each segment (the uncached definition), on every backend, for any buffer of the
layout, at any step and scale, and across a change of segments (a new table).
"""

from __future__ import annotations

import pytest
import torch

from dropgrad_dist.mask import SegmentTable, drop_, pack_segments, unpack_segments_
from dropgrad_dist.mask.backends import same_bits

SEED = 5
# Lengths, keys, starts and rates of one layout: an untouched segment, rates 0 and 1, an empty one,
# and a segment crossing a salt block (start just below 2**31).
LAYOUT = [(300, "a.weight", 0, 0.3), (40, None, 0, None), (0, "empty", 0, 0.5), (250, "b.weight", 0, 0.0),
          (120, "c.weight", (1 << 31) - 60, 0.7), (90, "d.bias", 0, 1.0)]
OTHER = [(500, "b.weight", 0, 0.5), (300, "a.weight", 0, 0.9)]  # the same size as LAYOUT, new segments


def _buffer(numel: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _per_segment(buffer: torch.Tensor, segments: list, step: int, scale: float) -> torch.Tensor:
    """The uncached definition: ``drop_`` on each segment's view (untouched ones only scaled)."""
    out, offset = buffer.clone(), 0
    for numel, key, start, rate in segments:
        view = out[offset:offset + numel]
        if rate is None:
            view.mul_(scale)
        else:
            drop_(view, seed=SEED, step=step, key=key, rate=rate, start=start, extra_scale=scale)
        offset += numel
    return out


@pytest.mark.parametrize("backend_name", ["auto", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_masks_are_bitwise_drop_per_segment_across_steps_buffers_and_layouts(backend, backend_name, dtype):
    backend(backend_name)
    numel = sum(segment[0] for segment in LAYOUT)
    table, other = SegmentTable(_buffer(numel, dtype, 0), LAYOUT), SegmentTable(_buffer(numel, dtype, 0), OTHER)
    for step, scale in [(0, 0.5), (1, 0.5), (1, 1.0), (7, 0.25)]:
        for segments, engine in [(LAYOUT, table), (OTHER, other), (LAYOUT, table)]:
            buffer = _buffer(numel, dtype, 10 * step + len(segments))  # a new buffer (address) every call
            want = _per_segment(buffer, segments, step, scale)
            assert engine.drop_(buffer, seed=SEED, step=step, extra_scale=scale) is buffer
            assert same_bits(buffer, want), (backend_name, dtype, step, scale, len(segments))


@pytest.mark.parametrize("backend_name", ["auto", "eager"])
def test_pack_and_unpack_are_bitwise_the_per_call_entry_points(backend, backend_name):
    backend(backend_name)
    numel = sum(segment[0] for segment in LAYOUT)
    table = SegmentTable(_buffer(numel, torch.float32, 0), LAYOUT)
    for step in (0, 3):
        buffer = _buffer(numel, torch.float32, step)
        buffer[[5, 330]] = torch.tensor([float("inf"), float("nan")])  # the non-finite flag travels
        send = table.pack(buffer, seed=SEED, step=step, extra_scale=0.5)
        want = pack_segments(buffer, LAYOUT, seed=SEED, step=step, extra_scale=0.5)
        assert same_bits(send, want)
        received = send * 2
        got_back, want_back = buffer.clone(), buffer.clone()
        table.unpack_(got_back, received, seed=SEED, step=step)
        unpack_segments_(want_back, LAYOUT, received, seed=SEED, step=step)
        assert same_bits(got_back, want_back)
        with pytest.raises(ValueError, match="received must hold the kept coordinates"):
            table.unpack_(buffer.clone(), received[:-1].contiguous(), seed=SEED, step=step)


def test_bad_inputs_raise_naming_the_argument(backend):
    backend("auto")
    buffer = _buffer(10, torch.float32, 0)
    with pytest.raises(ValueError, match="segments must cover the buffer exactly"):
        SegmentTable(buffer, [(9, "a", 0, 0.5)])
    with pytest.raises(ValueError, match=r"segments\[0\].rate"):
        SegmentTable(buffer, [(10, "a", 0, 1.5)])
    with pytest.raises(TypeError, match=r"segments\[0\].key"):
        SegmentTable(buffer, [(10, 3, 0, 0.5)])
    with pytest.raises(ValueError, match="real floating point"):
        SegmentTable(torch.zeros(5, dtype=torch.complex64), [(5, "a", 0, 0.5)])
    table = SegmentTable(buffer, [(10, "a", 0, 0.5)])
    with pytest.raises(ValueError, match="segments must cover the buffer exactly"):  # another layout's buffer
        table.drop_(_buffer(12, torch.float32, 0), seed=SEED, step=0)
    with pytest.raises(ValueError, match="seed"):
        table.drop_(buffer, seed=-1, step=0)
    with pytest.raises(ValueError, match="received must be a contiguous tensor"):
        table.unpack_(buffer, torch.zeros(11, dtype=torch.float64), seed=SEED, step=0)


@pytest.mark.parametrize("backend_name", ["auto", "eager"])
def test_rerate_masks_as_a_fresh_table_at_the_new_rates(backend, backend_name):
    """A schedule's step re-rates the checked table: masks, packs and unpacks then match the new rates."""
    backend(backend_name)
    numel = sum(segment[0] for segment in LAYOUT)
    table = SegmentTable(_buffer(numel, torch.float32, 0), LAYOUT)
    for step, new_rates in enumerate([[0.9, None, 0.1, 0.5, 0.2, 0.0], [0.3, None, 0.5, 0.0, 0.7, 1.0]]):
        table.drop_(_buffer(numel, torch.float32, 1), seed=SEED, step=step)  # columns of the old rates in use
        table.rerate(new_rates)
        segments = [(numel_, key, start, rate) for (numel_, key, start, _), rate in zip(LAYOUT, new_rates)]
        buffer = _buffer(numel, torch.float32, 2 + step)
        want = _per_segment(buffer, segments, step, 0.5)
        table.drop_(buffer, seed=SEED, step=step, extra_scale=0.5)
        assert same_bits(buffer, want), (backend_name, new_rates)
        packed = _buffer(numel, torch.float32, 3)
        assert same_bits(table.pack(packed, seed=SEED, step=step),
                         pack_segments(packed, segments, seed=SEED, step=step))


def test_rerate_refuses_a_changed_layout():
    table = SegmentTable(_buffer(sum(segment[0] for segment in LAYOUT), torch.float32, 0), LAYOUT)
    with pytest.raises(ValueError, match="one rate per segment"):
        table.rerate([0.1])
    with pytest.raises(ValueError, match="None exactly where"):
        table.rerate([0.1, 0.2, 0.1, 0.1, 0.1, 0.1])  # segment 1 is unmasked: it has no key
    with pytest.raises(ValueError, match=r"rates\[k\]"):
        table.rerate([1.5, None, 0.1, 0.1, 0.1, 0.1])
