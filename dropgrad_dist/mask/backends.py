"""How a batch of pieces gets masked: the backend choice, the native kernels, the torch-op path.

1. native kernels: the C kernel on CPU (:mod:`.native`), the Triton kernel on CUDA (:mod:`.cuda`),
   each covering any number of tensors through a piece table; each is checked bitwise against the
   eager definition on its first use per dtype, so a miscompiled kernel is refused, never trusted;
2. elsewhere (other devices, tensor subclasses, inside ``torch.compile``): the torch-op
   definition, compiled by ``torch.compile`` one contiguous piece at a time;
3. ``"eager"``: the same torch ops run eagerly, in row chunks.

All are bitwise identical; :func:`set_mask_backend` chooses.
"""

from __future__ import annotations

import contextlib
import os
import threading
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch

from ..core.checks import check_choice
from .definition import MaskStream, _hash32, _key_hash, _salt, _scale_dtype, keep_threshold, signed32
from .kernels import cuda, native
from .pieces import Piece, block_parts, piece_table

__all__ = ["Backend", "mask_backend", "set_mask_backend"]

LANE_WIDTH = 1024  # row length of the 2-D view; a precomputed lane vector avoids a slow vector arange
_EAGER_ROWS = 256  # rows per eager chunk: bounds the temporaries to a few MiB

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
MISSING = object()
_native_failed: set[str] = set()  # device types whose native kernels failed to build or to check
_native_off = False
_NATIVE_BUILDERS = {"cpu": native.cpu_kernel, "cuda": cuda.cuda_kernel}
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # subclasses (DTensor, fake tensors) take the torch-op path
_lanes: dict[torch.device, torch.Tensor] = {}
lock = threading.RLock()


def set_mask_backend(backend: Backend) -> None:
    """Choose how masks are computed: ``"compiled"``, ``"eager"``, or ``"auto"``.

    ``"compiled"``: the native multi-tensor kernel of the device (CPU, CUDA), else torch.compile;
    failures raise. ``"auto"`` (the default, or ``$DROPGRAD_MASK_BACKEND``) does the same and falls
    back, with one warning, to the next path where one fails. All give bitwise-identical masks.
    """
    global _backend
    _backend = check_choice(backend, "backend", _BACKENDS)


def mask_backend() -> Backend:
    """The current mask backend (see :func:`set_mask_backend`)."""
    return _backend


def warn_fallback(what: str, device_type: str, err: Exception, scope: str) -> None:
    warnings.warn(f"dropgrad_dist: {what} failed on {device_type} ({type(err).__name__}: {err}); using "
                  f"the next mask path {scope} (same masks, slower).", RuntimeWarning, stacklevel=4)


# --------------------------------------------------------------------------------------
# The torch-op path: the definition's hash as torch ops, compiled per piece or run eagerly.


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
    # rows: [R, LANE_WIDTH] view of consecutive coordinates; ctx = [salt + first index, threshold].
    row_ids = torch.arange(rows.shape[0], device=rows.device, dtype=torch.int32)[:, None] + row0
    _apply(rows, row_ids * LANE_WIDTH + ctx[0] + lane[None, :], ctx, scale, mask_out)


def _drop_flat(flat: torch.Tensor, lane: torch.Tensor, ctx: torch.Tensor, scale: torch.Tensor,
               mask_out: torch.Tensor | None) -> None:
    # flat: fewer than LANE_WIDTH consecutive coordinates; lane is lane[:flat.numel()].
    _apply(flat, lane + ctx[0], ctx, scale, mask_out)


def _eager_rows(rows, lane, ctx, scale, row0, mask_out) -> None:
    for r in range(0, rows.shape[0], _EAGER_ROWS):
        chunk_mask = None if mask_out is None else mask_out[r:r + _EAGER_ROWS]
        _drop_rows(rows[r:r + _EAGER_ROWS], lane, ctx, scale, row0 + r, chunk_mask)


def _lane(device: torch.device) -> torch.Tensor:
    lane = _lanes.get(device)
    if lane is None:
        lane = torch.arange(LANE_WIDTH, dtype=torch.int32, device=device)
        _lanes[device] = lane
    return lane


def _compiled_fn(name: str, variant: tuple) -> Callable:
    key = (name, *variant)
    with lock:
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
            warn_fallback("torch.compile of the mask kernel", device_type, err,
                          "for this shape" if over_budget else "from now on")
    eager(*args)


def _run_eager(name: str, eager: Callable, *args) -> None:
    eager(*args)  # the definition itself, whatever the backend: what native kernels are checked against


