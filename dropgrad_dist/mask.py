"""The mask engine: the single source of truth for which gradient coordinates are dropped.

Coordinate ``i`` (row-major index into the flattened parameter) of the parameter with
canonical name ``key`` is kept at step ``t`` under seed ``s`` and drop rate ``p`` iff

    hash32(salt(s, t, key, stream, i // 2**31) + i % 2**31)  <  round((1 - p) * 2**32) - 2**31

where ``hash32`` is a bijective 32-bit integer mixer (Wellons' lowbias32) evaluated in
signed int32 arithmetic with wrap-around, and ``salt`` is a 64-bit SplitMix-style mix of
the arguments computed in Python. Kept values are multiplied by ``1 / (1 - p)``.

The decision is a pure function of ``(s, t, key, i, p)``: it does not depend on the rank,
the world size, bucket or shard layout, the chunking used to compute it, the device, or
whether the compiled or eager path computed it. Because the hash is a bijection, the kept
count over any 2**32 consecutive coordinates is exactly ``round((1 - p) * 2**32)``, and
for a fixed coordinate the kept sets are nested in ``p``. No global RNG is touched.

Entry points: :func:`drop_` (one tensor), :func:`drop_tensors_` (many separate tensors, e.g.
every gradient of a model) and :func:`drop_segments_` (a flat buffer of back-to-back
parameters, e.g. a DDP bucket). The multi-tensor functions cost one kernel call per
(device, dtype), so their cost follows the number of elements, not of tensors.

How masks are computed (all bitwise identical; :func:`set_mask_backend` chooses):

1. native kernels (:mod:`dropgrad_dist._mask_kernels`): a C kernel on CPU, a Triton kernel on
   CUDA, each covering any number of tensors through a table of pointers;
2. elsewhere (other devices, tensor subclasses, inside ``torch.compile``): the torch-op
   definition below, compiled by ``torch.compile`` one contiguous piece at a time;
3. ``"eager"``: the same torch ops run eagerly, in row chunks.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import threading
import types
import warnings
from enum import IntEnum
from typing import Callable, Iterator, Literal, NamedTuple, Sequence

import numpy as np
import torch

from . import _mask_kernels
from .checks import SEED_LIMIT, check_count, check_int_in, check_rate, check_seed

__all__ = [
    "MaskStream",
    "Segment",
    "drop_",
    "drop_pairs_",
    "drop_segments_",
    "drop_tensors_",
    "keep_mask",
    "keep_probability",
    "keep_threshold",
    "key_hash",
    "mask_backend",
    "pack_segments",
    "set_mask_backend",
    "unpack_segments_",
    "uniform_u32",
]

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
_BLOCK = 1 << 31  # coordinates per salt block: keeps every int32 index non-negative
_LANE = 1024  # row length of the 2-D view; a precomputed lane vector avoids a slow vector arange
_EAGER_ROWS = 256  # rows per eager chunk: bounds the temporaries to a few MiB
_HASH_SHIFTS = (16, 15, 16)  # lowbias32: x ^= x >> 16; x *= C1; x ^= x >> 15; x *= C2; x ^= x >> 16
_HASH_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)


class MaskStream(IntEnum):
    """Independent random streams drawn from the same (seed, step, key)."""

    GRAD = 1  # which gradient coordinates are dropped
    UPDATE = 2  # which update coordinates are dropped (full_update_drop)
    SKIP = 3  # whether the whole step is skipped (step_skip_rate)
    CLIP = 4  # whether a random clipping method clips at this step


def _signed32(value: int) -> int:
    value &= _MASK32
    return value - (1 << 32) if value >= (1 << 31) else value


_C1 = _signed32(_HASH_MULTIPLIERS[0])
_C2 = _signed32(_HASH_MULTIPLIERS[1])


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


_SPLITMIX_NP = tuple(np.uint64(c) for c in (0x9E3779B97F4A7C15, 30, 0xBF58476D1CE4E5B9, 27, 0x94D049BB133111EB, 31))


def _splitmix64_np(x: np.ndarray) -> np.ndarray:
    # The same mix on a uint64 array, in place (numpy wraps modulo 2**64): one pass salts every piece.
    add, s1, m1, s2, m2, s3 = _SPLITMIX_NP
    x += add
    x ^= x >> s1
    x *= m1
    x ^= x >> s2
    x *= m2
    x ^= x >> s3
    return x


def key_hash(key: str) -> int:
    """Stable 64-bit hash of a parameter key (BLAKE2b; never Python's salted ``hash()``)."""
    if not isinstance(key, str):
        raise TypeError(f"key must be a str (a canonical parameter name), got {type(key).__name__}")
    return _key_hash(key)


@functools.lru_cache(maxsize=65536)  # keys repeat every step; hashing them once is enough
def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


@functools.lru_cache(maxsize=64)  # (seed, step) lead the chain: one mix of them serves every key of a step
def _step_word(seed: int, step: int) -> int:
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64))


def _salt(seed: int, step: int, key: int, stream: MaskStream, block: int) -> int:
    """``h = 0; h = splitmix64(h ^ w)`` for ``w`` in ``(seed, step, key, stream, block)`` (64-bit words)."""
    h = _splitmix64(_step_word(seed, step) ^ (key & _MASK64))
    h = _splitmix64(h ^ (int(stream) & _MASK64))
    return _splitmix64(h ^ (block & _MASK64))


