"""Benchmarks, run as ``python -m dropgrad_dist bench NAME [--json]``.

Each benchmark module exposes ``add_arguments(parser)`` and ``run(args) -> dict`` returning
``{"name", "device", "rows": [{...}], "notes": [...]}``; :func:`print_report` renders it. An optional
``check_arguments(args)`` raises ``ValueError`` for flags that contradict each other (the command line
reports it as a usage error before anything runs).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["BENCHMARKS", "best_device", "device_sync", "interleaved_timings", "peak_allocated_bytes",
           "peak_extra_bytes", "print_report"]

# name -> module path; the CLI imports them to build its sub-commands
BENCHMARKS = {
    "mask": "dropgrad_dist.bench.mask",
    "ddp": "dropgrad_dist.bench.ddp",
    "fsdp": "dropgrad_dist.bench.fsdp",
    "clip": "dropgrad_dist.bench.clip",
    "gnp": "dropgrad_dist.bench.gnp",
    "checkpoint": "dropgrad_dist.bench.checkpoint",
}


def interleaved_timings(
    candidates: dict[str, Callable[[], Any]], rounds: int, sync: Callable[[], None] = lambda: None
) -> dict[str, list[float]]:
    """Time each candidate once per round, round-robin, so machine noise hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def median_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of the per-round ratio (both measured in the same round)."""
    return statistics.median(n / d for n, d in zip(numerator, denominator))


def best_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def device_sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
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


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops inside the mode create, alive now and at most (``peak``)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                nbytes = tensor.untyped_storage().nbytes()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(tensor, self._freed, nbytes)
        return out


def peak_allocated_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes of tensors that ``fn`` allocates and holds at once, counted op by op on any device.

    Unlike the resident set it ignores the allocator's caching, so two candidates compare fairly.
    """
    with _LiveBytes() as tracker:
        fn()
    return tracker.peak


def print_report(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    print(f"# {result['name']} benchmark on {result['device']}")
    tables: list[list[dict[str, Any]]] = []
    for row in result["rows"]:  # consecutive rows with the same columns form one table
        if tables and list(tables[-1][0]) == list(row):
            tables[-1].append(row)
        else:
            tables.append([row])
    for number, rows in enumerate(tables):
        columns = list(rows[0].keys())
        cells = [[_fmt(row.get(col)) for col in columns] for row in rows]
        widths = [max(len(col), *(len(c[i]) for c in cells)) for i, col in enumerate(columns)]
        if number:
            print()
        print("  ".join(col.ljust(w) for col, w in zip(columns, widths)))
        print("  ".join("-" * w for w in widths))
        for row in cells:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    for note in result.get("notes", []):
        print(f"- {note}")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
