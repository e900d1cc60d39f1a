"""DCP save and load time on 2 CPU ranks (gloo), with and without the regularizers' state.

A ~10M-parameter MLP sharded with FSDP2 under ``DropGrad(ClippedOptimizer(AdamW, AutoClip))``,
trained two steps; ``dcp.save``/``dcp.load`` of ``{"train": model + optimizer}`` alone and with
``"regularizers": RegularizerState(chain)`` alternate round by round, each save into a fresh
folder. Rank 0's timings are reported. Target: our state adds at most 5% to the save time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..clipping.clipper import ClippedOptimizer, GradientClipper
from ..dropgrad.optimizer import DropGrad
from ..integrations.dcp import RegularizerState
from ..testing import run_on_ranks
from . import interleaved_timings, median_ratio


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--width", type=int, default=1024, help="MLP width (default 1024)")
    parser.add_argument("--layers", type=int, default=10, help="Linear layers (default 10: ~10.5M parameters)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per candidate (median reported)")
    parser.add_argument("--dir", default=None, help="where checkpoints are written (default: a temporary folder)")


class TrainState:
    """Model and optimizer through torch's get_state_dict/set_state_dict: the DCP recipe's ``Stateful`` app state."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.model, self.optimizer)
        return {"model": model, "optim": optim}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.optimizer, model_state_dict=state_dict["model"],
                       optim_state_dict=state_dict["optim"])


def _rank(rank: int, world_size: int, width: int, layers: int, rounds: int, root: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(layers)))
    for block in model:
        fully_shard(block)
    fully_shard(model)
    numel = sum(p.numel() for p in model.parameters())
    chain = DropGrad(ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4),
                                      GradientClipper("auto_clip", p_autoclip=0.5, model=model)),
                     drop_rate=0.1, model=model)
    regularizers = RegularizerState(chain)
    x = torch.randn(8, width, generator=torch.Generator().manual_seed(rank))
    for _ in range(2):
        model(x).square().mean().backward()
        chain.step()
        chain.zero_grad()
    train = TrainState(model, chain)
    apps = {"without our state": {"train": train}, "with our state": {"train": train, "regularizers": regularizers}}
    counter = iter(range(10 ** 6))
    last: dict[str, str] = {}

    def save(name: str) -> None:
        path = os.path.join(root, f"{name.split()[0]}_{next(counter)}")
        dcp.save(apps[name], checkpoint_id=path)
        dist.barrier()
        if rank == 0 and name in last:
            shutil.rmtree(last[name], ignore_errors=True)
        last[name] = path

    def load(name: str) -> None:
        dcp.load(apps[name], checkpoint_id=last[name])

    saves = {f"save {name}": (lambda n=name: save(n)) for name in apps}
    for fn in saves.values():  # warm-up: first-call costs of DCP's planner and the file system
        fn()
    times = interleaved_timings(saves, rounds, sync=dist.barrier)
    times.update(interleaved_timings({f"load {name}": (lambda n=name: load(n)) for name in apps}, rounds,
                                     sync=dist.barrier))
    size = {name: sum(os.path.getsize(os.path.join(last[name], f)) for f in os.listdir(last[name]))
            for name in apps}
    return {"times": times, "numel": numel, "bytes": size, "capacity": regularizers.capacity}


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = args.dir or tempfile.mkdtemp(prefix="dropgrad_dist_bench_ckpt_")
    try:
        first = run_on_ranks(_rank, 2, args.width, args.layers, args.rounds, root, timeout=1800)[0]
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    times = first["times"]
    rows = []
    for name, values in times.items():
        kind = name.split()[0]
        base = times[f"{kind} without our state"]
        ratio = median_ratio(values, base)
        rows.append({"candidate": name, "median_ms": statistics.median(values) * 1e3,
                     "min_ms": min(values) * 1e3, "max_ms": max(values) * 1e3, "overhead_pct": (ratio - 1) * 100})
    return {
        "name": "checkpoint",
        "device": (f"cpu, 2 ranks, gloo, FSDP2, {first['numel']:,} parameters, AdamW, "
                   f"DropGrad + AutoClip; checkpoint {first['bytes']['without our state']:,} bytes without, "
                   f"{first['bytes']['with our state']:,} with our state ({first['capacity']:,}-byte state tensor)"),
        "rows": rows,
        "notes": [
            "rank 0's timings over --rounds rounds; overhead_pct: median of per-round ratios to the same "
            "operation without our state (the two alternate each round)",
            "target: save with our state <= 1.05x save without",
        ],
    }
