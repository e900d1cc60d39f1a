"""Mask engine speed and memory, against the cost of touching the same gradients once.

Cases (each timed in interleaved rounds; ratios are medians of per-round ratios):

- ``25M``: one large gradient: plain in-place multiply (the memory-bandwidth floor) vs the seed
  implementations' bernoulli mask vs this engine (native kernel, torch.compile per piece, eager);
- ``ViT-B/16``: the 152 gradient shapes of ``torchvision.models.vit_b_16`` (86.6M elements) and
- ``500 x Linear(64,64)``: 1000 small gradients, both against one ``torch._foreach_mul_`` over
  the same tensors, with ``drop_tensors_`` (the call ``DropGrad.mask_gradients_`` makes), a loop of
  ``drop_`` and the torch.compile-per-piece path (the engine before the native kernels);
- ``wrapper``: ``DropGrad.step()`` around an optimizer whose own ``step()`` does nothing (so the wrapper's
  whole per-step cost: masking, bookkeeping, the stamp of the gradients it stepped on) vs one
  ``torch._foreach_mul_`` over the same gradients (and the wrapper without its cached piece table, the
  per-tensor path), at 10 tensors (5 x Linear(64,64)), ViT-B/16's 152 and
  1000 (500 x Linear(64,64));
- ``per call``: the fixed cost of one ``drop_`` on a 64-element tensor vs one ``mul_``;
- ``throughput`` (default on CUDA only): ``drop_tensors_`` (the native kernel: Triton on CUDA) against
  ``torch._foreach_mul_`` over the same tensors (1000 small ones, ViT-B/16's shapes) and against a large
  device-to-device copy (the measured memory bandwidth), in GB/s of bytes read and written. Times per
  call (host included) come from CUDA events around batches of calls, medians over ``--rounds``; on
  CUDA the device time per call (kernels and copies) comes from ``torch.profiler``.

Target on CUDA: the mask kernel >= 80% of ``_foreach_mul_``'s device throughput at 1000 tensors and
ViT-B/16's shapes. Targets for ``wrapper``: <= 1.5x ``_foreach_mul_`` at 1000 tensors, <= 1.1x at
152. Targets on a 2-core CPU: at most 2x the floor in every case and 1.5x for the single large tensor,
at least 10x faster than the bernoulli peer, at most 1 byte of extra memory per element.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from .. import drop_tensors_, mask_backend, set_mask_backend
from .. import mask as _mask
from . import best_device, device_sync, interleaved_timings, median_ratio, peak_extra_bytes

RATE = 0.1
SEED, STEP = 0, 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--numel", type=int, default=25_000_000, help="elements of the large gradient (25M)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per candidate (median reported)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--cases", default=None,
                        help="comma-separated cases: 25M, ViT-B/16, small, per-call, wrapper, throughput (default: "
                             "the first five, and throughput on CUDA)")
    parser.add_argument("--copy_mib", type=int, default=1024,
                        help="MiB of the device-to-device copy that measures the memory bandwidth (throughput)")
    parser.add_argument("--throughput_sets", default="small,ViT-B/16",
                        help="tensor sets of the throughput case: small (1000 tensors), ViT-B/16")


def _with_backend(backend: str, fn: Callable[[], Any], native: bool = True) -> Callable[[], None]:
    def run() -> None:
        previous = _mask.mask_backend()
        _mask.set_mask_backend(backend)  # type: ignore[arg-type]
        try:
            if native:
                fn()
            else:
                with _mask._native_kernels_off():  # the torch.compile-per-piece path
                    fn()
        finally:
            _mask.set_mask_backend(previous)
    return run


def _rows(case: str, candidates: dict[str, Callable[[], Any]], floor: str, rounds: int, device: torch.device,
          numel: int, slow: tuple[str, ...] = (), peer: str | None = None) -> list[dict[str, Any]]:
    """Time ``candidates`` (``slow`` ones in fewer rounds) and report each against ``floor``."""
    sync = device_sync(device)
    for fn in candidates.values():  # warm-up: compilation, kernel self-checks, allocator, page faults
        fn()
    sync()
    memory = {name: peak_extra_bytes(fn, device) for name, fn in candidates.items()}
    fast = {k: v for k, v in candidates.items() if k not in slow}
    times = interleaved_timings(fast, rounds, sync)
    if slow:
        times.update(interleaved_timings({k: v for k, v in candidates.items() if k in slow},
                                         max(3, rounds // 2), sync))
    rows = []
    for name in candidates:
        med = statistics.median(times[name])
        rows.append({
            "case": case,
            "candidate": name,
            "median_ms": med * 1e3,
            "x_floor": (median_ratio(times[name], times[floor]) if name in fast
                        else med / statistics.median(times[floor])),
            "speedup_vs_peer": statistics.median(times[peer]) / med if peer else None,
            "extra_bytes_per_elem": None if memory[name] is None else memory[name] / numel,
        })
    return rows


def _large_case(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    grad = torch.randn(args.numel, device=device).to(dtype)
    drop = lambda: _mask.drop_(grad, seed=SEED, step=STEP, key="bench.weight", rate=RATE)  # noqa: E731
    candidates = {
        "plain multiply": lambda: grad.mul_(1.0),
        "peer (bernoulli)": lambda: grad.mul_(torch.bernoulli(torch.full_like(grad, 1 - RATE))).div_(1 - RATE),
        "engine compiled": _with_backend("compiled", drop),
        "engine torch.compile": _with_backend("compiled", drop, native=False),
        "engine eager": _with_backend("eager", drop),
    }
    # The peer and the eager path are slow; fewer rounds keep the benchmark short.
    return _rows(f"{args.numel / 1e6:g}M", candidates, "plain multiply", args.rounds, device, args.numel,
                 slow=("peer (bernoulli)", "engine eager"), peer="peer (bernoulli)")


def _vit_shapes() -> list[tuple[str, tuple[int, ...]]]:
    import torchvision

    with torch.device("meta"):  # shapes only: no memory, no weights downloaded
        model = torchvision.models.vit_b_16(weights=None)
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def _small_shapes() -> list[tuple[str, tuple[int, ...]]]:
    shapes = []
    for i in range(500):
        shapes += [(f"layers.{i}.weight", (64, 64)), (f"layers.{i}.bias", (64,))]
    return shapes


def _list_case(case: str, shapes: list[tuple[str, tuple[int, ...]]], args: argparse.Namespace,
               device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    grads = [torch.randn(shape, device=device).to(dtype) for _, shape in shapes]
    keys = [name for name, _ in shapes]
    rates = [RATE] * len(grads)

    def many() -> None:
        _mask.drop_tensors_(grads, keys=keys, rates=rates, seed=SEED, step=STEP)

    def loop() -> None:
        for grad, key in zip(grads, keys):
            _mask.drop_(grad, seed=SEED, step=STEP, key=key, rate=RATE)

    candidates = {
        "foreach_mul_": lambda: torch._foreach_mul_(grads, 1.0),
        "engine drop_tensors_": _with_backend("auto", many),
        "engine drop_ loop": _with_backend("auto", loop),
        "torch.compile per piece": _with_backend("compiled", loop, native=False),
    }
    numel = sum(g.numel() for g in grads)
    return _rows(f"{case} ({len(grads)} tensors, {numel / 1e6:.3g}M)", candidates, "foreach_mul_",
                 args.rounds, device, numel, slow=("torch.compile per piece",))


class _NoStep(torch.optim.Optimizer):
    """An optimizer whose ``step()`` does nothing: what remains of ``DropGrad.step()`` is the wrapper's cost."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        super().__init__(params, {})

    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        return None


