"""Mask engine speed and memory: plain multiply vs the seed implementations' bernoulli mask vs this engine.

Targets on a 2-core CPU: the compiled engine at most 2x the plain in-place multiply (the
memory-bandwidth floor), at least 10x faster than the bernoulli peer, and at most 1 byte of
extra memory per gradient element.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any, Callable

import torch

from .. import mask as _mask
from . import interleaved_timings, median_ratio

RATE = 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--numel", type=int, default=25_000_000, help="gradient elements (default 25M)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per candidate (median reported)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def _peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak memory ``fn`` allocates beyond what is live before it (None where unmeasurable)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    if device.type == "cpu" and sys.platform.startswith("linux"):
        # Writing 5 to clear_refs resets the resident-set high-water mark (VmHWM).
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_status_kib("VmRSS")
        fn()
        return max(0, _proc_status_kib("VmHWM") - before) * 1024
    return None


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _engine(grad: torch.Tensor, backend: str) -> Callable[[], Any]:
    def run() -> None:
        previous = _mask.mask_backend()
        _mask.set_mask_backend(backend)  # type: ignore[arg-type]
        try:
            _mask.drop_(grad, seed=0, step=0, key="bench.weight", rate=RATE)
        finally:
            _mask.set_mask_backend(previous)
    return run


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = _device(args.device)
    dtype = getattr(torch, args.dtype)
    grad = torch.randn(args.numel, device=device).to(dtype)
    candidates = {
        "plain multiply": lambda: grad.mul_(1.0),
        "peer (bernoulli)": lambda: grad.mul_(torch.bernoulli(torch.full_like(grad, 1 - RATE))).div_(1 - RATE),
        "engine compiled": _engine(grad, "compiled"),
        "engine eager": _engine(grad, "eager"),
    }
    sync = _sync(device)
    for fn in candidates.values():  # warm-up: compilation, allocator, page faults
        fn()
    memory = {name: _peak_extra_bytes(fn, device) for name, fn in candidates.items()}
    # The peer and the eager path are slow; fewer rounds keep the benchmark short.
    fast = {k: v for k, v in candidates.items() if k in ("plain multiply", "engine compiled")}
    times = interleaved_timings(fast, args.rounds, sync)
    times.update(interleaved_timings({k: v for k, v in candidates.items() if k not in fast},
                                     max(3, args.rounds // 2), sync))
    plain, peer = times["plain multiply"], times["peer (bernoulli)"]
    rows = []
    for name in candidates:
        med = statistics.median(times[name])
        rows.append({
            "candidate": name,
            "median_ms": med * 1e3,
            "x_plain": median_ratio(times[name], plain) if name in fast else med / statistics.median(plain),
            "speedup_vs_peer": statistics.median(peer) / med,
            "extra_bytes_per_elem": None if memory[name] is None else memory[name] / args.numel,
        })
    return {
        "name": "mask",
        "device": f"{device.type} ({torch.get_num_threads()} threads), {args.numel:,} x {args.dtype}, p={RATE}",
        "rows": rows,
        "notes": [
            "x_plain: median of per-round ratios for the interleaved fast pair, else ratio of medians",
            "targets: engine compiled <= 2x plain, >= 10x faster than peer, <= 1 extra byte per element",
        ],
    }
