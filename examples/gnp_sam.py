"""Gradient norm penalty (GNP) and SAM: the two-pass step, warmups, and composition with DropGrad.

    python examples/gnp_sam.py

GNP replaces the gradient by ``(1 - alpha) g(theta) + alpha g(theta + r g / |g|)`` (SAM: alpha = 1,
r = rho). ``step(closure)`` evaluates the closure twice; the closure computes the loss, calls
backward and returns the loss. A small classifier trains on a small noisy training set and
prints its held-out loss and accuracy per method (one seed: a demonstration of the API, not a
comparison). ASAM scales the perturbation by |theta|; SAM every 2nd step runs the second pass on
every other step only. GNP's zero-warmup skips the penalty (and the second pass) during the
learning-rate warmup, as the GNP paper recommends for adaptive optimizers.
"""

import torch
from torch import nn

from dropgrad_dist import SAM, DropGrad, GradientNormPenalty


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=gen)
    teacher = torch.randn(20, 5, generator=torch.Generator().manual_seed(99))
    labels = (x @ teacher).argmax(dim=1)
    flip = torch.rand(n, generator=gen) < 0.2  # label noise to overfit
    labels[flip] = torch.randint(0, 5, (int(flip.sum()),), generator=gen)
    return x, labels


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 5))


def train(name: str, make_optimizer, steps: int = 300) -> None:
    net = model()
    optimizer = make_optimizer(net)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: min(1.0, (t + 1) / 30))  # LR warmup
    x, y = data(256, seed=1)
    for step in range(steps):
        batch = torch.arange(step * 32, step * 32 + 32) % len(x)

        def closure() -> torch.Tensor:
            loss = nn.functional.cross_entropy(net(x[batch]), y[batch])
            loss.backward()
            return loss

        optimizer.step(closure)  # GNP/SAM evaluate the closure twice; plain optimizers once
        optimizer.zero_grad()
        scheduler.step()
    test_x, test_y = data(2048, seed=2)
    with torch.no_grad():
        logits = net(test_x)
    loss = nn.functional.cross_entropy(logits, test_y).item()
    accuracy = (logits.argmax(dim=1) == test_y).float().mean().item()
    print(f"{name:<34} test loss {loss:.3f}  accuracy {accuracy:.3f}")


def main() -> None:
    adam = lambda net: torch.optim.Adam(net.parameters(), lr=3e-3)  # noqa: E731
    train("Adam", adam)
    train("Adam + GNP (alpha 0.8, r 0.05)", lambda net: GradientNormPenalty(adam(net), alpha=0.8, r=0.05, model=net))
    train("Adam + GNP + zero-warmup (30)", lambda net: GradientNormPenalty(
        adam(net), alpha=0.8, r=0.05, model=net, warmup="zero", warmup_steps=30))
    train("SGD + SAM (rho 0.05)", lambda net: SAM(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
                                                  rho=0.05, model=net))
    train("SGD + ASAM (rho 0.5)", lambda net: SAM(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
                                                  rho=0.5, adaptive=True, model=net))
    train("SGD + SAM every 2nd step", lambda net: SAM(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
                                                      rho=0.05, every=2, model=net))
    # DropGrad inside: it masks the combined gradient; the perturbation uses the unmasked one.
    train("Adam + GNP + DropGrad (p 0.1)", lambda net: GradientNormPenalty(
        DropGrad(adam(net), drop_rate=0.1, model=net), alpha=0.8, r=0.05, model=net))


if __name__ == "__main__":
    main()
