"""Benchmarks, run as ``python -m dropgrad_dist bench NAME [--json]``.

Each benchmark module exposes ``add_arguments(parser)`` and ``run(args) -> dict`` returning
``{"name", "device", "rows": [{...}], "notes": [...]}``; :func:`print_report` renders it.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any, Callable, Sequence

__all__ = ["BENCHMARKS", "interleaved_timings", "print_report"]

# name -> module path; the CLI imports them to build its sub-commands
BENCHMARKS = {
    "mask": "dropgrad_dist.bench.mask",
    "ddp": "dropgrad_dist.bench.ddp",
    "fsdp": "dropgrad_dist.bench.fsdp",
    "clip": "dropgrad_dist.bench.clip",
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


def print_report(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    rows = result["rows"]
    columns = list(rows[0].keys())
    cells = [[_fmt(row.get(col)) for col in columns] for row in rows]
    widths = [max(len(col), *(len(c[i]) for c in cells)) for i, col in enumerate(columns)]
    print(f"# {result['name']} benchmark on {result['device']}")
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