def _wrapper_case(case: str, shapes: list[tuple[str, tuple[int, ...]]], args: argparse.Namespace,
                  device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """``DropGrad.step()`` minus the wrapped optimizer's own step, against ``_foreach_mul_`` on the same gradients."""
    from ..dropgrad.optimizer import DropGrad

    params = [torch.nn.Parameter(torch.zeros(shape, device=device, dtype=dtype)) for _, shape in shapes]
    for param in params:
        param.grad = torch.randn(param.shape, device=device).to(dtype)
    grads = [param.grad for param in params]
    dropgrad = DropGrad(_NoStep(params), drop_rate=RATE, seed=SEED)
    per_tensor = DropGrad(_NoStep(params), drop_rate=RATE, seed=SEED)
    per_tensor._table.drop_ = lambda *args, **kwargs: None  # no cached table: the per-tensor path

    def wrapper_step(wrapper: DropGrad) -> Callable[[], None]:
        def run() -> None:
            # A training loop's backward gives new gradients between steps; here the same ones are
            # stepped on again, so forget the stamp that refuses a second step on unchanged gradients.
            wrapper._masked.stepped_on = None
            wrapper.step()
        return run

    candidates = {
        "foreach_mul_": lambda: torch._foreach_mul_(grads, 1.0),
        "DropGrad.step - inner step": _with_backend("auto", wrapper_step(dropgrad)),
        "same, per-tensor path (no table cache)": _with_backend("auto", wrapper_step(per_tensor)),
    }
    numel = sum(g.numel() for g in grads)
    return _rows(f"wrapper, {case} ({len(grads)} tensors, {numel / 1e6:.3g}M)", candidates, "foreach_mul_",
                 args.rounds, device, numel)


def _per_call_case(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    small = torch.randn(64, device=device).to(dtype)
    calls = 200

    def repeat(fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(calls):
                fn()
        return run

    drop = lambda: _mask.drop_(small, seed=SEED, step=STEP, key="bench.bias", rate=RATE)  # noqa: E731
    candidates = {
        "mul_": repeat(lambda: small.mul_(1.0)),
        "engine drop_": _with_backend("auto", repeat(drop)),
        "torch.compile per piece": _with_backend("compiled", repeat(drop), native=False),
    }
    rows = _rows(f"per call (64 elements, ms per {calls} calls)", candidates, "mul_", args.rounds, device, 64,
                 slow=("torch.compile per piece",))
    for row in rows:
        row["extra_bytes_per_elem"] = None  # 64 elements: below what the resident-set counter resolves
    return rows


def _first_use_ms(device: torch.device, dtype: torch.dtype) -> float:
    """Milliseconds of the first native call of this process (kernel build or cache load, self-check)."""
    start = time.perf_counter()
    _mask.drop_(torch.ones(8, device=device, dtype=dtype), seed=0, step=0, key="first", rate=0.5)
    device_sync(device)()
    return (time.perf_counter() - start) * 1e3


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = best_device(args.device)
    dtype = getattr(torch, args.dtype)
    default = "25M,ViT-B/16,small,per-call,wrapper" + (",throughput" if device.type == "cuda" else "")
    cases = {c.strip() for c in (args.cases or default).split(",")}
    first_use = _first_use_ms(device, dtype)
    rows = []
    if "per-call" in cases:
        rows += _per_call_case(args, device, dtype)
    if "small" in cases:
        rows += _list_case("500 x Linear(64,64)", _small_shapes(), args, device, dtype)
    if "ViT-B/16" in cases:
        rows += _list_case("ViT-B/16", _vit_shapes(), args, device, dtype)
    if "wrapper" in cases:
        rows += _wrapper_case("5 x Linear(64,64)", _small_shapes()[:10], args, device, dtype)
        rows += _wrapper_case("ViT-B/16", _vit_shapes(), args, device, dtype)
        rows += _wrapper_case("500 x Linear(64,64)", _small_shapes(), args, device, dtype)
    if "25M" in cases:
        rows += _large_case(args, device, dtype)
    if "throughput" in cases:
        rows += _throughput_rows(args, device, dtype)
    return {
        "name": "mask",
        "device": f"{device.type} ({torch.get_num_threads()} threads), {args.dtype}, p={RATE}",
        "rows": rows,
        "notes": [
            "x_floor: against plain mul_ / foreach_mul_ over the same tensors; median of per-round ratios "
            "(ratio of medians for the slow candidates, timed in fewer rounds)",
            f"first native call of the process (kernel build or cache load, self-check): {first_use:.0f} ms",
            "throughput: GB/s of bytes read and written (2 x the tensors' bytes per call); call_* per call "
            "with the host's work, device_* the device time per call (torch.profiler; CUDA only); "
            "vs_foreach: throughput over _foreach_mul_'s (device time on CUDA); pct_copy_bw: of the copy's GB/s",
            "targets: CUDA mask kernel >= 0.8 x _foreach_mul_ (vs_foreach); CPU: <= 2x the floor in every "
            "case, <= 1.5x for the single large tensor, >= 10x faster than "
            "the peer, <= 1 extra byte per element",
        ],
    }


# ---- throughput: GB/s against _foreach_mul_ and the memory bandwidth -------------------------------

def _timer(device: torch.device) -> Callable[[Callable[[], Any], int], float]:
    """Seconds per call of ``fn`` over ``calls`` back-to-back calls (CUDA events, else the wall clock)."""
    if device.type == "cuda":
        def cuda_time(fn: Callable[[], Any], calls: int) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / calls
        return cuda_time
    sync = device_sync(device)

    def wall_time(fn: Callable[[], Any], calls: int) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        return (time.perf_counter() - start) / calls
    return wall_time


def _device_seconds(fn: Callable[[], Any], calls: int) -> float | None:
    """Device time per call on CUDA (every kernel and copy the call enqueues), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    try:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        total_us = sum(event.self_device_time_total for event in prof.key_averages()
                       if event.device_type == torch.autograd.DeviceType.CUDA)
    except Exception:  # no CUPTI: the call times still stand
        return None
    return total_us / 1e6 / calls if total_us > 0 else None


def _throughput(candidates: dict[str, tuple[Callable[[], Any], int]], rounds: int,
                device: torch.device) -> dict[str, tuple[float, float | None, int]]:
    """``name -> (seconds per call, device seconds per call or None, bytes moved per call)``."""
    timer = _timer(device)
    calls = {}
    for name, (fn, _) in candidates.items():  # warm-up (kernel builds, allocator), then ~20 ms batches
        fn()
        calls[name] = max(1, min(200, int(0.02 / max(timer(fn, 1), 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):  # round-robin: machine noise hits every candidate alike
        for name, (fn, _) in candidates.items():
            times[name].append(timer(fn, calls[name]))
    return {name: (statistics.median(times[name]),
                   _device_seconds(fn, calls[name]) if device.type == "cuda" else None, moved)
            for name, (fn, moved) in candidates.items()}


def _throughput_rows(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    copy = _copy_throughput(args, device, dtype)
    copy_rate = copy[2] / (copy[1] or copy[0])
    rows = [_throughput_row(f"copy {args.copy_mib} MiB", "copy_ (memory bandwidth)", copy, None, copy_rate)]
    previous = mask_backend()
    set_mask_backend("compiled")  # the native kernel; a failure raises instead of timing a fallback
    try:
        sets = {c.strip() for c in args.throughput_sets.split(",")}
        for name_of_set, case, shapes_of in (("small", "500 x Linear(64,64)", _small_shapes),
                                             ("ViT-B/16", "ViT-B/16", _vit_shapes)):
            if name_of_set not in sets:
                continue
            label, results = _mask_throughput(case, shapes_of(), args, device, dtype)
            for name, result in results.items():
                rows.append(_throughput_row(label, name, result, results["foreach_mul_"], copy_rate))
    finally:
        set_mask_backend(previous)
    return rows


def _copy_throughput(args: argparse.Namespace, device: torch.device,
                     dtype: torch.dtype) -> tuple[float, float | None, int]:
    """A large device-to-device copy: what the memory moves at most (bytes read and written)."""
    numel = args.copy_mib * 2 ** 20 // torch.empty((), dtype=dtype).element_size()
    source, target = torch.randn(numel, device=device).to(dtype), torch.empty(numel, device=device, dtype=dtype)
    return _throughput({"copy_": (lambda: target.copy_(source), 2 * source.nbytes)}, args.rounds, device)["copy_"]


def _mask_throughput(case: str, shapes: list[tuple[str, tuple[int, ...]]], args: argparse.Namespace,
                     device: torch.device, dtype: torch.dtype) -> tuple[str, dict]:
    """``drop_tensors_`` and ``_foreach_mul_`` over the same gradients of ``shapes``."""
    grads = [torch.randn(shape, device=device).to(dtype) for _, shape in shapes]
    keys = [name for name, _ in shapes]
    moved = 2 * sum(g.nbytes for g in grads)
    results = _throughput({
        "foreach_mul_": (lambda: torch._foreach_mul_(grads, 1.0), moved),
        "drop_tensors_": (lambda: drop_tensors_(grads, keys=keys, rates=RATE, seed=SEED, step=STEP), moved),
    }, args.rounds, device)
    return f"{case} ({len(grads)} tensors, {sum(g.numel() for g in grads) / 1e6:.3g}M)", results


def _throughput_row(case: str, candidate: str, result: tuple[float, float | None, int],
                    foreach: tuple[float, float | None, int] | None, copy_rate: float) -> dict[str, Any]:
    seconds, device_seconds, moved = result
    rate = moved / (device_seconds or seconds)
    vs = None
    if foreach is not None:
        vs = (foreach[1] / device_seconds) if device_seconds and foreach[1] else foreach[0] / seconds
    return {"case": case, "candidate": candidate, "call_ms": seconds * 1e3, "call_GB_per_s": moved / seconds / 1e9,
            "device_ms": None if device_seconds is None else device_seconds * 1e3,
            "device_GB_per_s": None if device_seconds is None else moved / device_seconds / 1e9,
            "vs_foreach": vs, "pct_copy_bw": 100 * rate / copy_rate}