def _salts(seed: int, step: int, stream: MaskStream, keys: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """:func:`_salt` of many (key, block) pairs at once (uint64 arrays)."""
    if keys.size <= 8:  # a numpy call costs ~1 us, a Python salt ~2 us: few pieces are faster one by one
        return np.array([_salt(seed, step, key, stream, block) for key, block in zip(keys.tolist(), blocks.tolist())],
                        dtype=np.uint64)
    h = _splitmix64_np(keys ^ np.uint64(_step_word(seed, step)))
    h ^= np.uint64(int(stream))
    h = _splitmix64_np(h)
    h ^= blocks
    return _splitmix64_np(h)


def uniform_u32(seed: int, step: int, stream: MaskStream, key: int = 0) -> int:
    """A uniform 32-bit integer decided by ``(seed, step, stream, key)`` alone (for per-step draws)."""
    return _salt(seed, step, key, stream, block=-1) & _MASK32


def keep_threshold(rate: float) -> int:
    """``T = round((1 - p) * 2**32)``: a coordinate is kept with probability exactly ``T / 2**32``."""
    return int(round((1.0 - float(rate)) * 4294967296.0))


def keep_probability(rate: float) -> float:
    """The exact probability that a coordinate is kept at drop rate ``rate``."""
    return keep_threshold(rate) / 4294967296.0


def _scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision of the kept coordinates' factor: float64 for float64 values, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=4096)
def _rate_code(rate: float, extra_scale: float, dtype: torch.dtype = torch.float32) -> tuple[int, float]:
    """``(threshold column, scale)`` of a kernel table row for ``rate`` (see :mod:`._mask_kernels`).

    Masked: ``T - 2**31`` and ``extra_scale / (1 - p)`` rounded to :func:`_scale_dtype` (as the torch
    ops below round it); all kept: ``2**31`` and the float64 factor; none kept: ``-2**31`` and 0.
    """
    threshold = keep_threshold(rate)
    if threshold >= 1 << 32:
        return _mask_kernels.KEEP_ALL, extra_scale / (1.0 - rate)
    if threshold == 0:
        return -(1 << 31), 0.0
    return threshold - (1 << 31), torch.tensor(extra_scale / (1.0 - rate), dtype=_scale_dtype(dtype)).item()


# --------------------------------------------------------------------------------------
# Argument checks, shared by every entry point (messages name the argument).


def _check_common(seed: int, step: int, extra_scale: float) -> None:
    check_seed(seed)
    check_count(step, "step")
    if isinstance(extra_scale, bool) or not isinstance(extra_scale, (int, float)) or not math.isfinite(extra_scale):
        raise ValueError(f"extra_scale must be a finite number, got {extra_scale!r}")


def _check_args(seed: int, step: int, rate: float, start: int, extra_scale: float = 1.0) -> float:
    # The common, valid call is decided by one expression; anything else gets the detailed checks.
    if (type(seed) is int and type(step) is int and type(start) is int and type(rate) is float
            and type(extra_scale) is float and 0 <= seed < SEED_LIMIT and 0 <= step < SEED_LIMIT
            and start >= 0 and 0.0 <= rate <= 1.0 and math.isfinite(extra_scale)):
        return rate
    _check_common(seed, step, extra_scale)
    check_int_in(start, "start", 0)
    return check_rate(rate, "rate")


def _check_tensor(tensor: torch.Tensor, name: str = "tensor") -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise ValueError(f"{name} must be dense (strided), got layout {tensor.layout}; DropGrad does not "
                         "support sparse gradients (use a dense embedding, sparse=False)")
    if not (tensor.is_floating_point() or tensor.is_complex()):
        raise ValueError(f"{name} must be floating point or complex, got {tensor.dtype}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous (mask a contiguous view of the gradient)")


def _check_key(key: object, name: str) -> int:
    if not isinstance(key, str):
        raise TypeError(f"{name} must be a str (a canonical parameter name), got {type(key).__name__}")
    return _key_hash(key)


def _check_mask_out(mask_out: torch.Tensor | None, tensor: torch.Tensor, of: str) -> torch.Tensor | None:
    """``mask_out`` as a flat uint8 view (the kernels store bytes), after checking it fits ``tensor``."""
    if mask_out is None:
        return None
    if (not isinstance(mask_out, torch.Tensor) or mask_out.dtype != torch.bool
            or mask_out.numel() != tensor.numel()):
        raise ValueError(f"mask_out must be a bool tensor with as many elements as {of}")
    if not mask_out.is_contiguous() or mask_out.device != tensor.device:
        raise ValueError(f"mask_out must be contiguous and on the device of {of} ({tensor.device})")
    return mask_out.view(-1).view(torch.uint8)


def _sequence(values: object, count: int, name: str) -> list:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a sequence with one entry per tensor, got {type(values).__name__}")
    if len(values) != count:
        raise ValueError(f"{name} must have one entry per tensor ({count}), got {len(values)}")
    return list(values)


# --------------------------------------------------------------------------------------
# The integer kernel as torch ops, shared verbatim by the compiled and the eager path.


def _srl(x: torch.Tensor, shift: int) -> torch.Tensor:
    # int32 ">>" is arithmetic; masking off the sign copies makes it a logical shift.
    return (x >> shift) & ((1 << (32 - shift)) - 1)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    s1, s2, s3 = _HASH_SHIFTS
    x = x ^ _srl(x, s1)
    x = x * _C1
    x = x ^ _srl(x, s2)
    x = x * _C2
    return x ^ _srl(x, s3)


def _apply(values: torch.Tensor, x: torch.Tensor, ctx: torch.Tensor, scale: torch.Tensor,
           mask_out: torch.Tensor | None) -> None:
    keep = _hash32(x) < ctx[1]
    # Multiplying (rather than selecting zeros) keeps inf/NaN visible on dropped coordinates.
    values.mul_(torch.where(keep, scale, 0.0))
    if mask_out is not None:
        # mask_out is a uint8 view of the bool mask: inductor vectorizes a uint8 store of where()
        # on CPU but not a bool store (15x slower); eager copies the bools directly.
        mask_out.copy_(torch.where(keep, 1, 0) if torch.compiler.is_compiling() else keep)


def _drop_rows(rows: torch.Tensor, lane: torch.Tensor, ctx: torch.Tensor, scale: torch.Tensor,
               row0: int, mask_out: torch.Tensor | None) -> None:
    # rows: [R, _LANE] view of consecutive coordinates; ctx = [salt + first index, threshold].
    row_ids = torch.arange(rows.shape[0], device=rows.device, dtype=torch.int32)[:, None] + row0
    _apply(rows, row_ids * _LANE + ctx[0] + lane[None, :], ctx, scale, mask_out)


def _drop_flat(flat: torch.Tensor, lane: torch.Tensor, ctx: torch.Tensor, scale: torch.Tensor,
               mask_out: torch.Tensor | None) -> None:
    # flat: fewer than _LANE consecutive coordinates; lane is lane[:flat.numel()].
    _apply(flat, lane + ctx[0], ctx, scale, mask_out)


def _eager_rows(rows, lane, ctx, scale, row0, mask_out) -> None:
    for r in range(0, rows.shape[0], _EAGER_ROWS):
        chunk_mask = None if mask_out is None else mask_out[r:r + _EAGER_ROWS]
        _drop_rows(rows[r:r + _EAGER_ROWS], lane, ctx, scale, row0 + r, chunk_mask)


# --------------------------------------------------------------------------------------
# Backend selection.

Backend = Literal["auto", "compiled", "eager"]
_BACKENDS = ("auto", "compiled", "eager")


def _backend_from_environment() -> Backend:
    value = os.environ.get("DROPGRAD_MASK_BACKEND", "auto")
    if value not in _BACKENDS:
        raise ValueError(f"$DROPGRAD_MASK_BACKEND must be one of {', '.join(map(repr, _BACKENDS))}, got {value!r}")
    return value  # type: ignore[return-value]


_backend: Backend = _backend_from_environment()
_compiled: dict[tuple, Callable] = {}
_compile_failed: set[str] = set()  # device types where torch.compile of the per-piece kernel failed
_native: dict[tuple, object] = {}  # (device type, dtype) -> checked native kernel, or None (dtype not covered)
_MISSING = object()
_native_failed: set[str] = set()  # device types whose native kernels failed to build or to check
_native_off = False
_NATIVE_BUILDERS = {"cpu": _mask_kernels.cpu_kernel, "cuda": _mask_kernels.cuda_kernel}
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # subclasses (DTensor, fake tensors) take the torch-op path
_lanes: dict[torch.device, torch.Tensor] = {}
_lock = threading.RLock()


def set_mask_backend(backend: Backend) -> None:
    """Choose how masks are computed: ``"compiled"``, ``"eager"``, or ``"auto"``.

    ``"compiled"``: the native multi-tensor kernel of the device (CPU, CUDA), else torch.compile;
    failures raise. ``"auto"`` (the default, or ``$DROPGRAD_MASK_BACKEND``) does the same and falls
    back, with one warning, to the next path where one fails. All give bitwise-identical masks.
    """
    global _backend
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of 'auto', 'compiled', 'eager', got {backend!r}")
    _backend = backend


def mask_backend() -> Backend:
    """The current mask backend (see :func:`set_mask_backend`)."""
    return _backend


def _lane(device: torch.device) -> torch.Tensor:
    lane = _lanes.get(device)
    if lane is None:
        lane = torch.arange(_LANE, dtype=torch.int32, device=device)
        _lanes[device] = lane
    return lane


def _compiled_fn(name: str, variant: tuple) -> Callable:
    key = (name, *variant)
    with _lock:
        fn = _compiled.get(key)
        if fn is None:
            target = {"rows": _drop_rows, "flat": _drop_flat}[name]
            # Dynamo's recompile budget is per code object: one code object per (device, dtype,
            # mask) variant keeps those variants from crowding each other out in a long run.
            code = target.__code__.replace(co_name="_".join(map(str, key)).replace(".", "_"))
            clone = types.FunctionType(code, target.__globals__, code.co_name, target.__defaults__)
            fn = torch.compile(clone, dynamic=True, fullgraph=True)
            _compiled[key] = fn
        return fn


def _warn_fallback(what: str, device_type: str, err: Exception, scope: str) -> None:
    warnings.warn(f"dropgrad_dist: {what} failed on {device_type} ({type(err).__name__}: {err}); using "
                  f"the next mask path {scope} (same masks, slower).", RuntimeWarning, stacklevel=4)


def _run(name: str, eager: Callable, *args) -> None:
    values, mask_out = args[0], args[-1]
    device_type = values.device.type
    use_compiled = _backend == "compiled" or (_backend == "auto" and device_type not in _compile_failed)
    if use_compiled:
        try:
            _compiled_fn(name, (device_type, values.dtype, mask_out is not None))(*args)
            return
        except Exception as err:  # compilation unavailable on this platform or device
            if _backend == "compiled":
                raise
            over_budget = type(err).__name__ in ("FailOnRecompileLimitHit", "RecompileLimitExceeded")
            if not over_budget:
                _compile_failed.add(device_type)
            _warn_fallback("torch.compile of the mask kernel", device_type, err,
                           "for this shape" if over_budget else "from now on")
    eager(*args)


def _run_eager(name: str, eager: Callable, *args) -> None:
    eager(*args)  # the definition itself, whatever the backend: what native kernels are checked against


@contextlib.contextmanager
def _native_kernels_off() -> Iterator[None]:
    """Within: the torch-op paths only (benchmarks compare them with the native kernels)."""
    global _native_off
    previous, _native_off = _native_off, True
    try:
        yield
    finally:
        _native_off = previous


def _native_kernel(tensor: torch.Tensor):
    """The native kernel for ``tensor``'s device and dtype, checked against the eager path on first use; or None."""
    if _backend == "eager" or _native_off:
        return None
    key = ("cpu" if tensor.is_cpu else tensor.device.type, tensor.dtype)  # is_cpu: 20x cheaper than .device
    kernel = _native.get(key, _MISSING)
    if kernel is _MISSING and key[0] in _NATIVE_BUILDERS and not (_backend == "auto" and key[0] in _native_failed):
        kernel = _build_native(key, tensor.device)
    return None if kernel is _MISSING else kernel


def _build_native(key: tuple, device: torch.device):
    device_type, dtype = key
    with _lock:
        if key not in _native:
            try:
                kernel = _NATIVE_BUILDERS[device_type](dtype, _HASH_MULTIPLIERS, _HASH_SHIFTS)
                if kernel is not None:
                    _self_check(kernel, device, dtype)
            except Exception as err:
                if _backend == "compiled":
                    raise
                _native_failed.add(device_type)
                _warn_fallback("the native mask kernel", device_type, err, "from now on")
                return _MISSING
            _native[key] = kernel
        return _native[key]


def _self_check(kernel, device: torch.device, dtype: torch.dtype) -> None:
    """Raise unless ``kernel`` gives the eager path's bits on a probe (pieces, rates, a block edge, a mask)."""
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(7000, generator=gen).to(device=device, dtype=dtype)
    cases = [(3000, "probe.a", 5, 0.3), (2500, "probe.b", (1 << 31) - 1000, 0.7), (1000, "probe.c", 0, 0.0),
             (500, "probe.d", 0, 1.0)]
    results = []
    for use_kernel in (True, False):
        out, keep = values.clone(), torch.empty(values.numel(), dtype=torch.bool, device=device)
        batch: list[_Piece] = []
        for n, key, start, rate in cases:
            offset = sum(piece[2] for piece in batch)
            batch.append((out, offset, n, _key_hash(key), start, rate, out.data_ptr() + offset * out.element_size()))
        if use_kernel:
            kernel.many(_table(batch, keep.view(torch.uint8), 1, 2, MaskStream.GRAD, 0.5), device)
        else:
            for piece in batch:
                _drop_piece_torch(piece, keep.view(torch.uint8), 1, 2, MaskStream.GRAD, 0.5, eager=True)
        results.append((out.view(_BITS[out.element_size()]), keep))
    if not (torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])):
        raise RuntimeError(f"the native {device.type} mask kernel for {dtype} disagrees with the eager "
                           "definition; refusing it")


