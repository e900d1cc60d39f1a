"""Gradient norm penalty / SAM step time and memory against two plain steps (one process).

A GNP step runs two forward/backward passes and one optimizer step, plus the global norm of
the first gradient, one copy of the parameters and one of the first gradient. Its floor is two
plain steps (forward, backward, SGD step). Target on CPU: a GNP step <= 1.05x two plain steps;
extra memory at most two parameter-sized buffers (the theta copy and the first gradient).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch
from torch import nn

from ..gnp import GradientNormPenalty
from ..sam import SAM
from . import interleaved_timings, median_ratio, peak_allocated_bytes
from .clip import _model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hidden_dim", type=int, default=384, help="ViT width (384: ~10.7M parameters)")
    parser.add_argument("--num_layers", type=int, default=6, help="ViT blocks")
    parser.add_argument("--batch", type=int, default=32, help="images per step")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds per candidate (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    model = _model(args.hidden_dim, args.num_layers)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, 32, 32, generator=gen)
    labels = torch.randint(0, 10, (args.batch,), generator=gen)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def closure() -> torch.Tensor:
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        return loss

    def sgd() -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)

    plain, gnp = sgd(), GradientNormPenalty(sgd(), alpha=0.8, r=0.05, model=model)
    sam = SAM(sgd(), rho=0.05, model=model)
    asam = SAM(sgd(), rho=0.5, adaptive=True, model=model)
    periodic = SAM(sgd(), rho=0.05, every=2, model=model)

    def periodic_pair() -> None:  # two consecutive steps: one two-pass SAM step, one plain step
        periodic.step(closure)
        periodic.step(closure)

    def plain_step() -> None:
        plain.zero_grad()
        closure()
        plain.step()

    candidates = {"plain step": plain_step, "2 plain steps": lambda: (plain_step(), plain_step()),
                  "GNP step (alpha 0.8)": lambda: gnp.step(closure), "SAM step": lambda: sam.step(closure),
                  "ASAM step": lambda: asam.step(closure),
                  "SAM every=2, 2 steps": periodic_pair}
    for fn in candidates.values():  # warm-up: allocator, momentum buffers
        fn()
    memory = {name: peak_allocated_bytes(fn) for name, fn in candidates.items()}
    times = interleaved_timings(candidates, args.rounds)
    floor = times["2 plain steps"]
    rows = []
    for name, values in times.items():
        rows.append({
            "candidate": name,
            "median_ms": statistics.median(values) * 1e3,
            "x_2_plain_steps": median_ratio(values, floor),
            "peak_allocated_MB": memory[name] / 1e6,
            "extra_over_plain_in_param_buffers": (memory[name] - memory["plain step"]) / param_bytes,
        })
    return {
        "name": "gnp",
        "device": (f"cpu ({args.threads} threads), ViT {args.num_layers} blocks x {args.hidden_dim}, "
                   f"{param_bytes // 4:,} parameters ({param_bytes / 1e6:.1f} MB), batch {args.batch}, SGD momentum"),
        "rows": rows,
        "notes": [
            "x_2_plain_steps: median of per-round ratios to two plain steps (the target: GNP, SAM, ASAM <= 1.05)",
            "SAM every=2, 2 steps: one SAM step and one plain step (3 passes): its x_2_plain_steps / 2 is the "
            "average cost per step relative to two plain steps (ideal 0.75)",
            "peak_allocated_MB: most bytes of tensors allocated during one call and alive at once (op by op, "
            "allocator caching ignored)",
            "extra_over_plain_in_param_buffers: (that peak - a plain step's) / parameter bytes; "
            "target <= 2 (theta copy + first gradient)",
        ],
    }
