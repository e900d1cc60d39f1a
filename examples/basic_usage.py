"""DropGrad in three lines: wrap the optimizer, then train as usual.

    python examples/basic_usage.py
"""

import torch
from torch import nn

from dropgrad_dist import DropGrad


def main() -> None:
    torch.manual_seed(0)
    # A small regression problem: y = x @ w_true + noise.
    x = torch.randn(512, 20)
    y = x @ torch.randn(20, 1) + 0.1 * torch.randn(512, 1)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 1))

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    # Drop 10% of gradient coordinates, but never the biases; model= makes mask keys names.
    optimizer = DropGrad(optimizer, drop_rate=0.1, params={"*.bias": 0.0}, model=model, seed=0)

    for epoch in range(30):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if epoch % 10 == 0:
            print(f"epoch {epoch:2d}  loss {loss.item():.4f}")
    print(f"final loss {nn.functional.mse_loss(model(x), y).item():.4f} after {optimizer.step_index} DropGrad steps")


if __name__ == "__main__":
    main()