_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


# --------------------------------------------------------------------------------------
# Batches: what one call masks, on one device and dtype.


# A piece: (tensor, offset, count, key word, start, rate, pointer) = global coordinates
# [start, start + count) of the key hashed to ``word``, stored contiguously from element
# ``offset`` of ``tensor``, whose byte address is ``pointer`` (0 where the torch ops mask it).
# A batch is a list of pieces of one device and dtype, masked by one call.
_Piece = tuple


def _table(batch: list[_Piece], mask: torch.Tensor | None, seed: int, step: int, stream: MaskStream,
           extra_scale: float) -> np.ndarray:
    """The native kernels' int64 piece table: pieces split at salt blocks, all salted in one numpy pass.

    ``mask`` (flat uint8) belongs to the batch's one tensor (a bucket, or a single tensor): the
    piece at element ``o`` writes ``mask[o:o + count]``.
    """
    tensors, offsets, counts, words, starts, rates, ptrs = zip(*batch)
    ptrs = np.array(ptrs, dtype=np.int64)
    counts = np.array(counts, dtype=np.int64)
    words = np.array(words, dtype=np.uint64)
    masks = None if mask is None else mask.data_ptr() + np.array(offsets, dtype=np.int64)
    try:
        start_array = np.array(starts, dtype=np.int64)
        blocks, within = (start_array >> 31).astype(np.uint64), start_array & (_BLOCK - 1)
    except OverflowError:  # a start beyond 2**63: legal, if useless
        blocks = np.array([(s >> 31) & _MASK64 for s in starts], dtype=np.uint64)
        within = np.array([s & (_BLOCK - 1) for s in starts], dtype=np.int64)
    codes = {rate: _rate_code(rate, extra_scale, tensors[0].dtype) for rate in set(rates)}
    thresholds = np.array([codes[rate][0] for rate in rates], dtype=np.int64)
    scales = np.array([codes[rate][1] for rate in rates], dtype=np.float64)
    if (within + counts).max() > _BLOCK:  # rare: split the pieces at salt-block boundaries
        ptrs, masks, counts, words, blocks, within, thresholds, scales = _split_at_blocks(
            tensors[0].element_size(), ptrs, masks, counts, words, blocks, within, thresholds, scales)
    table = np.empty((counts.size, _mask_kernels.TABLE_COLUMNS), dtype=np.int64)
    table[:, 0] = ptrs
    table[:, 1] = 0 if masks is None else masks
    table[:, 2] = counts
    table[:, 3] = (_salts(seed, step, stream, words, blocks) + within.astype(np.uint64)) & np.uint64(_MASK32)
    table[:, 4] = thresholds
    table[:, 5] = scales.view(np.int64)
    return table


