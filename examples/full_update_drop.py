"""Full update drop: the optimizer sees the full gradient (its moments too), then each
coordinate of the *update* is dropped with probability p and kept updates are rescaled.

    python examples/full_update_drop.py
"""

import torch
from torch import nn

from dropgrad_dist import DropGrad


def train(full_update_drop: bool) -> float:
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    y = torch.sin(x[:, :1]) + 0.05 * torch.randn(256, 1)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    optimizer = DropGrad(torch.optim.Adam(model.parameters(), lr=5e-3), drop_rate=0.2,
                         full_update_drop=full_update_drop, model=model, seed=1)
    for _ in range(100):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return nn.functional.mse_loss(model(x), y).item()


def main() -> None:
    print(f"gradient drop:     final loss {train(full_update_drop=False):.4f}")
    print(f"full update drop:  final loss {train(full_update_drop=True):.4f}")


if __name__ == "__main__":
    main()
