"""``restore()`` abandons a step after ``first_step()`` when the caller's code fails before ``second_step()``:
theta back bitwise, the BatchNorm statistics as the first pass left them, ready for a new ``first_step()``;
the run then equals, bitwise, a run without the failed step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dropgrad_dist import SAM

FAILED = 2  # the step whose second forward raises


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    return model(torch.randn(16, 6, generator=gen)).square().mean()


def _step(sam: SAM, model: nn.Module, step: int) -> None:
    sam.zero_grad()
    _loss(model, step).backward()
    sam.first_step(zero_grad=True)
    try:
        _loss(model, step).backward()
        sam.second_step(zero_grad=True)
    finally:
        assert not sam.restore()  # after second_step: nothing to abandon


def _optimizer_state(sam: SAM) -> list[torch.Tensor]:
    return [sam.state[p]["momentum_buffer"] for p in sam.param_groups[0]["params"]]


def test_restore_after_a_failed_second_pass_leaves_the_run_as_without_that_step():
    model, reference = _model(), _model()
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05, model=model)
    ref = SAM(torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9), rho=0.05, model=reference)
    for step in range(FAILED):
        _step(sam, model, step)
        _step(ref, reference, step)

    sam.zero_grad()
    _loss(model, 100).backward()
    theta = [p.detach().clone() for p in model.parameters()]
    statistics = [b.clone() for b in model.buffers()]  # as the first pass left them
    sam.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match="the user's second forward failed"):
        try:
            _loss(model, 100)  # the second forward runs (BatchNorm statistics move), then the user's code fails
            raise RuntimeError("the user's second forward failed")
        finally:
            assert sam.restore()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), theta))
    assert all(torch.equal(b, s) for b, s in zip(model.buffers(), statistics))
    assert all(p.grad is None for p in model.parameters()) and sam.step_index == FAILED

    for step in range(FAILED, FAILED + 2):
        _step(sam, model, step)
        _step(ref, reference, step)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(_optimizer_state(sam), _optimizer_state(ref)))
    assert sam.step_index == ref.step_index == FAILED + 2


def test_a_second_first_step_without_restore_is_still_refused():
    model = _model()
    sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, model=model)
    _loss(model, 0).backward()
    sam.first_step()
    with pytest.raises(ValueError, match=r"first_step was called twice.*restore\(\)"):
        sam.first_step()
    assert sam.restore() and not sam.restore()
    _loss(model, 0).backward()
    sam.first_step()  # ready again