def _split_at_blocks(size: int, ptrs: np.ndarray, masks: np.ndarray | None, counts: np.ndarray, *columns):
    """Columns of the pieces cut where they cross a salt block: ``[start, start + n)`` at multiples of 2**31."""
    words, blocks, within, thresholds, scales = columns
    parts = np.where(counts > 0, (within + counts - 1) // _BLOCK + 1, 0)
    rows = np.repeat(np.arange(counts.size), parts)
    k = np.arange(rows.size) - np.repeat(np.cumsum(parts) - parts, parts)  # part number within its piece
    first = np.where(k == 0, 0, k * _BLOCK - within[rows])  # the part's first coordinate in its piece
    part_within = np.where(k == 0, within[rows], 0)
    return (ptrs[rows] + first * size, None if masks is None else masks[rows] + first,
            np.minimum(counts[rows] - first, _BLOCK - part_within), words[rows],
            blocks[rows] + k.astype(np.uint64), part_within, thresholds[rows], scales[rows])


def _pieces(start: int, numel: int):
    """Split global coordinates ``[start, start + numel)`` at salt-block boundaries."""
    offset = 0
    while offset < numel:
        block, within = divmod(start + offset, _BLOCK)
        length = min(numel - offset, _BLOCK - within)
        yield offset, length, block, within
        offset += length


def _mask_batch(batch: list[_Piece], mask: torch.Tensor | None, seed: int, step: int, stream: MaskStream,
                extra_scale: float) -> None:
    """Mask a batch: one native kernel call, else piece by piece through the torch ops."""
    first = batch[0][0]
    kernel = _native_kernel(first) if _addressable(first) else None
    if kernel is not None:
        kernel.many(_table(batch, mask, seed, step, stream, extra_scale), first.device)
        # The kernel wrote through pointers: tell autograd, as an in-place torch op would.
        _bump_versions([first] if batch[-1][0] is first else [piece[0] for piece in batch])
        return
    with torch.no_grad():
        for piece in batch:
            _drop_piece_torch(piece, mask, seed, step, stream, extra_scale)


def _mask_tensor(tensor: torch.Tensor, word: int, start: int, rate: float, mask: torch.Tensor | None,
                 seed: int, step: int, stream: MaskStream, extra_scale: float) -> None:
    """:func:`drop_`'s core. On CPU one piece needs neither numpy nor a table: most of the fixed cost."""
    n = tensor.numel()
    kernel = _native_kernel(tensor) if _addressable(tensor) else None
    if kernel is None:
        with torch.no_grad():
            _drop_piece_torch((tensor, 0, n, word, start, rate, 0), mask, seed, step, stream, extra_scale)
        return
    within = start & (_BLOCK - 1)
    if tensor.is_cpu and within + n <= _BLOCK:
        threshold, scale = _rate_code(rate, extra_scale, tensor.dtype)
        base = (_salt(seed, step, word, stream, start >> 31) + within) & _MASK32
        kernel.one(tensor.data_ptr(), 0 if mask is None else mask.data_ptr(), n, base, threshold, scale)
    else:
        batch = [(tensor, 0, n, word, start, rate, tensor.data_ptr())]
        kernel.many(_table(batch, mask, seed, step, stream, extra_scale), tensor.device)
    _bump_versions((tensor,))


def _addressable(tensor: torch.Tensor) -> bool:
    """Whether the native kernels may write ``tensor`` through its data pointer."""
    # Subclasses (DTensor, fake tensors) and tensors being traced by torch.compile take the torch ops.
    return type(tensor) in _PLAIN and not torch.compiler.is_compiling()


def _drop_piece_torch(piece: _Piece, mask: torch.Tensor | None, seed: int, step: int, stream: MaskStream,
                      extra_scale: float, eager: bool = False) -> None:
    """One piece through the torch-op definition (torch.compile per salt block piece, or eager)."""
    tensor, offset, n, word, start, rate, _ = piece
    flat = tensor.view(-1)[offset:offset + n]
    flat_mask = None if mask is None else mask[offset:offset + n]
    threshold = keep_threshold(rate)
    if threshold >= (1 << 32) or threshold == 0:
        factor = extra_scale / (1.0 - rate) if threshold else 0.0
        if factor != 1.0:
            flat.mul_(factor)
        if flat_mask is not None:
            flat_mask.fill_(threshold != 0)
        return
    scale = torch.tensor(extra_scale / (1.0 - rate), dtype=_scale_dtype(flat.dtype)).to(flat.device)
    for at, length, block, within in _pieces(start, n):
        base = _salt(seed, step, word, stream, block) + within
        piece_mask = None if flat_mask is None else flat_mask[at:at + length]
        _mask_piece(flat[at:at + length], base, threshold, scale, piece_mask, eager)


def _mask_piece(flat: torch.Tensor, base: int, threshold: int, scale: torch.Tensor,
                mask_out: torch.Tensor | None, eager: bool = False) -> None:
    n = flat.numel()
    lane = _lane(flat.device)
    full = n - n % _LANE
    run = _run_eager if eager else _run
    if full:
        ctx = _ctx(base, threshold, flat.device)
        rows_mask = None if mask_out is None else mask_out[:full].view(-1, _LANE)
        run("rows", _eager_rows, flat[:full].view(-1, _LANE), lane, ctx, scale, 0, rows_mask)
    if full < n:
        tail_mask = None if mask_out is None else mask_out[full:]
        run("flat", _drop_flat, flat[full:], lane[: n - full], _ctx(base + full, threshold, flat.device),
            scale, tail_mask)


def _ctx(base: int, threshold: int, device: torch.device) -> torch.Tensor:
    ctx = torch.tensor([_signed32(base), threshold - (1 << 31)], dtype=torch.int32)
    return ctx if device.type == "cpu" else ctx.to(device, non_blocking=True)


def _bump_versions(tensors: Sequence[torch.Tensor]) -> None:
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:  # torch releases whose increment_version takes one tensor
        for tensor in tensors:
            torch.autograd.graph.increment_version(tensor)


# --------------------------------------------------------------------------------------
# Public entry points.


def drop_(
    tensor: torch.Tensor,
    *,
    seed: int,
    step: int,
    key: str,
    rate: float,
    start: int = 0,
    stream: MaskStream = MaskStream.GRAD,
    extra_scale: float = 1.0,
    mask_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """In place: ``tensor[j] *= keep(start + j) * extra_scale / (1 - rate)``.

    ``tensor`` holds the global coordinates ``[start, start + numel)`` of parameter ``key``
    (a contiguous slice of the flattened parameter, e.g. a DDP bucket view or an FSDP shard).
    ``rate == 0`` scales by ``extra_scale`` only; ``rate == 1`` multiplies by zero (zeros, never
    NaN, for finite input). Non-finite values stay non-finite. If ``mask_out`` (bool, same
    numel) is given it receives the keep mask. Returns ``tensor``.

    ``tensor`` must be dense, contiguous, floating point or complex (a complex number is one
    coordinate); ``seed`` and ``step`` are ints in ``[0, 2**64)``; anything else raises ``ValueError``.
    """
    rate = _check_args(seed, step, rate, start, extra_scale)
    _check_tensor(tensor)
    flat_mask = _check_mask_out(mask_out, tensor, "tensor")
    word = key_hash(key)
    if tensor.is_complex():
        _drop_complex_(tensor, seed=seed, step=step, key=key, rate=rate, start=start, stream=stream,
                       extra_scale=extra_scale, mask_out=mask_out)
        return tensor
    _mask_tensor(tensor, word, start, rate, flat_mask, seed, step, stream, extra_scale)
    return tensor


def _drop_complex_(tensor: torch.Tensor, **mask_args) -> None:
    drop_pairs_(torch.view_as_real(tensor.view(-1)), **mask_args)


def drop_pairs_(pairs: torch.Tensor, *, mask_out: torch.Tensor | None = None, **mask_args) -> torch.Tensor:
    """Mask ``n`` coordinates stored as ``[n, 2]`` reals (complex numbers): both parts share one decision.

    ``pairs[j] *= keep(start + j) * extra_scale / (1 - rate)``; other arguments as :func:`drop_`;
    ``mask_out`` (bool, ``n`` elements) receives one decision per coordinate. Needs no alignment,
    so it also serves complex gradients viewed as reals inside a DDP bucket.
    """
    if pairs.dim() != 2 or pairs.shape[1] != 2 or not pairs.is_floating_point():
        raise ValueError(f"pairs must be a floating [n, 2] tensor, got {pairs.dtype} of shape {tuple(pairs.shape)}")
    factor = torch.ones(pairs.shape[0], dtype=pairs.dtype, device=pairs.device)
    drop_(factor, mask_out=mask_out, **mask_args)
    with torch.no_grad():
        pairs.mul_(factor[:, None])
    return pairs


def drop_tensors_(
    tensors: Sequence[torch.Tensor],
    *,
    keys: Sequence[str],
    rates: Sequence[float] | float,
    starts: Sequence[int] | None = None,
    seed: int,
    step: int,
    stream: MaskStream = MaskStream.GRAD,
    extra_scale: float = 1.0,
) -> None:
    """In place, for every ``k``: ``drop_(tensors[k], key=keys[k], rate=rates[k], start=starts[k], ...)``.

    Bitwise the same as those calls, in one kernel call per (device, dtype): the cost follows the
    number of elements, not of tensors. ``rates`` is one rate per tensor or one for all;
    ``starts`` (default 0) is each tensor's first global coordinate (e.g. an FSDP piece). The
    tensors must not overlap in memory. Complex tensors are masked one by one.
    """
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise ValueError(f"tensors must be a sequence of tensors, got {type(tensors).__name__}")
    count = len(tensors)
    _check_common(seed, step, extra_scale)
    keys = _sequence(keys, count, "keys")
    rate_list = _rates(rates, count)
    start_list = [0] * count if starts is None else _sequence(starts, count, "starts")
    raw = not torch.compiler.is_compiling()  # traced by torch.compile: the torch ops only
    batches: dict[object, list[_Piece]] = {}
    complex_ = []
    for k, tensor in enumerate(tensors):
        try:  # the common case in one expression; anything else gets _check_tensor's messages
            plain = (type(tensor) in _PLAIN and tensor.layout is torch.strided and tensor.dtype in _REAL_DTYPES
                     and tensor.is_contiguous())
        except RuntimeError:  # a sparse layout without is_contiguous
            plain = False
        if not plain:
            _check_tensor(tensor, f"tensors[{k}]")
            if tensor.is_complex():  # a complex number is one coordinate: masked through a real factor
                complex_.append(k)
                continue
        key, start = keys[k], start_list[k]
        if type(key) is not str:
            _check_key(key, f"keys[{k}]")
        if type(start) is not int or start < 0:
            check_int_in(start, f"starts[{k}]", 0)
        plain = plain and raw
        group = (plain, tensor.dtype) if plain and tensor.is_cpu else (plain, tensor.device, tensor.dtype)
        batch = batches.get(group)
        if batch is None:
            batch = batches[group] = []
        batch.append((tensor, 0, tensor.numel(), _key_hash(key), start, rate_list[k],
                      tensor.data_ptr() if plain else 0))
    _check_disjoint([batch for group, batch in batches.items() if group[0]])
    for batch in batches.values():
        _mask_batch(batch, None, seed, step, stream, extra_scale)
    for k in complex_:
        _drop_complex_(tensors[k], seed=seed, step=step, key=keys[k], rate=rate_list[k], start=start_list[k],
                       stream=stream, extra_scale=extra_scale, mask_out=None)


_REAL_DTYPES = frozenset((torch.float32, torch.float64, torch.bfloat16, torch.float16))


def _rates(rates: object, count: int) -> list[float]:
    """One checked rate per tensor, from one number or a sequence of them."""
    if isinstance(rates, (int, float)) and not isinstance(rates, bool):
        return [check_rate(rates, "rates")] * count
    rate_list = _sequence(rates, count, "rates")
    if not all(type(rate) is float and 0.0 <= rate <= 1.0 for rate in rate_list):
        rate_list = [check_rate(rate, f"rates[{k}]") for k, rate in enumerate(rate_list)]
    return rate_list


def _check_disjoint(batches: list[list[_Piece]]) -> None:
    # Overlapping tensors would be masked twice, concurrently by a multi-threaded kernel: refuse them.
    if sum(map(len, batches)) < 2:
        return
    spans: dict[torch.device, list[np.ndarray]] = {}
    for batch in batches:
        first = batch[0][0]
        _, _, counts, _, _, _, ptrs = zip(*batch)
        begins = np.array(ptrs, dtype=np.int64)
        ends = begins + np.array(counts, dtype=np.int64) * first.element_size()
        spans.setdefault(first.device, []).append(np.stack([begins, ends], axis=1)[ends > begins])
    for device_spans in spans.values():
        both = np.concatenate(device_spans)
        order = np.argsort(both[:, 0], kind="stable")
        if np.any(both[order[1:], 0] < both[order[:-1], 1]):
            raise ValueError("tensors overlap in memory (the same storage listed twice, or views of one "
                             "another); mask each element once")


class Segment(NamedTuple):
    """``numel`` consecutive buffer elements: coordinates ``[start, start + numel)`` of ``key``.

    ``rate=None`` leaves the segment unmasked (scaled by ``extra_scale`` only; ``key`` unused).
    """

    numel: int
    key: str | None
    start: int
    rate: float | None


def drop_segments_(
    buffer: torch.Tensor,
    segments: Sequence[Segment | tuple[int, str | None, int, float | None]],
    *,
    seed: int,
    step: int,
    stream: MaskStream = MaskStream.GRAD,
    extra_scale: float = 1.0,
    mask_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """In place, segment by segment: ``drop_(buffer.view(-1)[o:o + numel], key=key, rate=rate, start=start, ...)``.

    ``segments`` are ``(numel, key, start, rate)`` laid back to back from offset 0 and covering the
    whole buffer (a DDP gradient bucket, ``extra_scale = 1 / world_size``); ``rate=None``: not
    masked, only scaled by ``extra_scale``. ``mask_out`` (bool, buffer-sized) receives the keep
    mask (True on unmasked segments). One kernel call per buffer. Returns ``buffer``.
    """
    _check_common(seed, step, extra_scale)
    _check_tensor(buffer, "buffer")
    flat_mask = _check_mask_out(mask_out, buffer, "buffer")
    batch = _segment_batch(buffer, segments)
    if buffer.is_complex():
        flat = buffer.view(-1)
        for k, (_, at, n, _, start, rate, _) in enumerate(batch):
            piece_mask = None if mask_out is None else mask_out.view(-1)[at:at + n]
            _drop_complex_(flat[at:at + n], seed=seed, step=step, key=segments[k][1] or "", rate=rate, start=start,
                           stream=stream, extra_scale=extra_scale, mask_out=piece_mask)
    elif batch:
        _mask_batch(batch, flat_mask, seed, step, stream, extra_scale)
    return buffer


def _segment_batch(buffer: torch.Tensor, segments: object) -> list[_Piece]:
    """The pieces of ``segments`` laid back to back over ``buffer``, checked to cover it exactly."""
    if isinstance(segments, (str, bytes)) or not isinstance(segments, Sequence):
        raise ValueError(f"segments must be a sequence of (numel, key, start, rate), got {type(segments).__name__}")
    batch: list[_Piece] = []
    offset = 0
    ptr, size = (buffer.data_ptr(), buffer.element_size()) if _addressable(buffer) else (0, 0)
    for k, segment in enumerate(segments):
        numel, word, start, rate = _checked_segment(segment, k)
        batch.append((buffer, offset, numel, word, start, rate, ptr + offset * size))
        offset += numel
    if offset != buffer.numel():
        raise ValueError(f"segments must cover the buffer exactly: they hold {offset} elements, "
                         f"the buffer {buffer.numel()}")
    return batch


def _checked_segment(segment: object, k: int) -> tuple[int, int, int, float]:
    """``(numel, key hash, start, rate)`` of ``segments[k]``; an unmasked segment is rate 0 (all kept)."""
    if not isinstance(segment, tuple) or len(segment) != 4:
        raise ValueError(f"segments[{k}] must be a (numel, key, start, rate) tuple, got {segment!r}")
    numel, key, start, rate = segment
    if type(numel) is not int or numel < 0:
        check_int_in(numel, f"segments[{k}].numel", 0)
    if type(start) is not int or start < 0:
        check_int_in(start, f"segments[{k}].start", 0)
    if rate is None:
        return numel, 0, start, 0.0
    if type(rate) is not float or not 0.0 <= rate <= 1.0:
        rate = check_rate(rate, f"segments[{k}].rate")
    return numel, _check_key(key, f"segments[{k}].key"), start, rate


# --------------------------------------------------------------------------------------
# Compaction: the kept coordinates of a masked buffer, contiguous (DDP's compact all-reduce).


def pack_segments(
    buffer: torch.Tensor,
    segments: Sequence[Segment | tuple[int, str | None, int, float | None]],
    *,
    seed: int,
    step: int,
    stream: MaskStream = MaskStream.GRAD,
    extra_scale: float = 1.0,
) -> torch.Tensor:
    """The kept coordinates of the masked ``buffer``, contiguous, then a non-finite flag; ``buffer`` is unchanged.

    With ``v = drop_segments_(buffer.clone(), segments, ...)`` and ``K`` its kept positions ascending:
    ``send[:-1] = v[K]``, ``send[-1] = sum(v * 0)`` (IEEE, from ``-0``): NaN if any ``v`` is inf or
    NaN, else ``-0`` if every ``v`` has its sign bit set, else ``+0``; it never overflows. ``len(K)``
    depends on the segments, seed, step and stream alone, so every rank sends the same size.

    One native kernel call computes the mask on the fly (no bool mask, no index array); elsewhere
    the torch ops give the same bits. ``buffer``: a real floating, dense, contiguous tensor (complex
    buffers: :func:`drop_segments_` with ``mask_out``); other arguments as :func:`drop_segments_`.
    """
    batch = _compaction_args(buffer, segments, seed, step, extra_scale)
    kernel = _native_packer(buffer)
    if kernel is None:
        return _pack_torch(buffer, segments, seed, step, stream, extra_scale)
    return kernel.pack(_table(batch, None, seed, step, stream, extra_scale) if batch else _EMPTY_TABLE, buffer)


def unpack_segments_(
    buffer: torch.Tensor,
    segments: Sequence[Segment | tuple[int, str | None, int, float | None]],
    received: torch.Tensor,
    *,
    seed: int,
    step: int,
    stream: MaskStream = MaskStream.GRAD,
) -> torch.Tensor:
    """In place, :func:`pack_segments` undone on a (summed) ``received``: kept from it, dropped ``x * 0``.

    ``buffer[K] = received[:-1]``; ``buffer[j] = buffer[j] * 0`` at dropped ``j`` (what masking
    leaves there: a signed zero, NaN where the value is not finite); then ``buffer[0] += received[-1]``
    (the summed flag). The mask is recomputed from the hash, never stored. ``received`` must hold
    ``len(K) + 1`` elements of ``buffer``'s dtype on its device, else ``ValueError`` (``buffer`` then
    holds unspecified values). Returns ``buffer``.
    """
    batch = _compaction_args(buffer, segments, seed, step, 1.0)
    if (not isinstance(received, torch.Tensor) or received.dtype != buffer.dtype or received.device != buffer.device
            or not received.is_contiguous()):
        raise ValueError(f"received must be a contiguous tensor of the buffer's dtype ({buffer.dtype}) and device "
                         f"({buffer.device})")
    kernel = _native_packer(buffer) if _addressable(received) else None
    if kernel is None:
        _unpack_torch(buffer, segments, received, seed, step, stream)
        return buffer
    table = _table(batch, None, seed, step, stream, 1.0) if batch else _EMPTY_TABLE
    kept = kernel.unpack(table, buffer, received.view(-1))
    if kept < 0:
        raise ValueError(f"received must hold the kept coordinates plus one flag element, got {received.numel()} "
                         "elements (pack_segments with the same segments, seed, step and stream gives the size)")
    _bump_versions((buffer,))
    return buffer


_EMPTY_TABLE = np.zeros((0, _mask_kernels.TABLE_COLUMNS), dtype=np.int64)


def _compaction_args(buffer: torch.Tensor, segments: object, seed: int, step: int,
                     extra_scale: float) -> list[_Piece]:
    _check_common(seed, step, extra_scale)
    _check_tensor(buffer, "buffer")
    if buffer.is_complex():
        raise ValueError("buffer must be real floating point for pack_segments/unpack_segments_ (a complex "
                         "buffer: drop_segments_ with mask_out)")
    return _segment_batch(buffer, segments)


def _kept_positions(keep: torch.Tensor) -> torch.Tensor:
    """Positions of the True entries of a flat bool mask, ascending (int64).

    On CPU numpy's nonzero is branch-free, ~10x faster than torch's on a random mask.
    """
    if keep.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(keep.numpy()))
    return keep.nonzero().squeeze(1)


def _nonfinite_flag(values: torch.Tensor) -> torch.Tensor:
    """``sum(values * 0)`` from ``-0`` as one element: NaN if any value is not finite, else -0 iff all signs are set."""
    nan = torch.full((1,), float("nan"), dtype=values.dtype, device=values.device)
    signed = torch.where(torch.signbit(values).all(), -0.0, 0.0).to(values.dtype).reshape(1)
    return torch.where((values * 0).isnan().any(), nan, signed)


@torch.no_grad()
def _pack_torch(buffer: torch.Tensor, segments, seed: int, step: int, stream: MaskStream,
                extra_scale: float) -> torch.Tensor:
    """:func:`pack_segments` through torch ops: mask a copy, gather the kept positions."""
    values = buffer.detach().reshape(-1).clone()
    keep = torch.empty(values.numel(), dtype=torch.bool, device=values.device)
    drop_segments_(values, segments, seed=seed, step=step, stream=stream, extra_scale=extra_scale, mask_out=keep)
    index = _kept_positions(keep)
    send = torch.empty(index.numel() + 1, dtype=values.dtype, device=values.device)
    torch.index_select(values, 0, index, out=send[:-1])
    send[-1:].copy_(_nonfinite_flag(values))
    return send


@torch.no_grad()
def _unpack_torch(buffer: torch.Tensor, segments, received: torch.Tensor, seed: int, step: int,
                  stream: MaskStream) -> None:
    """:func:`unpack_segments_` through torch ops: masking leaves ``x * 0`` where dropped; kept ones are replaced."""
    flat = buffer.view(-1)
    keep = torch.empty(flat.numel(), dtype=torch.bool, device=flat.device)
    drop_segments_(flat, segments, seed=seed, step=step, stream=stream, mask_out=keep)
    index = _kept_positions(keep)
    if index.numel() + 1 != received.numel():
        raise ValueError(f"received must hold the kept coordinates plus one flag element ({index.numel() + 1}), "
                         f"got {received.numel()} elements")
    received = received.view(-1)
    flat.index_copy_(0, index, received[:-1])
    flat[:1].add_(received[-1:])  # + 0, or + NaN when a value was not finite (on any rank, once summed)


_packers: dict[tuple, object] = {}  # (device type, dtype) -> native kernel whose pack/unpack passed the check, or None


def _native_packer(tensor: torch.Tensor):
    """The native kernel for ``tensor`` if it packs (checked against the torch ops on first use); or None."""
    kernel = _native_kernel(tensor) if _addressable(tensor) else None
    if kernel is None or not hasattr(kernel, "pack"):
        return None
    key = ("cpu" if tensor.is_cpu else tensor.device.type, tensor.dtype)
    packer = _packers.get(key, _MISSING)
    if packer is _MISSING:
        with _lock:
            try:
                _check_packer(kernel, tensor.device, tensor.dtype)
                packer = kernel
            except Exception as err:
                if _backend == "compiled":
                    raise
                _warn_fallback("the native pack/unpack kernel", key[0], err, f"for {tensor.dtype} from now on")
                packer = None
            _packers[key] = packer
    return packer


def _check_packer(kernel, device: torch.device, dtype: torch.dtype) -> None:
    """Raise unless ``kernel``'s pack and unpack give the torch ops' bits on probes (finite, then with inf/NaN)."""
    gen = torch.Generator().manual_seed(1)
    segments = [(3000, "probe.a", 5, 0.3), (2500, "probe.b", (1 << 31) - 1000, 0.7), (700, None, 0, None),
                (1000, "probe.c", 0, 0.0), (500, "probe.d", 0, 1.0)]
    values = (torch.randn(7700, generator=gen) * 100).to(device=device, dtype=dtype)
    poisoned = values.clone()
    poisoned[[17, 4000]] = torch.tensor([float("inf"), float("nan")], dtype=dtype, device=device)
    for probe in (values, poisoned):
        table = _table(_segment_batch(probe, segments), None, 3, 4, MaskStream.GRAD, 0.5)
        send = kernel.pack(table, probe)
        want = _pack_torch(probe, segments, 3, 4, MaskStream.GRAD, 0.5)
        received = (want * 2).to(dtype)
        got_back, want_back = probe.clone(), probe.clone()
        kernel.unpack(_table(_segment_batch(got_back, segments), None, 3, 4, MaskStream.GRAD, 1.0), got_back,
                      received)
        _unpack_torch(want_back, segments, received, 3, 4, MaskStream.GRAD)
        if not (_same_bits(send, want) and _same_bits(got_back, want_back)):
            raise RuntimeError(f"the native {device.type} pack/unpack kernel for {dtype} disagrees with the torch "
                               "ops; refusing it")


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, except that any NaN equals any NaN (payloads depend on the instruction that made them)."""
    if a.shape != b.shape:
        return False
    nan_a, nan_b = a.isnan(), b.isnan()
    bits = _BITS[a.element_size()]
    return torch.equal(nan_a, nan_b) and torch.equal(a.masked_fill(nan_a, 0).view(bits), b.masked_fill(nan_b, 0).view(bits))


def keep_mask(
    numel: int,
    *,
    seed: int,
    step: int,
    key: str,
    rate: float,
    start: int = 0,
    stream: MaskStream = MaskStream.GRAD,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bool mask of global coordinates ``[start, start + numel)``: True where the coordinate is kept."""
    if not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    out = torch.empty(numel, dtype=torch.bool, device=device)
    scratch = torch.ones(numel, dtype=torch.float32, device=device)
    drop_(scratch, seed=seed, step=step, key=key, rate=rate, start=start, stream=stream, mask_out=out)
    return out
