"""Shared pieces of the FSDP tests: a tiny model with awkward shapes and a 1-process reference run."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dropgrad_dist import DropGrad
from dropgrad_dist.layout.names import canonical_name

GLOBAL_BATCH = 8
STEPS = 3


class Tiny(nn.Module):
    """Parameters (1, 7) (first dim < world size), (5, 7) and (5, 3) (rows not divisible by 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Parameter(torch.randn(1, 7))
        self.l1 = nn.Linear(7, 5)
        self.l2 = nn.Linear(5, 3)
        self.l3 = nn.Linear(3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l1(x * self.emb))
        return self.l3(torch.tanh(self.l2(h)))


def make_model() -> Tiny:
    torch.manual_seed(0)
    return Tiny()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 7, generator=gen), torch.randn(GLOBAL_BATCH, 5, generator=gen)


# name -> (optimizer factory, DropGrad kwargs, clip max_norm or None)
CONFIGS = {
    "sgd": (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), dict(drop_rate=0.5), None),
    "adam_clip": (lambda p: torch.optim.Adam(p, lr=0.01), dict(drop_rate=0.3, seed=7), 0.05),
    "adam_update_skip": (lambda p: torch.optim.Adam(p, lr=0.01),
                         dict(drop_rate=0.4, full_update_drop=True, step_skip_rate=0.4, seed=3), None),
}


def clip_dense(model: nn.Module, max_norm: float) -> torch.Tensor:
    return nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def train(model: nn.Module, config: str, rank: int = 0, world_size: int = 1, steps: int = STEPS,
          clip: Callable[[nn.Module, float], torch.Tensor] = clip_dense, dropgrad: DropGrad | None = None,
          start_step: int = 0, after_step: Callable[[DropGrad], None] | None = None) -> DropGrad:
    """Train ``steps`` steps of ``config`` on this rank's slice of the global batch.

    ``after_step(dropgrad)`` sees the masked gradients of each step (before ``zero_grad``).
    """
    make_opt, kwargs, max_norm = CONFIGS[config]
    if dropgrad is None:
        dropgrad = DropGrad(make_opt(model.parameters()), model=model, **kwargs)
    per = GLOBAL_BATCH // world_size
    for step in range(start_step, start_step + steps):
        x, y = batch(step)
        loss = nn.functional.mse_loss(model(x[rank * per:(rank + 1) * per]), y[rank * per:(rank + 1) * per])
        loss.backward()
        if max_norm is not None:
            clip(model, max_norm)
        dropgrad.step()
        if after_step is not None:
            after_step(dropgrad)
        dropgrad.zero_grad()
    return dropgrad


def reference_params(config: str, steps: int = STEPS) -> dict[str, torch.Tensor]:
    """The 1-process run on the full global batch: canonical name -> final parameter."""
    model = make_model()
    dropgrad = train(model, config, steps=steps)
    assert dropgrad.step_index == steps
    return {canonical_name(n): p.detach().clone() for n, p in model.named_parameters()}


def reference_masked_ones(**kwargs) -> dict[str, torch.Tensor]:
    """1-process: each gradient set to ones, then DropGrad's mask (values 0 or 1/(1-p))."""
    model = make_model()
    dropgrad = DropGrad(torch.optim.SGD(model.parameters(), lr=0.0), model=model, **kwargs)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    dropgrad.mask_gradients_()
    masked = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(bool((g == 0).any()) and bool((g != 0).any()) for g in masked.values() if g.numel() > 4)
    return masked
