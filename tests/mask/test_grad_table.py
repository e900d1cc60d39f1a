"""DropGrad's cached piece table: rebuilt when the gradients' layout or the rates change, refreshed
otherwise, and its masks always bitwise those of ``drop_`` per tensor (the uncached definition)."""

from __future__ import annotations

import pytest
import torch

from dropgrad_dist import DropGrad, drop_
from dropgrad_dist.dropgrad.schedules import LinearDropRateScheduler

SEED = 7


def _params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.zeros(shape)) for shape in [(6, 5), (5,), (3, 4, 2), (9,), (1,)]]


def _expected(grads: list[torch.Tensor | None], step: int, rates: list[float]) -> list[torch.Tensor | None]:
    """The uncached definition: ``drop_`` on each gradient, keyed as DropGrad keys them without model=."""
    out = []
    for i, (grad, rate) in enumerate(zip(grads, rates)):
        if grad is None or rate == 0.0:
            out.append(grad)
            continue
        dense = grad.contiguous().clone()
        out.append(drop_(dense, seed=SEED, step=step, key=f"param_groups[0][{i}]", rate=rate).view(grad.shape))
    return out


def _fresh_grads(params: list[torch.nn.Parameter], generator: torch.Generator) -> list[torch.Tensor]:
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator).to(param.dtype)
    return [param.grad.clone() for param in params]


def _step_and_check(dropgrad: DropGrad, params: list[torch.nn.Parameter], before: list, rates: list[float]) -> None:
    step = dropgrad.step_index
    want = _expected(before, step, rates)
    dropgrad.step()
    for i, (param, expected) in enumerate(zip(params, want)):
        if expected is None:
            assert param.grad is None, i
        else:
            assert torch.equal(param.grad, expected), (step, i)


def test_table_is_reused_across_reallocated_gradients_and_rebuilt_on_layout_changes():
    params = _params()
    dropgrad = DropGrad(torch.optim.SGD(params, lr=0.0), drop_rate=0.5, seed=SEED)
    generator = torch.Generator().manual_seed(1)
    rates = [0.5] * len(params)
    for _ in range(3):  # zero_grad(set_to_none=True): new gradient storage each step, same layout
        dropgrad.zero_grad(set_to_none=True)
        _step_and_check(dropgrad, params, _fresh_grads(params, generator), rates)
    assert dropgrad._table.rebuilds == 1
    # A gradient missing (None), then back: the layout changes twice.
    dropgrad.zero_grad()
    before = _fresh_grads(params, generator)
    params[2].grad, before[2] = None, None
    _step_and_check(dropgrad, params, before, rates)
    assert dropgrad._table.rebuilds == 2
    dropgrad.zero_grad()
    _step_and_check(dropgrad, params, _fresh_grads(params, generator), rates)
    assert dropgrad._table.rebuilds == 3
    # A different dtype for one gradient (the param is float64 now).
    params[0].data = params[0].data.double()
    dropgrad.zero_grad()
    _step_and_check(dropgrad, params, _fresh_grads(params, generator), rates)
    assert dropgrad._table.rebuilds == 4
    # A non-contiguous gradient: not cacheable, masked by the per-tensor path, same masks.
    dropgrad.zero_grad()
    before = _fresh_grads(params, generator)
    params[2].grad = torch.randn(3, 2, 4, generator=generator).transpose(1, 2)
    before[2] = params[2].grad.clone()
    _step_and_check(dropgrad, params, before, rates)


def test_rate_changes_rebuild_the_table():
    params = _params()
    dropgrad = DropGrad(torch.optim.SGD(params, lr=0.0), drop_rate=0.5, seed=SEED)
    generator = torch.Generator().manual_seed(2)
    _step_and_check(dropgrad, params, _fresh_grads(params, generator), [0.5] * len(params))
    dropgrad.drop_rate = 0.25  # assignable between steps
    dropgrad.zero_grad()
    _step_and_check(dropgrad, params, _fresh_grads(params, generator), [0.25] * len(params))
    assert dropgrad._table.rebuilds == 2
    dropgrad.drop_rate = 0.0  # nothing masked at all
    dropgrad.zero_grad()
    _step_and_check(dropgrad, params, _fresh_grads(params, generator), [0.0] * len(params))


def test_schedule_rates_follow_every_step():
    params = _params()
    schedule = LinearDropRateScheduler(0.6, 0.1, num_steps=3)
    dropgrad = DropGrad(torch.optim.SGD(params, lr=0.0), drop_rate_scheduler=schedule, seed=SEED,
                        params={params[1]: 0.9})
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):
        rate = schedule.get_drop_rate()
        rates = [rate] * len(params)
        rates[1] = 0.9
        dropgrad.zero_grad()
        _step_and_check(dropgrad, params, _fresh_grads(params, generator), rates)


def test_added_param_group_is_masked_through_a_rebuilt_table_and_masks_stay_exact():
    params = _params()
    dropgrad = DropGrad(torch.optim.SGD(params, lr=0.0), drop_rate=0.5, seed=SEED)
    generator = torch.Generator().manual_seed(4)
    _step_and_check(dropgrad, params, _fresh_grads(params, generator), [0.5] * len(params))
    extra = torch.nn.Parameter(torch.zeros(4, 4))
    dropgrad.add_param_group({"params": [extra]})
    dropgrad.zero_grad()
    extra.grad = torch.randn(4, 4, generator=generator)
    extra_before = extra.grad.clone()
    step = dropgrad.step_index
    _step_and_check(dropgrad, params, _fresh_grads(params, generator), [0.5] * len(params))
    assert torch.equal(extra.grad, drop_(extra_before, seed=SEED, step=step, key="param_groups[1][0]", rate=0.5))
    assert dropgrad._table.rebuilds == 2


def test_mask_gradients_then_step_masks_once_through_the_table():
    params = _params()
    dropgrad = DropGrad(torch.optim.SGD(params, lr=0.0), drop_rate=0.5, seed=SEED)
    generator = torch.Generator().manual_seed(5)
    before = _fresh_grads(params, generator)
    want = _expected(before, 0, [0.5] * len(params))
    dropgrad.mask_gradients_()
    dropgrad.step()  # already masked in this step: not masked again
    assert all(torch.equal(p.grad, w) for p, w in zip(params, want))
    dropgrad.zero_grad()
    _step_and_check(dropgrad, params, _fresh_grads(params, generator), [0.5] * len(params))


def test_overlapping_gradients_are_refused_by_the_cached_path():
    base = torch.nn.Parameter(torch.zeros(8))
    other = torch.nn.Parameter(torch.zeros(8))
    dropgrad = DropGrad(torch.optim.SGD([base, other], lr=0.0), drop_rate=0.5, seed=SEED)
    shared = torch.randn(8)
    base.grad, other.grad = shared, shared
    with pytest.raises(ValueError, match="overlap"):
        dropgrad.step()
