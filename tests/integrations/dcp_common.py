"""Shared pieces of the DCP tests (spawned ranks import them by module path): layouts, chains, training.

A run trains ``tests/fsdp_common.Tiny`` on its slice of the global batch with the full chain
``GNP(DropGrad(ClippedOptimizer(RestartingOptimizer(AdamW), AutoClip)))`` (FSDP2, HSDP, one
process) or with the DDP hook under ``GNP(ClippedOptimizer(AdamW, AutoClip))``; the base
optimizer's step pre-hook records which gradient coordinates are nonzero at every step, so a
test can compare them with ``keep_mask`` for that step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dropgrad_dist import (
    ClippedOptimizer,
    DropGrad,
    DropGradHookState,
    GradientClipper,
    GradientNormPenalty,
    Restarter,
    RestartingOptimizer,
    canonical_name,
    keep_mask,
)
from dropgrad_dist.integrations.dcp import RegularizerState
from tests.fsdp_common import GLOBAL_BATCH, batch, make_model

SEED, RATE = 11, 0.4


def build(layout: str) -> tuple[nn.Module, Any, Any, Any]:
    """``(model, chain, regularizers, dropgrad_or_hook)`` for ``layout``: fsdp, hsdp, ddp or one."""
    model = make_model()
    if layout in ("fsdp", "hsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        world = dist.get_world_size()
        mesh = init_device_mesh("cpu", (2, world // 2) if layout == "hsdp" else (world,),
                                mesh_dim_names=("replicate", "shard") if layout == "hsdp" else ("shard",))
        for module in (model.l1, model.l3, model):
            fully_shard(module, mesh=mesh)
    if layout == "ddp":
        ddp = nn.parallel.DistributedDataParallel(model)
        hook = DropGradHookState(ddp, RATE, seed=SEED)
        hook.register(ddp)
        clipper = GradientClipper("auto_clip", p_autoclip=0.5, model=ddp)
        chain = GradientNormPenalty(ClippedOptimizer(torch.optim.AdamW(ddp.parameters(), lr=0.02), clipper),
                                    alpha=0.5, r=0.05, model=ddp)
        return ddp, chain, RegularizerState(chain, hook), hook
    base = torch.optim.AdamW(model.parameters(), lr=0.02)
    clipper = GradientClipper("auto_clip", p_autoclip=0.5, model=model)
    dropgrad = DropGrad(ClippedOptimizer(RestartingOptimizer(base, Restarter(2, 1.5, 100), model), clipper),
                        RATE, seed=SEED, model=model)
    chain = GradientNormPenalty(dropgrad, alpha=0.5, r=0.05, perturbation="global", model=model)
    return model, chain, RegularizerState(chain), dropgrad


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Canonical name -> the whole parameter (gathered where sharded)."""
    return {canonical_name(n): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def train(model: nn.Module, chain: Any, start: int, steps: int) -> list[dict[str, torch.Tensor]]:
    """Steps ``start .. start + steps - 1`` on this rank's slice; the nonzero pattern of each step's gradient."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    per = GLOBAL_BATCH // world
    patterns: list[dict[str, torch.Tensor]] = []

    def record(optimizer: Any, args: Any, kwargs: Any) -> None:
        patterns.append({canonical_name(n): (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad) != 0
                         for n, p in model.named_parameters()})

    handle = chain.base_optimizer.register_step_pre_hook(record)
    for step in range(start, start + steps):
        x, y = batch(step)
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]

        def closure() -> torch.Tensor:
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        chain.step(closure)
        chain.zero_grad()
    handle.remove()
    return patterns


def check_masks(patterns: list[dict[str, torch.Tensor]], start: int) -> None:
    """Every recorded gradient is nonzero exactly where ``keep_mask`` keeps the coordinate at its step."""
    for offset, pattern in enumerate(patterns):
        for key, nonzero in pattern.items():
            kept = keep_mask(nonzero.numel(), seed=SEED, step=start + offset, key=key, rate=RATE)
            assert torch.equal(nonzero.flatten(), kept), f"step {start + offset} {key}: mask differs from keep_mask"
