"""What DropGrad masks on one process: every closure evaluation of a closure optimizer (LBFGS), complex
gradients per number; sparse gradients are refused."""

import pytest
import torch
from torch import nn

from dropgrad_dist import DropGrad, keep_mask

from ..nets import seeded_net


def test_closure_optimizers_mask_every_evaluation():
    """LBFGS evaluates the closure several times per step; each gradient gets the step's mask."""
    def closure_for(model, opt, masked_by_hand):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))

        def closure():
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            if masked_by_hand:
                for name, param in model.named_parameters():
                    keep = keep_mask(param.numel(), seed=4, step=0, key=name, rate=0.5).view_as(param)
                    param.grad.mul_(torch.where(keep, 2.0, 0.0))
            return loss
        return closure

    model, reference = seeded_net(), seeded_net()
    opt = DropGrad(torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5), drop_rate=0.5, model=model, seed=4)
    ref_opt = torch.optim.LBFGS(reference.parameters(), lr=0.5, max_iter=5)
    loss = opt.step(closure_for(model, opt, False))
    ref_loss = ref_opt.step(closure_for(reference, ref_opt, True))
    assert torch.equal(loss, ref_loss) and opt.step_index == 1
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_sparse_gradients_are_refused_clearly_and_complex_ones_are_masked_per_number():
    embedding = nn.Embedding(10, 4, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    opt = DropGrad(torch.optim.SGD(embedding.parameters(), lr=0.1), drop_rate=0.5, model=embedding)
    with pytest.raises(ValueError, match="does not support sparse gradients"):
        opt.step()
    weight = nn.Parameter(torch.randn(3, 5, dtype=torch.complex64))
    holder = nn.Module()
    holder.weight = weight
    weight.grad = torch.randn(3, 5, dtype=torch.complex64)
    grad = weight.grad.clone()
    DropGrad(torch.optim.SGD([weight], lr=1.0), drop_rate=0.5, model=holder, seed=2).mask_gradients_()
    keep = keep_mask(15, seed=2, step=0, key="weight", rate=0.5).view(3, 5)
    assert torch.equal(weight.grad, torch.where(keep, grad * 2.0, 0.0))
