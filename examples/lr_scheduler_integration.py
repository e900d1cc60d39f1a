"""DropGrad with a learning-rate schedule and a drop-rate schedule.

An LR scheduler can be attached to the wrapped optimizer (as in the DropGrad 0.1 README) or to
the DropGrad wrapper itself; both share param_groups. The drop rate anneals from 0.3 to 0.

    python examples/lr_scheduler_integration.py
"""

import torch
from torch import nn

from dropgrad_dist import CosineAnnealingDropRateScheduler, DropGrad


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 10)
    y = (x[:, :2].sum(dim=1) > 0).long()
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
    steps = 60

    base = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    lr_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=steps)
    drop_schedule = CosineAnnealingDropRateScheduler(initial_drop_rate=0.3, final_drop_rate=0.0, num_steps=steps)
    optimizer = DropGrad(base, drop_rate_scheduler=drop_schedule, model=model)

    for step in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()  # DropGrad first, then the LR scheduler, as with any optimizer
        lr_scheduler.step()
        if step % 20 == 0:
            print(f"step {step:2d}  loss {loss.item():.4f}  lr {lr_scheduler.get_last_lr()[0]:.3f}  "
                  f"drop rate {optimizer.drop_rate:.3f}")
    accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
    print(f"final accuracy {accuracy:.3f}, final drop rate {optimizer.drop_rate:.3f}")


if __name__ == "__main__":
    main()
