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
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import threading
import types
import warnings
from enum import IntEnum
from typing import Callable, Literal

import torch

from .checks import check_count, check_int_in, check_rate, check_seed

__all__ = [
    "MaskStream",
    "drop_",
    "drop_pairs_",
    "keep_mask",
    "keep_probability",
    "keep_threshold",
    "key_hash",
    "mask_backend",
    "set_mask_backend",
    "uniform_u32",
]

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
_BLOCK = 1 << 31  # coordinates per salt block: keeps every int32 index non-negative
_LANE = 1024  # row length of the 2-D view; a precomputed lane vector avoids a slow vector arange
_EAGER_ROWS = 256  # rows per eager chunk: bounds the temporaries to a few MiB


class MaskStream(IntEnum):
    """Independent random streams drawn from the same (seed, step, key)."""

    GRAD = 1  # which gradient coordinates are dropped
    UPDATE = 2  # which update coordinates are dropped (full_update_drop)
    SKIP = 3  # whether the whole step is skipped (step_skip_rate)
    CLIP = 4  # whether a random clipping method clips at this step


def _signed32(value: int) -> int:
    value &= _MASK32
    return value - (1 << 32) if value >= (1 << 31) else value


_C1 = _signed32(0x7FEB352D)
_C2 = _signed32(0x846CA68B)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def key_hash(key: str) -> int:
    """Stable 64-bit hash of a parameter key (BLAKE2b; never Python's salted ``hash()``)."""
    if not isinstance(key, str):
        raise TypeError(f"key must be a str (a canonical parameter name), got {type(key).__name__}")
    return _key_hash(key)


@functools.lru_cache(maxsize=65536)  # keys repeat every step; hashing them once is enough
def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def _salt(seed: int, step: int, key: int, stream: MaskStream, block: int) -> int:
    h = 0
    for word in (seed, step, key, int(stream), block):
        h = _splitmix64(h ^ (word & _MASK64))
    return h


def uniform_u32(seed: int, step: int, stream: MaskStream, key: int = 0) -> int:
    """A uniform 32-bit integer decided by ``(seed, step, stream, key)`` alone (for per-step draws)."""
    return _salt(seed, step, key, stream, block=-1) & _MASK32


def keep_threshold(rate: float) -> int:
    """``T = round((1 - p) * 2**32)``: a coordinate is kept with probability exactly ``T / 2**32``."""
    return int(round((1.0 - float(rate)) * 4294967296.0))


def _check_args(seed: int, step: int, rate: float, start: int, extra_scale: float = 1.0) -> float:
    check_seed(seed)
    check_count(step, "step")
    check_int_in(start, "start", 0)
    if isinstance(extra_scale, bool) or not isinstance(extra_scale, (int, float)) or not math.isfinite(extra_scale):
        raise ValueError(f"extra_scale must be a finite number, got {extra_scale!r}")
    return check_rate(rate, "rate")


