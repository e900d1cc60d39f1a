"""Clipping cost per step: each GradientClipper method vs ``torch.nn.utils.clip_grad_norm_`` (foreach).

The gradients of a small ViT (torchvision ``VisionTransformer``, 80 tensors) are clipped in
one process and on 2 CPU ranks under FSDP2 (sharded gradients: one all-reduce per clip). Each
round restores the same gradients (untimed) before every candidate, so every call does a full
norm and scaling pass. Also timed: the AutoClip quantile step (append + exact quantile) at a
100k-step history; and ``norm``, ``layer_wise`` on 1000 small tensors (500 x Linear(64,64)), target
<= 1.3x. Targets: ``norm`` and ``layer_wise`` within 1.5x ``clip_grad_norm_``; the
AutoClip quantile under 1 ms per step at 100k history.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ..clipping.clipper import CLIPPING_METHODS, GradientClipper, NormHistory
from ..testing import run_on_ranks
from . import median_ratio

BASELINE = "clip_grad_norm_ (foreach)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hidden_dim", type=int, default=384, help="ViT width (384 with 6 blocks: ~10.7M parameters)")
    parser.add_argument("--num_layers", type=int, default=6, help="ViT blocks (6: 80 gradient tensors)")
    parser.add_argument("--num_heads", type=int, default=6, help=NUM_HEADS_HELP)
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per candidate (median reported)")
    parser.add_argument("--history", type=int, default=100_000, help="AutoClip history length to time")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (per rank)")
    parser.add_argument("--small_only", action="store_true",
                        help="only the 1-process cases (ViT and 1000 tensors), no FSDP2 ranks or quantile")


NUM_HEADS_HELP = "attention heads per ViT block; must divide --hidden_dim"


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse a ViT width that its attention heads do not split evenly (torch would assert mid-run).

    Raises:
        ValueError: naming both flags and a head count that fits.
    """
    if args.hidden_dim <= 0 or args.num_heads <= 0:
        raise ValueError(f"--hidden_dim and --num_heads must be positive, got {args.hidden_dim} and {args.num_heads}")
    if args.hidden_dim % args.num_heads:
        fits = max(h for h in range(1, args.num_heads + 1) if args.hidden_dim % h == 0)
        raise ValueError(f"--hidden_dim {args.hidden_dim} must be a multiple of --num_heads {args.num_heads} "
                         f"(e.g. --num_heads {fits})")


def _model(hidden_dim: int, num_layers: int, num_heads: int = 6) -> torch.nn.Module:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=4, num_layers=num_layers, num_heads=num_heads,
                             hidden_dim=hidden_dim, mlp_dim=4 * hidden_dim, num_classes=10)


def _small_model() -> torch.nn.Module:
    """500 x Linear(64, 64): 1000 small gradient tensors, where per-tensor Python costs show."""
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(500)])


def _candidates(model: torch.nn.Module, level: float,
                methods: tuple[str, ...] = CLIPPING_METHODS) -> dict[str, Callable[[], Any]]:
    params = list(model.parameters())
    out: dict[str, Callable[[], Any]] = {
        BASELINE: lambda: torch.nn.utils.clip_grad_norm_(params, level, foreach=True)}
    for method in methods:
        beta = 0.5 if "rand" in method else None
        clipper = GradientClipper(method, level, beta=beta, p_autoclip=0.5, model=model)
        for value in torch.linspace(1.0, 2.0 * level, 64).tolist():  # a history to take quantiles of
            clipper.history.append(value)
        out[method] = lambda clipper=clipper: clipper.clip_(params)
    return out


def _time_clips(model: torch.nn.Module, rounds: int, sync: Callable[[], None],
                methods: tuple[str, ...] = CLIPPING_METHODS) -> dict[str, list[float]]:
    grads = {p: torch.randn_like(p) for p in model.parameters()}
    saved = {p: g.clone() for p, g in grads.items()}
    for p, g in grads.items():
        p.grad = g
    total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    candidates = _candidates(model, level=0.5 * total, methods=methods)  # every norm-based call scales
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for round_index in range(rounds + 2):  # two warm-up rounds
        for name, fn in candidates.items():
            for p in model.parameters():
                p.grad.copy_(saved[p])
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if round_index >= 2:
                times[name].append(time.perf_counter() - start)
    return times


def _time_quantile(length: int, rounds: int) -> list[float]:
    history = NormHistory()
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(length + rounds, generator=gen, dtype=torch.float64).exp().tolist()
    for value in values[:length]:
        history.append(value)
    times = []
    for value in values[length:]:
        start = time.perf_counter()
        history.quantile_with(value, 0.75)
        history.append(value)
        times.append(time.perf_counter() - start)
    return times


def _fsdp2_rank(rank: int, world_size: int, hidden_dim: int, num_layers: int, num_heads: int,
                rounds: int) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    model = _model(hidden_dim, num_layers, num_heads)
    for block in model.encoder.layers:
        fully_shard(block)
    fully_shard(model)
    params = list(model.parameters())
    for p in params:  # DTensor gradients with the parameters' layout
        p.grad = torch.distributed.tensor.DTensor.from_local(
            torch.randn_like(p.to_local()), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    return {"times": _time_clips(model, rounds, sync=dist.barrier)}


def _rows(times: dict[str, list[float]], layout: str) -> list[dict[str, Any]]:
    base = times[BASELINE]
    return [{"layout": layout, "candidate": name, "median_ms": statistics.median(values) * 1e3,
             "x_clip_grad_norm": median_ratio(values, base)} for name, values in times.items()]


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    model = _model(args.hidden_dim, args.num_layers, args.num_heads)
    numel = sum(p.numel() for p in model.parameters())
    rows = _rows(_time_clips(model, args.rounds, sync=lambda: None), "1 process")
    rows += _rows(_time_clips(_small_model(), args.rounds, sync=lambda: None, methods=("norm", "layer_wise")),
                  "1 process, 500 x Linear(64,64) (1000 tensors)")
    if args.small_only:
        return {"name": "clip", "device": f"cpu ({args.threads} thread(s))", "rows": rows, "notes": []}
    ranks = run_on_ranks(_fsdp2_rank, 2, args.hidden_dim, args.num_layers, args.num_heads, args.rounds,
                         threads_per_rank=args.threads, timeout=900)
    rows += _rows(ranks[0]["times"], "FSDP2, 2 ranks")
    quantile = _time_quantile(args.history, max(200, args.rounds))
    rows.append({"layout": "1 process", "candidate": f"AutoClip quantile + append @ {args.history:,} norms",
                 "median_ms": statistics.median(quantile) * 1e3, "x_clip_grad_norm": None})
    return {
        "name": "clip",
        "device": (f"cpu ({args.threads} thread(s) per rank), ViT {args.num_layers} blocks x {args.hidden_dim}: "
                   f"{numel:,} parameters in {len(list(model.parameters()))} tensors; FSDP2 over gloo"),
        "rows": rows,
        "notes": [
            "median_ms: one clip of every gradient (norm + scaling), gradients restored before each call (untimed)",
            "x_clip_grad_norm: median of per-round ratios to torch.nn.utils.clip_grad_norm_(foreach=True); "
            "targets: norm, layer_wise <= 1.5",
            "FSDP2: rank 0's timings; both sides all-reduce the sharded norms (clip_grad_norm_ via DTensor)",
            "AutoClip quantile: exact quantile of history + current norm, then append; target < 1 ms at 100k",
        ],
    }
