"""GNP/SAM perturb a group added with ``add_param_group`` from the next step on, bitwise as if it had been there
from the start (also through a ``DropGrad``/``ClippedOptimizer`` chain, which mask and clip it); adding a
group between ``first_step()`` and ``second_step()`` is refused."""

from __future__ import annotations

import pytest
import torch

from dropgrad_dist import SAM, ClippedOptimizer, DropGrad, GradientClipper, GradientNormPenalty

from ..nets import Adapted

ADDED, STEPS = 2, 4


def _chain(model: Adapted, groups: list) -> GradientNormPenalty:
    inner = ClippedOptimizer(torch.optim.SGD(groups, lr=0.1, momentum=0.9), GradientClipper("norm", 0.5))
    return GradientNormPenalty(DropGrad(inner, 0.3, seed=1, model=model), alpha=0.5, r=0.05, model=model)


def _sam(model: Adapted, groups: list) -> SAM:
    return SAM(groups, torch.optim.SGD, rho=0.05, lr=0.1)  # davda54's form: first_step/second_step


def _run(form: str, added_later: bool) -> Adapted:
    model = Adapted()
    base, lora = list(model.base.parameters()), {"params": list(model.lora.parameters())}
    optimizer = (_chain if form == "GNP(DropGrad(ClippedOptimizer))" else _sam)(
        model, base if added_later else [{"params": base}, lora])
    for step in range(STEPS):
        if step == ADDED:
            model.lora.requires_grad_(True)
            if added_later:
                optimizer.add_param_group(lora)

        def closure(step=step):
            loss = model(model.batch(step)).square().mean()
            loss.backward()
            return loss

        if form == "GNP(DropGrad(ClippedOptimizer))":
            optimizer.step(closure)
        else:
            optimizer.zero_grad()
            closure()
            optimizer.first_step(zero_grad=True)
            closure()
            optimizer.second_step(zero_grad=True)
    return model


@pytest.mark.parametrize("form", ["GNP(DropGrad(ClippedOptimizer))", "SAM first_step/second_step"])
def test_an_added_group_is_perturbed_as_if_it_was_there_from_the_start(form):
    later, start = _run(form, True), _run(form, False)
    for a, b in zip(later.state_dict().values(), start.state_dict().values()):
        assert torch.equal(a, b)


def test_adding_a_group_between_the_two_steps_is_refused():
    model = Adapted()
    sam = SAM(model.base.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    model(model.batch(0)).sum().backward()
    sam.first_step(zero_grad=True)
    model.lora.requires_grad_(True)
    with pytest.raises(ValueError, match="between first_step.*and second_step"):
        sam.add_param_group({"params": list(model.lora.parameters())})
    assert len(sam.param_groups) == 1
    model(model.batch(0)).sum().backward()
    sam.second_step()
    sam.add_param_group({"params": list(model.lora.parameters())})
    assert sam.param_groups[1]["rho"] == 0.05
