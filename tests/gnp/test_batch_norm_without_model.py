"""GNP/SAM without ``model=`` cannot restore the BatchNorm statistics after the second pass: the first
two-pass step warns once, naming the fix, when a BatchNorm module updated its statistics there."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from dropgrad_dist import SAM


def _model(batch_norm: bool) -> nn.Module:
    torch.manual_seed(0)
    middle = nn.BatchNorm1d(8) if batch_norm else nn.Identity()
    return nn.Sequential(nn.Linear(6, 8), middle, nn.Tanh(), nn.Linear(8, 3))


def _loss(model: nn.Module) -> torch.Tensor:
    return model(torch.randn(16, 6)).square().mean()


def _train(form: str, model: nn.Module, given_model: bool, steps: int = 3) -> None:
    if form == "step(closure)":
        sam = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, model=model if given_model else None)
    else:
        sam = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, model=model if given_model else None)

    def closure():
        loss = _loss(model)
        loss.backward()
        return loss

    for _ in range(steps):
        if form == "step(closure)":
            sam.step(closure)
        else:
            closure()
            sam.first_step(zero_grad=True)
            closure()
            sam.second_step(zero_grad=True)


@pytest.mark.parametrize("form", ["step(closure)", "first_step/second_step"])
@pytest.mark.parametrize(("batch_norm", "given_model"), [(True, False), (True, True), (False, False)],
                         ids=["BatchNorm, no model=", "BatchNorm, model=", "no BatchNorm, no model="])
def test_the_first_two_pass_step_warns_once_when_the_default_cannot_act(form, batch_norm, given_model):
    model = _model(batch_norm)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(form, model, given_model)
    messages = [str(w.message) for w in caught if "bn_stats_from_first_pass" in str(w.message)]
    if batch_norm and not given_model:
        assert len(messages) == 1, messages
        assert "without model=" in messages[0] and "BatchNorm1d" in messages[0]
        assert "Pass model=your_model" in messages[0]
        assert int(model[1].num_batches_tracked) == 2 * 3  # as the warning says: both passes count
    else:
        assert messages == []
    if batch_norm and given_model:
        assert int(model[1].num_batches_tracked) == 3