def _check_tensor(tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise ValueError(f"tensor must be dense (strided), got layout {tensor.layout}; DropGrad does not "
                         "support sparse gradients (use a dense embedding, sparse=False)")
    if not (tensor.is_floating_point() or tensor.is_complex()):
        raise ValueError(f"tensor must be floating point or complex, got {tensor.dtype}")
    if not tensor.is_contiguous():
        raise ValueError("tensor must be contiguous (mask a contiguous view of the gradient)")


# --------------------------------------------------------------------------------------
# The integer kernel, shared verbatim by the compiled and the eager path.


def _srl(x: torch.Tensor, shift: int) -> torch.Tensor:
    # int32 ">>" is arithmetic; masking off the sign copies makes it a logical shift.
    return (x >> shift) & ((1 << (32 - shift)) - 1)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ _srl(x, 16)
    x = x * _C1
    x = x ^ _srl(x, 15)
    x = x * _C2
    return x ^ _srl(x, 16)


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
# Backend selection: compiled (fused, one pass) where torch.compile works, eager otherwise.

Backend = Literal["auto", "compiled", "eager"]
_BACKENDS = ("auto", "compiled", "eager")


def _backend_from_environment() -> Backend:
    value = os.environ.get("DROPGRAD_MASK_BACKEND", "auto")
    if value not in _BACKENDS:
        raise ValueError(f"$DROPGRAD_MASK_BACKEND must be one of {', '.join(map(repr, _BACKENDS))}, got {value!r}")
    return value  # type: ignore[return-value]


_backend: Backend = _backend_from_environment()
_compiled: dict[tuple, Callable] = {}
_compile_failed: set[str] = set()
_lanes: dict[torch.device, torch.Tensor] = {}
_lock = threading.Lock()


def set_mask_backend(backend: Backend) -> None:
    """Choose how masks are computed: ``"compiled"`` (torch.compile), ``"eager"``, or ``"auto"``.

    ``"auto"`` (the default, or ``$DROPGRAD_MASK_BACKEND``) compiles and falls back to eager,
    with one warning, on a device type where compilation fails. Both give bitwise-identical masks.
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
            warnings.warn(
                f"dropgrad_dist: torch.compile of the mask kernel failed on {device_type} "
                f"({type(err).__name__}: {err}); using the eager path "
                f"{'for this shape' if over_budget else 'from now on'} (same masks, slower).",
                RuntimeWarning,
                stacklevel=3,
            )
    eager(*args)


def _mask_piece(flat: torch.Tensor, base: int, threshold: int, scale: torch.Tensor,
                mask_out: torch.Tensor | None) -> None:
    n = flat.numel()
    lane = _lane(flat.device)
    full = n - n % _LANE
    if full:
        ctx = _ctx(base, threshold, flat.device)
        rows_mask = None if mask_out is None else mask_out[:full].view(-1, _LANE)
        _run("rows", _eager_rows, flat[:full].view(-1, _LANE), lane, ctx, scale, 0, rows_mask)
    if full < n:
        tail_mask = None if mask_out is None else mask_out[full:]
        _run("flat", _drop_flat, flat[full:], lane[: n - full], _ctx(base + full, threshold, flat.device),
             scale, tail_mask)


def _ctx(base: int, threshold: int, device: torch.device) -> torch.Tensor:
    ctx = torch.tensor([_signed32(base), threshold - (1 << 31)], dtype=torch.int32)
    return ctx if device.type == "cpu" else ctx.to(device, non_blocking=True)


def _pieces(start: int, numel: int):
    """Split global coordinates ``[start, start + numel)`` at salt-block boundaries."""
    offset = 0
    while offset < numel:
        block, within = divmod(start + offset, _BLOCK)
        length = min(numel - offset, _BLOCK - within)
        yield offset, length, block, within
        offset += length


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
    if mask_out is not None and (mask_out.dtype != torch.bool or mask_out.numel() != tensor.numel()):
        raise ValueError("mask_out must be a bool tensor with as many elements as tensor")
    if tensor.is_complex():
        _drop_complex_(tensor, seed=seed, step=step, key=key, rate=rate, start=start, stream=stream,
                       extra_scale=extra_scale, mask_out=mask_out)
        return tensor
    flat = tensor.view(-1)
    flat_mask = None if mask_out is None else mask_out.view(-1).view(torch.uint8)
    threshold = keep_threshold(rate)
    with torch.no_grad():
        if threshold >= (1 << 32) or threshold == 0:
            factor = extra_scale / (1.0 - rate) if threshold else 0.0
            if factor != 1.0:
                flat.mul_(factor)
            if flat_mask is not None:
                flat_mask.fill_(threshold != 0)
            return tensor
        scale = torch.tensor(extra_scale / (1.0 - rate), dtype=torch.float32).to(flat.device)
        key_word = key_hash(key)
        for offset, length, block, within in _pieces(start, flat.numel()):
            base = _salt(seed, step, key_word, stream, block) + within
            piece_mask = None if flat_mask is None else flat_mask[offset:offset + length]
            _mask_piece(flat[offset:offset + length], base, threshold, scale, piece_mask)
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


def keep_probability(rate: float) -> float:
    """The exact probability that a coordinate is kept at drop rate ``rate``."""
    return keep_threshold(rate) / 4294967296.0

