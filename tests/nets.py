"""The small two-layer model the one-process tests share (parameters ``encoder.*``, ``decoder.*``)."""

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
