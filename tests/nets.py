"""The small models the one-process tests share: ``Net`` (parameters ``encoder.*``, ``decoder.*``) and
``Adapted`` (``base.*`` and a frozen adapter ``lora.*``, for groups added with ``add_param_group``)."""

from __future__ import annotations

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(6, 8)
        self.decoder = nn.Linear(8, 3)

    def forward(self, x):
        return self.decoder(torch.tanh(self.encoder(x)))


def seeded_net(seed: int = 0) -> Net:
    """A ``Net`` initialized from ``torch.manual_seed(seed)``: equal calls give equal parameters."""
    torch.manual_seed(seed)
    return Net()


class Adapted(nn.Module):
    """``base(x) + lora(x)``, seeded; the adapter ``lora`` is frozen until a test adds it to the optimizer."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.base = nn.Linear(6, 4)
        self.lora = nn.Linear(6, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        self.lora.requires_grad_(False)

    def forward(self, x):
        return self.base(x) + self.lora(x)

    def batch(self, step: int) -> torch.Tensor:
        """The input of step ``step`` (the same in every run)."""
        return torch.randn(8, 6, generator=torch.Generator().manual_seed(100 + step))
