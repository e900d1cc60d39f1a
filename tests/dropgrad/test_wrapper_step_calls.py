"""``DropGrad.step()``'s Python work does not grow with the number of gradients once its table is cached.

Counted in Python function calls (``sys.setprofile``), not timed: a per-tensor loop, generator or
hook left in the step's hot path adds calls per gradient and fails this test.
"""

from __future__ import annotations

import sys

import torch

from dropgrad_dist import DropGrad


class _NoStep(torch.optim.Optimizer):
    """An optimizer whose ``step()`` does nothing: what is counted is the wrapper's own work."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        super().__init__(params, {})

    def step(self, closure=None) -> None:  # type: ignore[override]
        return None


def _python_calls_of_a_cached_step(tensors: int) -> int:
    params = [torch.nn.Parameter(torch.zeros(4, 3)) for _ in range(tensors)]
    dropgrad = DropGrad(_NoStep(params), drop_rate=0.5, seed=0)
    calls = 0

    def count(frame, event, arg) -> None:
        nonlocal calls
        calls += event == "call"

    for step in range(3):  # fresh gradients of the same layout each step, as backward after zero_grad gives
        for param in params:
            param.grad = torch.randn(4, 3)
        if step == 2:
            sys.setprofile(count)
        try:
            dropgrad.step()
        finally:
            sys.setprofile(None)
    assert dropgrad._table.rebuilds == 1  # the cached table served every step
    return calls


def test_a_cached_step_makes_as_many_python_calls_for_200_gradients_as_for_10():
    _python_calls_of_a_cached_step(10)  # warms the per-(seed, step) caches that every later run shares
    few, many = _python_calls_of_a_cached_step(10), _python_calls_of_a_cached_step(200)
    assert few > 0
    assert many == few, f"{many - few} more Python calls for 190 more gradients: per-tensor Python in the step"
