"""The guard against compounding masks installs its per-parameter pre-hooks only while a round is held."""

import pytest
import torch
from torch import nn

from dropgrad_dist.ddp.held_grads import HeldGradientGuard
from dropgrad_dist.ddp.rounds import Rounds


class _Owner:  # the hook state's stand-in: the guard's hooks go when it goes
    pass


def _hooks(param: torch.Tensor) -> int:
    return len(param._backward_hooks or {})


def _backward(model: nn.Module) -> None:
    model(torch.ones(2, 3)).sum().backward()


def test_pre_hooks_exist_only_while_a_synchronized_round_is_unconsumed():
    torch.manual_seed(0)
    model, rounds, owner = nn.Linear(3, 3), Rounds("test", None), _Owner()
    guard = HeldGradientGuard(owner, rounds, model.parameters())
    guard.watch(model)
    guard.watch(model)  # once per module
    _backward(model)
    assert guard.installs == 0 and _hooks(model.weight) == 0  # nothing held: no Python per parameter

    rounds.open({}, torch.device("cpu"), masking=True)  # a synchronized round, closed, then no optimizer step
    rounds.close()
    assert rounds.held
    with pytest.raises(RuntimeError, match="masks would compound"):
        _backward(model)  # its forward installed the pre-hooks; .grad still holds the masked gradient
    assert guard.installs == 1 and _hooks(model.weight) == 1

    model.zero_grad(set_to_none=True)  # a skipped step, gradients dropped: the next backward is fine
    _backward(model)
    rounds.consumed()  # an optimizer step
    _backward(model)
    assert _hooks(model.weight) == 0 and _hooks(model.bias) == 0  # removed by the first forward after it
    assert guard.installs == 1

    rounds.open({}, torch.device("cpu"), masking=True)
    rounds.close()
    model(torch.ones(1, 3))
    assert _hooks(model.weight) == 1
    del owner  # the state is gone: so are its hooks
    assert _hooks(model.weight) == 0
    _backward(model)
