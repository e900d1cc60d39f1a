"""``DropGrad.add_param_group`` (a LoRA adapter added mid-run) masks the new parameters as if their group had
been there from the start: same keys, same rates, bitwise the same masks (``keep_mask``) and parameters; the
plan's configuration (agreement check, checkpoints) follows, and a checkpoint from before the addition is
refused with a message that says how to load it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dropgrad_dist import DropGrad, keep_mask

from ..nets import Adapted

SEED, RATE, BIAS_RATE, LORA_LR = 3, 0.5, 0.25, 0.05


ADDED, STEPS = 2, 4


def _backward(model: Adapted, step: int) -> None:
    model(model.batch(step)).square().mean().backward()


def _wrapper(model: Adapted, groups: list, with_model: bool) -> DropGrad:
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    # with model=: a glob that covers the adapter's bias too; without: a Parameter entry (positional keys)
    params = {"*.bias": BIAS_RATE} if with_model else {model.base.bias: BIAS_RATE}
    return DropGrad(optimizer, RATE, params, seed=SEED, model=model if with_model else None)


def _lora_group(model: Adapted) -> dict:
    return {"params": list(model.lora.parameters()), "lr": LORA_LR}


def _run(added_later: bool, with_model: bool, stop: int = STEPS) -> tuple[Adapted, DropGrad, list]:
    """Train; the adapter is trainable from step ADDED on. Returns the model, the wrapper and per step the
    adapter's gradients as the wrapper masked them (None before ADDED)."""
    model = Adapted()
    if added_later:
        wrapper = _wrapper(model, list(model.base.parameters()), with_model)
    else:
        wrapper = _wrapper(model, [{"params": list(model.base.parameters())}, _lora_group(model)], with_model)
    masked = []
    for step in range(stop):
        if step == ADDED:
            model.lora.requires_grad_(True)
            if added_later:
                wrapper.add_param_group(_lora_group(model))
        wrapper.zero_grad()
        _backward(model, step)
        raw = [None if p.grad is None else p.grad.clone() for p in model.lora.parameters()]
        wrapper.mask_gradients_()
        masked.append((raw, [None if p.grad is None else p.grad.clone() for p in model.lora.parameters()]))
        wrapper.step()
    return model, wrapper, masked


@pytest.mark.parametrize("with_model", [True, False], ids=["model=", "positional keys"])
def test_an_added_group_is_masked_as_if_it_was_there_from_the_start(with_model):
    later, wrapper, masked = _run(True, with_model)
    start, reference, _ = _run(False, with_model)
    keys = ["lora.weight", "lora.bias"] if with_model else ["param_groups[1][0]", "param_groups[1][1]"]
    assert [entry.key for entry in wrapper.plan.entries][-2:] == keys
    assert wrapper.plan.config() == reference.plan.config()
    for a, b in zip(later.state_dict().values(), start.state_dict().values()):
        assert torch.equal(a, b)
    rates = [RATE, BIAS_RATE if with_model else RATE]  # the glob covers lora.bias; a Parameter entry does not
    for step in range(ADDED, STEPS):
        raw, got = masked[step]
        for key, rate, g, m in zip(keys, rates, raw, got):
            keep = keep_mask(g.numel(), seed=SEED, step=step, key=key, rate=rate).view_as(g)
            assert torch.equal(m, torch.where(keep, g * torch.tensor(1 / (1 - rate)), 0.0))


def test_checkpoints_across_the_addition():
    _, wrapper, _ = _run(True, True)
    after = wrapper.state_dict()
    _, before_wrapper, _ = _run(True, True, stop=ADDED)
    before = before_wrapper.state_dict()

    model, resumed, _ = _run(True, True, stop=ADDED + 1)  # the group is added: the later checkpoint loads
    resumed.load_state_dict(after)
    assert resumed.step_index == STEPS
    with pytest.raises(ValueError, match=r"saved before the parameters \['lora.bias', 'lora.weight'\].*"
                                         r"Load it before adding that group"):
        resumed.load_state_dict(before)
    assert resumed.step_index == STEPS  # nothing changed

    model = Adapted()
    fresh = _wrapper(model, list(model.base.parameters()), True)
    with pytest.raises(ValueError, match=r"also masks \['lora.bias', 'lora.weight'\].*add_param_group"):
        fresh.load_state_dict(after)
    fresh.load_state_dict(before)  # the recipe: load, then add the group
    fresh.add_param_group(_lora_group(model))
    assert fresh.step_index == ADDED and fresh.plan.config() == wrapper.plan.config()


def test_an_added_group_is_refused_before_anything_changes():
    model = Adapted()
    wrapper = _wrapper(model, list(model.base.parameters()), True)
    stranger = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="model= does not hold"):
        wrapper.add_param_group({"params": [stranger]})
    with pytest.raises(ValueError, match="more than one parameter group"):
        wrapper.add_param_group({"params": [model.base.weight]})
    with pytest.raises(TypeError, match="'params' entry"):
        wrapper.add_param_group([model.lora.weight])
    assert len(wrapper.param_groups) == 1 and len(wrapper.plan.entries) == 2
