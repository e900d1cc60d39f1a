"""``GradientStamp``: equal only for the very gradient tensors it stamped, unmodified, with and without None."""

from __future__ import annotations

import pytest
import torch

from dropgrad_dist.core.steps import GradientStamp


def _params(with_grads: list[bool]) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in with_grads]
    for param, has in zip(params, with_grads):
        param.grad = torch.ones(3) if has else None
    return params


@pytest.mark.parametrize("with_grads", [[True, True, True], [True, False, True]], ids=["all grads", "a None grad"])
def test_a_stamp_sees_every_kind_of_change(with_grads):
    params = _params(with_grads)
    stamp = GradientStamp(params)
    assert stamp.unchanged(params)
    assert stamp.unchanged(iter(params))  # any iterable, as the callers pass

    params[2].grad.mul_(2.0)  # in place: the version counter moves
    assert not stamp.unchanged(params)

    stamp = GradientStamp(params)
    params[2].grad = params[2].grad.clone()  # equal values, another tensor
    assert not stamp.unchanged(params)

    stamp = GradientStamp(params)
    params[0].grad = None  # a gradient vanished
    assert not stamp.unchanged(params)

    stamp = GradientStamp(params)
    params[0].grad = torch.ones(3)  # a gradient appeared
    assert not stamp.unchanged(params)

    stamp = GradientStamp(params)
    assert not stamp.unchanged(params[:2])  # other parameters


def test_a_freed_gradient_never_matches_a_new_one():
    params = _params([True, True])
    stamp = GradientStamp(params)
    params[1].grad = None
    params[1].grad = torch.ones(3)  # may reuse the freed tensor's memory; version 0 like the stamped one
    assert not stamp.unchanged(params)


def test_a_stamp_of_no_gradient_is_never_unchanged():
    params = _params([False, False])
    assert not GradientStamp(params).unchanged(params)
    assert not GradientStamp([]).unchanged([])


def test_a_stamp_with_other_inputs_is_not_unchanged():
    params = _params([True, True])
    stamp = GradientStamp(params, ("norm", 0.5))
    assert stamp.unchanged(params, ("norm", 0.5))
    assert not stamp.unchanged(params, ("norm", 0.01))  # the same gradients, another option
    assert not stamp.unchanged(params)
