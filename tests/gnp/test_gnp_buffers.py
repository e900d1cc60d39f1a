"""GNP/SAM's first-pass buffers, cached per layout: after every layout change the step is bitwise the
uncached computation (per-tensor copies and ops in the same order), and an unchanged layout reuses them."""

import copy

import pytest
import torch
from torch import nn

from dropgrad_dist import SAM, GradientNormPenalty
from dropgrad_dist.layout.norms import grad_norms

LR = 0.05


class Chain(nn.Module):
    """Three layers; ``head`` may be swapped for one of another width (a shape change of its parameters)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.middle, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.use_middle = True

    def forward(self, x):
        hidden = torch.tanh(self.first(x))
        if self.use_middle:  # False: the middle layer gets no gradient
            hidden = torch.tanh(self.middle(hidden))
        return self.head(hidden)


def _closure(model, step):
    def closure():
        gen = torch.Generator().manual_seed(step)
        dtype = next(model.parameters()).dtype
        x = torch.randn(16, 6, generator=gen).to(dtype)
        loss = model(x).square().mean()
        loss.backward()
        return loss
    return closure


def _groups(model):
    return [list(model.first.parameters()) + list(model.middle.parameters()), list(model.head.parameters())]


def _reference_grads(model, groups, closure, alpha, radii, adaptive, mix):
    """The uncached step's combined gradient: per-tensor clones and ops, in the order the buffered path keeps."""
    params = [p for group in groups for p in group]
    for p in params:
        p.grad = None
    closure()
    with_grad = [(k, p) for k, group in enumerate(groups) for p in group if p.grad is not None]
    first = [p.grad.clone() for _, p in with_grad]
    theta = [p.detach().clone() for _, p in with_grad]
    with torch.no_grad():
        for k, p in with_grad:
            if adaptive[k]:
                p.grad.mul_(p.detach().abs())
        norm = float(grad_norms(params).total)
        for (_, p), g1 in zip(with_grad, first):
            p.grad.copy_(g1)
        for (k, p), g1 in zip(with_grad, first):
            p.add_(g1 * p.detach().square() if adaptive[k] else g1, alpha=radii[k] / norm)
        if mix == "normalized":
            plain = float(grad_norms(params).total)
            first = [g * (1.0 / plain) for g in first]
    for p in params:
        p.grad = None
    closure()
    with torch.no_grad():
        for (_, p), t in zip(with_grad, theta):
            p.copy_(t)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(alpha)
        for (_, p), g1 in zip(with_grad, first):
            p.grad.add_(g1, alpha=1.0 - alpha)
    return {id(p): (None if p.grad is None else p.grad.clone()) for p in params}


