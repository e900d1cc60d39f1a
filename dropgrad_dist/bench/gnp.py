"""Gradient norm penalty / SAM step time and memory against two plain steps (one process).

A GNP step runs two forward/backward passes and one optimizer step, plus the global norm of
the first gradient, one copy of the parameters and one of the first gradient. Its floor is two
plain steps (forward, backward, SGD step). Two models: a ViT (few large tensors, where the
passes dominate) and 500 x Linear(64, 64) (1000 small tensors, where per-tensor Python shows).
Targets on CPU: a GNP step <= 1.05x two plain steps on the ViT; extra memory at most two
parameter-sized buffers (the theta copy and the first gradient), held or allocated.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..gnp.penalty import GradientNormPenalty
from ..gnp.sam import SAM
from . import _LiveBytes, interleaved_timings, median_ratio, peak_allocated_bytes
from .clip import NUM_HEADS_HELP, _model, _small_model
from .clip import check_arguments as check_arguments  # the ViT width must split over its heads

MODELS = ("vit", "many", "assigned")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=(*MODELS, "all"), default="all",
                        help="vit: the ViT below; many: 500 x Linear(64,64), 1000 tensors; assigned: the same 1000 "
                        "gradients assigned by the closure, no forward/backward (the regularizer's own work); all")
    parser.add_argument("--hidden_dim", type=int, default=384, help="ViT width (384: ~10.7M parameters)")
    parser.add_argument("--num_layers", type=int, default=6, help="ViT blocks")
    parser.add_argument("--num_heads", type=int, default=6, help=NUM_HEADS_HELP)
    parser.add_argument("--batch", type=int, default=32, help="images (vit) or rows (many) per step")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds per candidate (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")


def _vit_case(args: argparse.Namespace) -> tuple[str, nn.Module, Callable[[], torch.Tensor]]:
    model = _model(args.hidden_dim, args.num_layers, args.num_heads)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, 32, 32, generator=gen)
    labels = torch.randint(0, 10, (args.batch,), generator=gen)

    def closure() -> torch.Tensor:
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        return loss

    return f"ViT {args.num_layers} blocks x {args.hidden_dim}, batch {args.batch}", model, closure


def _many_case(args: argparse.Namespace) -> tuple[str, nn.Module, Callable[[], torch.Tensor]]:
    model = _small_model()
    inputs = torch.randn(args.batch, 64, generator=torch.Generator().manual_seed(0))

    def closure() -> torch.Tensor:
        loss = model(inputs).square().mean()
        loss.backward()
        return loss

    return f"500 x Linear(64,64) (1000 tensors), batch {args.batch}", model, closure


def _assigned_case(args: argparse.Namespace) -> tuple[str, nn.Module, Callable[[], torch.Tensor]]:
    model = _small_model()
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(0)
    stored = [torch.randn(p.shape, generator=gen) for p in params]
    loss = torch.zeros(())

    def closure() -> torch.Tensor:  # fresh gradient tensors, as backward after zero_grad(set_to_none=True)
        for param, grad in zip(params, torch._foreach_mul(stored, 1.0)):
            param.grad = grad
        return loss

    return "500 x Linear(64,64) (1000 tensors), gradients assigned, no forward/backward", model, closure


def _candidates(model: nn.Module, closure: Callable[[], torch.Tensor]) -> dict[str, Callable[[], Any]]:
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

    return {"plain step": plain_step, "2 plain steps": lambda: (plain_step(), plain_step()),
            "GNP step (alpha 0.8)": lambda: gnp.step(closure), "SAM step": lambda: sam.step(closure),
            "ASAM step": lambda: asam.step(closure), "SAM every=2, 2 steps": periodic_pair}


def _held_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of tensors that ``fn``'s ops allocate and leave alive (optimizer state, buffers kept for reuse;
    gradients that backward accumulates are not seen, as in :func:`peak_allocated_bytes`)."""
    with _LiveBytes() as tracker:
        fn()
    return tracker.live


def _rows(case: str, model: nn.Module, closure: Callable[[], torch.Tensor], rounds: int) -> list[dict[str, Any]]:
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    candidates = _candidates(model, closure)
    held = {name: _held_bytes(fn) for name, fn in candidates.items()}  # the first call: warm-up, buffers built
    memory = {name: peak_allocated_bytes(fn) + held[name] for name, fn in candidates.items()}
    times = interleaved_timings(candidates, rounds)
    floor = times["2 plain steps"]
    return [{"case": case, "candidate": name, "median_ms": statistics.median(values) * 1e3,
             "x_2_plain_steps": median_ratio(values, floor),
             "over_2_plain_ms": statistics.median(v - f for v, f in zip(values, floor)) * 1e3,
             "peak_allocated_MB": memory[name] / 1e6,
             "extra_over_plain_in_param_buffers": (memory[name] - memory["plain step"]) / param_bytes}
            for name, values in times.items()]


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    builders = {"vit": _vit_case, "many": _many_case, "assigned": _assigned_case}
    rows = []
    for name in MODELS if args.model == "all" else (args.model,):
        rows += _rows(*builders[name](args), args.rounds)
    return {
        "name": "gnp",
        "device": f"cpu ({args.threads} threads), SGD momentum",
        "rows": rows,
        "notes": [
            "x_2_plain_steps: median of per-round ratios to two plain steps (the target: GNP, SAM, ASAM <= 1.05 "
            "on the ViT)",
            "over_2_plain_ms: median of per-round differences to two plain steps: the regularizer's own work",
            "SAM every=2, 2 steps: one SAM step and one plain step (3 passes): its x_2_plain_steps / 2 is the "
            "average cost per step relative to two plain steps (ideal 0.75)",
            "peak_allocated_MB: most bytes of tensors allocated during one call and alive at once (op by op, "
            "allocator caching ignored), plus the bytes the first call left allocated (optimizer state, "
            "buffers kept for reuse)",
            "extra_over_plain_in_param_buffers: (that peak - a plain step's) / parameter bytes; "
            "target <= 2 (theta copy + first gradient)",
        ],
    }
