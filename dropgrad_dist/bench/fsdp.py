"""FSDP step time on 2 CPU ranks (gloo): the optimizer step with and without the DropGrad wrapper.

One training step (forward, backward with reduce-scatter, optimizer step) of a ~5M-parameter
MLP sharded with FSDP2 ``fully_shard`` (or FSDP1 with ``use_orig_params=True``). Plain and
wrapped steps alternate round by round on the same model; rank 0's timings are reported.
Target: the wrapper adds at most 5% to the median step time.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..dropgrad.optimizer import DropGrad
from ..testing import run_on_ranks
from . import interleaved_timings, median_ratio

RATE = 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--width", type=int, default=1024, help="MLP width (default 1024: ~5.2M parameters)")
    parser.add_argument("--layers", type=int, default=5, help="Linear layers (default 5)")
    parser.add_argument("--batch", type=int, default=32, help="rows per rank and step (default 32)")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per candidate (median reported)")
    parser.add_argument("--fsdp-version", type=int, default=2, choices=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per rank (default 1)")


def _sharded_mlp(width: int, layers: int, version: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(layers)))
    if version == 2:
        from torch.distributed.fsdp import fully_shard

        for block in model:
            fully_shard(block)
        return fully_shard(model)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    cpu = torch.device("cpu")
    for i, block in enumerate(model):
        model[i] = FSDP(block, use_orig_params=True, device_id=cpu)
    return FSDP(model, use_orig_params=True, device_id=cpu)


def _rank(rank: int, world_size: int, width: int, layers: int, batch: int, rounds: int,
          version: int) -> dict[str, Any]:
    model = _sharded_mlp(width, layers, version)
    local_numel = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
    total = torch.tensor([local_numel])
    dist.all_reduce(total)
    plain = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    wrapped = DropGrad(torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9), drop_rate=RATE, model=model)
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(batch, width, generator=gen), torch.randn(batch, width, generator=gen)

    def step(optimizer: torch.optim.Optimizer) -> None:
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()

    candidates = {"plain step": lambda: step(plain), "DropGrad step": lambda: step(wrapped)}
    for fn in candidates.values():  # warm-up: mask kernel compilation, allocator
        fn()
        fn()
    times = interleaved_timings(candidates, rounds, sync=dist.barrier)
    # The wrapper's own work, timed alone: less exposed to the noise of a shared machine.
    nn.functional.mse_loss(model(x), y).backward()
    def mask_again() -> None:
        wrapped._masked.forget()  # forget that these gradients were masked: time a real pass
        wrapped.mask_gradients_()

    times.update(interleaved_timings({"mask_gradients_ only": mask_again}, rounds, sync=dist.barrier))
    return {"times": times, "numel": int(total), "local_numel": local_numel, "threads": torch.get_num_threads()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    results = run_on_ranks(_rank, 2, args.width, args.layers, args.batch, args.rounds, args.fsdp_version,
                           threads_per_rank=args.threads, timeout=900)
    first = results[0]
    times = first["times"]
    plain = times["plain step"]
    rows = []
    for name, values in times.items():
        paired = name != "mask_gradients_ only"
        ratio = median_ratio(values, plain) if paired else statistics.median(values) / statistics.median(plain)
        rows.append({
            "candidate": name,
            "median_ms": statistics.median(values) * 1e3,
            "x_plain": ratio,
            "overhead_pct": (ratio - 1.0) * 100.0 if paired else ratio * 100.0,
        })
    return {
        "name": "fsdp",
        "device": (f"cpu, 2 ranks x {first['threads']} thread(s), gloo, FSDP{args.fsdp_version}, "
                   f"{first['numel']:,} parameters ({first['local_numel']:,} on rank 0), "
                   f"batch {args.batch}/rank, SGD momentum, p={RATE}"),
        "rows": rows,
        "notes": [
            "rank 0's timings; x_plain: median of per-round ratios (plain and wrapped alternate each round); "
            "for 'mask_gradients_ only' the ratio of medians, its overhead_pct = mask time / plain step",
            "target: DropGrad step <= 1.05x plain step",
        ],
    }