def _check_step(optimizer, model, step, alpha, radii, adaptive, mix):
    """One step of ``optimizer`` against the uncached reference on a copy of ``model``: bitwise equal."""
    twin = copy.deepcopy(model)
    twin_params = dict(zip(map(id, model.parameters()), twin.parameters()))
    groups = [[twin_params[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    want = _reference_grads(twin, groups, _closure(twin, step), alpha, radii, adaptive, mix)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    theta = [p.detach().clone() for p in params]
    optimizer.step(_closure(model, step))
    for p, before in zip(params, theta):
        expected = want[id(twin_params[id(p)])]
        if expected is None:
            assert p.grad is None
            continue
        assert torch.equal(p.grad, expected)
        assert torch.equal(p.detach(), before.add(expected, alpha=-LR))  # theta restored, then one SGD step


@pytest.mark.parametrize("adaptive,mix,alpha", [(False, "raw", 0.8), (True, "raw", 0.8), (False, "normalized", 0.6),
                                                (True, "normalized", 1.0)])
def test_layout_changes_rebuild_the_buffers_and_every_step_is_the_uncached_result(adaptive, mix, alpha):
    model = Chain()
    model.head.requires_grad_(False)  # trained from step 2 on, in a group of its own
    optimizer = GradientNormPenalty(torch.optim.SGD(_groups(model)[0], lr=LR), alpha=alpha, r=0.1,
                                    adaptive=adaptive, mix=mix, model=model)
    args = dict(alpha=alpha, adaptive=[adaptive, adaptive], mix=mix)
    buffers = optimizer._buffers

    _check_step(optimizer, model, 0, radii=[0.1], **args)
    first_pointer = buffers._layout.first[0].data_ptr()
    _check_step(optimizer, model, 1, radii=[0.1], **args)  # new gradient tensors (set_to_none), same layout
    assert buffers.rebuilds == 1 and buffers._layout.first[0].data_ptr() == first_pointer  # reused

    optimizer.add_param_group({"params": list(model.head.requires_grad_(True).parameters())})  # a new group
    _check_step(optimizer, model, 2, radii=[0.1, 0.1], **args)
    assert buffers.rebuilds == 2

    model.use_middle = False  # some gradients stay None
    _check_step(optimizer, model, 3, radii=[0.1, 0.1], **args)
    assert buffers.rebuilds == 3
    model.use_middle = True

    with torch.no_grad():  # a shape change: the head's parameters replaced by wider ones in place
        model.head.weight.data = torch.randn(5, 8)
        model.head.bias.data = torch.randn(5)
    _check_step(optimizer, model, 4, radii=[0.1, 0.1], **args)
    assert buffers.rebuilds == 4  # the middle layer's gradient back and the new shape: one layout

    model.double()  # a dtype change
    _check_step(optimizer, model, 5, radii=[0.1, 0.1], **args)
    _check_step(optimizer, model, 6, radii=[0.1, 0.1], **args)
    assert buffers.rebuilds == 5
    assert buffers._layout.first[0].dtype == torch.float64


def test_sam_per_group_rho_and_adaptive_read_every_step_on_cached_buffers():
    model = Chain()
    groups = [{"params": _groups(model)[0], "rho": 0.05, "adaptive": False},
              {"params": _groups(model)[1], "rho": 0.5, "adaptive": True}]
    optimizer = SAM(torch.optim.SGD(groups, lr=LR), rho=0.05, model=model)
    _check_step(optimizer, model, 0, alpha=1.0, radii=[0.05, 0.5], adaptive=[False, True], mix="raw")
    optimizer.param_groups[0]["rho"], optimizer.param_groups[1]["adaptive"] = 0.2, False  # set like lr
    _check_step(optimizer, model, 1, alpha=1.0, radii=[0.2, 0.5], adaptive=[False, False], mix="raw")
    assert optimizer._buffers.rebuilds == 1


def test_first_and_second_step_keep_the_buffers_out_of_grad():
    """The davda54 form: a plain periodic step and a penalized one through first_step/second_step; the
    gradient set back on a plain step is a copy, never the reused buffer (a later backward would write into it)."""
    model = Chain()
    optimizer = SAM(list(model.parameters()), torch.optim.SGD, rho=0.05, every=2, lr=LR)
    for step in range(4):
        _closure(model, step)()
        optimizer.first_step(zero_grad=True)
        _closure(model, step)()
        optimizer.second_step(zero_grad=False)
        layout = optimizer._buffers._layout
        held = {t.untyped_storage().data_ptr() for t in layout.first + layout.theta}
        assert not any(p.grad.untyped_storage().data_ptr() in held for p in model.parameters())
        optimizer.zero_grad()
    assert optimizer.penalty_steps == 2 and optimizer._buffers.rebuilds == 1


def test_sparse_gradients_are_refused_before_anything_moves():
    embedding = nn.Embedding(10, 4, sparse=True)
    theta = embedding.weight.detach().clone()
    optimizer = GradientNormPenalty(torch.optim.SGD(embedding.parameters(), lr=LR), alpha=0.5, r=0.1)

    def closure():
        loss = embedding(torch.tensor([1, 2, 3])).sum()
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="dense gradients"):
        optimizer.step(closure)
    assert torch.equal(embedding.weight.detach(), theta)