def drop_piece_torch(piece: Piece, mask: torch.Tensor | None, seed: int, step: int, stream: MaskStream,
                     extra_scale: float, eager: bool = False) -> None:
    """One piece through the torch-op definition (torch.compile per salt block piece, or eager)."""
    flat = piece.tensor.view(-1)[piece.offset:piece.offset + piece.count]
    flat_mask = None if mask is None else mask[piece.offset:piece.offset + piece.count]
    rate = piece.rate
    threshold = keep_threshold(rate)
    if threshold >= (1 << 32) or threshold == 0:
        factor = extra_scale / (1.0 - rate) if threshold else 0.0
        if factor != 1.0:
            flat.mul_(factor)
        if flat_mask is not None:
            flat_mask.fill_(threshold != 0)
        return
    scale = torch.tensor(extra_scale / (1.0 - rate), dtype=_scale_dtype(flat.dtype)).to(flat.device)
    for part in block_parts(piece.start, piece.count):
        base = _salt(seed, step, piece.word, stream, part.block) + part.within
        at, length = part.offset, part.length
        part_mask = None if flat_mask is None else flat_mask[at:at + length]
        _mask_run(flat[at:at + length], base, threshold, scale, part_mask, eager)


def _mask_run(flat: torch.Tensor, base: int, threshold: int, scale: torch.Tensor,
              mask_out: torch.Tensor | None, eager: bool = False) -> None:
    """Consecutive coordinates of one salt block: whole lanes as a 2-D view, then the tail."""
    n = flat.numel()
    lane = _lane(flat.device)
    full = n - n % LANE_WIDTH
    run = _run_eager if eager else _run
    if full:
        ctx = _ctx(base, threshold, flat.device)
        rows_mask = None if mask_out is None else mask_out[:full].view(-1, LANE_WIDTH)
        run("rows", _eager_rows, flat[:full].view(-1, LANE_WIDTH), lane, ctx, scale, 0, rows_mask)
    if full < n:
        tail_mask = None if mask_out is None else mask_out[full:]
        run("flat", _drop_flat, flat[full:], lane[: n - full], _ctx(base + full, threshold, flat.device),
            scale, tail_mask)


def _ctx(base: int, threshold: int, device: torch.device) -> torch.Tensor:
    ctx = torch.tensor([signed32(base), threshold - (1 << 31)], dtype=torch.int32)
    return ctx if device.type == "cpu" else ctx.to(device, non_blocking=True)


# --------------------------------------------------------------------------------------
# Native kernels: built once per (device type, dtype), checked against the eager definition.


@contextlib.contextmanager
def _native_kernels_off() -> Iterator[None]:
    """Within: the torch-op paths only (benchmarks compare them with the native kernels)."""
    global _native_off
    previous, _native_off = _native_off, True
    try:
        yield
    finally:
        _native_off = previous


def addressable(tensor: torch.Tensor) -> bool:
    """Whether the native kernels may write ``tensor`` through its data pointer."""
    # Subclasses (DTensor, fake tensors) and tensors being traced by torch.compile take the torch ops.
    return type(tensor) in _PLAIN and not torch.compiler.is_compiling()


def _native_kernel(tensor: torch.Tensor):
    """The native kernel for ``tensor``'s device and dtype, checked against the eager path on first use; or None."""
    if _backend == "eager" or _native_off:
        return None
    key = ("cpu" if tensor.is_cpu else tensor.device.type, tensor.dtype)  # is_cpu: 20x cheaper than .device
    kernel = _native.get(key, MISSING)
    if kernel is MISSING and key[0] in _NATIVE_BUILDERS and not (_backend == "auto" and key[0] in _native_failed):
        kernel = _build_native(key, tensor.device)
    return None if kernel is MISSING else kernel


def _build_native(key: tuple, device: torch.device):
    device_type, dtype = key
    with lock:
        if key not in _native:
            try:
                kernel = _NATIVE_BUILDERS[device_type](dtype)
                if kernel is not None:
                    _self_check(kernel, device, dtype)
            except Exception as err:
                if _backend == "compiled":
                    raise
                _native_failed.add(device_type)
                warn_fallback("the native mask kernel", device_type, err, "from now on")
                return MISSING
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
        batch: list[Piece] = []
        for n, key, start, rate in cases:
            offset = sum(piece.count for piece in batch)
            batch.append(Piece(out, offset, n, _key_hash(key), start, rate,
                               out.data_ptr() + offset * out.element_size()))
        if use_kernel:
            kernel.many(piece_table(batch, keep.view(torch.uint8), 1, 2, MaskStream.GRAD, 0.5), device)
        else:
            for piece in batch:
                drop_piece_torch(piece, keep.view(torch.uint8), 1, 2, MaskStream.GRAD, 0.5, eager=True)
        results.append((out.view(BITS[out.element_size()]), keep))
    if not (torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])):
        raise RuntimeError(f"the native {device.type} mask kernel for {dtype} disagrees with the eager "
                           "definition; refusing it")


BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # element size -> the integer view of its bits


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, except that any NaN equals any NaN (payloads depend on the instruction that made them)."""
    if a.shape != b.shape:
        return False
    nan_a, nan_b = a.isnan(), b.isnan()
    bits = BITS[a.element_size()]
    return torch.equal(nan_a, nan_b) and torch.equal(a.masked_fill(nan_a, 0).view(bits),
                                                     b.masked_fill(nan_b, 0).view(bits))


def bump_versions(tensors: Sequence[torch.Tensor]) -> None:
    """Tell autograd the kernels wrote these tensors through pointers, as an in-place torch op would."""
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:  # torch releases whose increment_version takes one tensor
        for tensor in tensors:
            torch.autograd.graph.increment_version(tensor)

