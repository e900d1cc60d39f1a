"""Gradient clipping from torch-clip's family, with restarts, and composed with DropGrad.

    python examples/clipping.py

A regression problem with heavy-tailed (Student-t) label noise produces heavy-tailed
gradient norms: the case torch-clip's methods target. Each method trains the same model from
the same start for the same steps; AutoClip picks its level from the history of norms.
"""

import torch
from torch import nn

from dropgrad_dist import ClippedOptimizer, ClippedSGD, DropGrad, GradientClipper, Restarter


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 16, generator=gen)
    noise = torch.distributions.StudentT(1.5).sample((2048, 1))  # heavy tails (uses the global RNG once)
    return x, x @ torch.randn(16, 1, generator=gen) + 0.5 * noise


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))


def train(net: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
          restarter: Restarter | None = None, steps: int = 300) -> float:
    for step in range(steps):
        batch = torch.arange(step * 32, step * 32 + 32) % len(x)
        optimizer.zero_grad()
        nn.functional.mse_loss(net(x[batch]), y[batch]).backward()
        optimizer.step()
        if restarter is not None:
            restarter.step(net, optimizer)  # add the iterate; restart from the average when a period ends
    with torch.no_grad():  # the error on the noise-free signal part is what clipping protects
        return nn.functional.l1_loss(net(x), y).item()


def main() -> None:
    torch.manual_seed(0)
    x, y = data()
    print("method                    final L1 loss   clipped steps")
    for method, extra in [("no_clip", {}), ("norm", {}), ("layer_wise", {}), ("coordinate_wise", {}),
                          ("auto_clip", {}), ("linear_rand_norm", {"beta": 0.5}),
                          ("quadratic_rand_autoclip", {"beta": 0.5})]:
        net = model()
        # torch-clip's ClippedSGD and argument names.
        optimizer = ClippedSGD(net.parameters(), lr=5e-2, momentum=0.9, clipping_type=method,
                               clipping_level=1.0, p_autoclip=0.75, model=net, **extra)
        clipped = []
        hook = optimizer.register_step_post_hook(lambda opt, *_: clipped.append(opt.clipper.last_stats["clipped"]))
        loss = train(net, optimizer, x, y)
        hook.remove()
        print(f"{method:<25} {loss:>13.4f}   {sum(clipped):>5d} / {len(clipped)}")

    # Restarts (torch-clip's Restarter): one call after each optimizer step.
    net = model()
    optimizer = ClippedSGD(net.parameters(), lr=5e-2, momentum=0.9, clipping_type="layer_wise", clipping_level=1.0)
    restarter = Restarter(first_restart_steps=50, restart_coeff=1.25, max_steps=2000)
    loss = train(net, optimizer, x, y, restarter)
    print(f"layer_wise + restarts     {loss:>13.4f}   restarts: {restarter.restarts}")

    # Any optimizer, composed with DropGrad: mask, then clip, then step.
    net = model()
    clipper = GradientClipper("auto_clip", p_autoclip=0.9, model=net)
    optimizer = DropGrad(ClippedOptimizer(torch.optim.AdamW(net.parameters(), lr=1e-2), clipper),
                         drop_rate=0.1, model=net)
    loss = train(net, optimizer, x, y)
    print(f"DropGrad + auto_clip Adam {loss:>13.4f}   AutoClip level now {clipper.last_stats['level']:.3f} "
          f"({len(clipper.history)} norms in the history)")


if __name__ == "__main__":
    main()
