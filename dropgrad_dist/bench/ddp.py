"""DDP training step on 2 CPU ranks (gloo): torch's allreduce_hook vs dropgrad_hook dense and compact.

Targets: dense at p=0.1 at most 5% slower than ``allreduce_hook``; compact at p=0.5 faster
than ``allreduce_hook``. Each candidate trains its own copy of a ~5M-parameter MLP; the
candidates take turns, one block of steps per round, so machine noise hits all of them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from ..ddp_hook import DropGradHookState
from ..testing import run_on_ranks
from . import median_ratio

# name -> (communication, drop rate); None: torch's allreduce_hook
CANDIDATES: dict[str, tuple[str, float] | None] = {
    "allreduce_hook": None,
    "dropgrad dense p=0.1": ("dense", 0.1),
    "dropgrad compact p=0.5": ("compact", 0.5),
    "dropgrad compact p=0.9": ("compact", 0.9),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--width", type=int, default=1024, help="MLP width (1024: ~5.2M parameters)")
    parser.add_argument("--batch", type=int, default=32, help="per-rank batch size")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per candidate per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")


def _model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width), nn.GELU(),
                         nn.Linear(width, width // 2), nn.GELU(), nn.Linear(width // 2, width))


def _rank(rank: int, world_size: int, args: dict[str, Any]) -> dict[str, Any]:
    width, batch = args["width"], args["batch"]
    runs = {}
    for name, spec in CANDIDATES.items():
        ddp = DDP(_model(width))
        if spec is None:
            ddp.register_comm_hook(None, allreduce_hook)
            state = None
        else:
            state = DropGradHookState(ddp, spec[1], communication=spec[0], seed=1)
            state.register()
        runs[name] = (ddp, torch.optim.SGD(ddp.parameters(), lr=1e-4), state)
    numel = sum(p.numel() for p in runs["allreduce_hook"][0].parameters())
    x = torch.randn(batch, width, generator=torch.Generator().manual_seed(rank))
    target = torch.randn(batch, width, generator=torch.Generator().manual_seed(100 + rank))

    def train(name: str, steps: int) -> float:
        ddp, opt, _ = runs[name]
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            nn.functional.mse_loss(ddp(x), target).backward()
            opt.step()
            opt.zero_grad()
        return (time.perf_counter() - start) / steps

    for name in runs:  # warm-up: bucket rebuild, mask kernel compilation, allocator
        train(name, 3)
    before = {name: (s.bytes_communicated if s else 0) for name, (_, _, s) in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args["rounds"]):
        for name in runs:
            times[name].append(train(name, args["steps"]))
    timed_steps = args["rounds"] * args["steps"]
    sent = {name: ((s.bytes_communicated - before[name]) / timed_steps) if s else numel * 4.0
            for name, (_, _, s) in runs.items()}
    return {"times": times, "bytes_per_step": sent, "numel": numel}


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = {k: getattr(args, k) for k in ("width", "batch", "steps", "rounds")}
    results = run_on_ranks(_rank, 2, config, threads_per_rank=args.threads, timeout=1800)
    # A step ends with both ranks done: take the slower rank per round.
    times = {name: [max(a, b) for a, b in zip(results[0]["times"][name], results[1]["times"][name])]
             for name in CANDIDATES}
    base = times["allreduce_hook"]
    dense_bytes = results[0]["bytes_per_step"]["allreduce_hook"]
    rows = []
    for name in CANDIDATES:
        sent = results[0]["bytes_per_step"][name]
        rows.append({
            "candidate": name,
            "median_ms": statistics.median(times[name]) * 1e3,
            "x_allreduce": median_ratio(times[name], base),
            "MB_per_step": sent / 1e6,
            "bytes_ratio": sent / dense_bytes,
        })
    return {
        "name": "ddp",
        "device": (f"cpu, 2 ranks x {args.threads} thread(s), gloo, {results[0]['numel']:,} parameters, "
                   f"batch {args.batch}/rank"),
        "rows": rows,
        "notes": [
            "median_ms: median over rounds of the mean step time (forward, backward with the hook, SGD step)",
            "x_allreduce: median of per-round ratios to allreduce_hook; targets: dense p=0.1 <= 1.05, "
            "compact p=0.5 < 1.0",
            "bytes_ratio: bytes all-reduced per step / dense bucket bytes (compact adds one element per bucket)",
        ],
    }
