"""A group added to ``ClippedOptimizer``/``ClippedSGD`` (``add_param_group``) is clipped from the next step on,
bitwise as if it had been there from the start; AutoClip with ``norm_scope="group"`` refuses it up front."""

from __future__ import annotations

import pytest
import torch

from dropgrad_dist import ClippedOptimizer, ClippedSGD, GradientClipper

from ..nets import Adapted

ADDED, STEPS = 2, 4


def _optimizer(kind: str, groups: list, norm_scope: str) -> torch.optim.Optimizer:
    if kind == "ClippedSGD":
        return ClippedSGD(groups, lr=0.1, momentum=0.9, clipping_type="norm", clipping_level=0.05,
                          norm_scope=norm_scope)
    return ClippedOptimizer(torch.optim.SGD(groups, lr=0.1, momentum=0.9),
                            GradientClipper("norm", 0.05, norm_scope=norm_scope))


def _run(kind: str, norm_scope: str, added_later: bool) -> tuple[Adapted, torch.optim.Optimizer]:
    model = Adapted()
    lora = {"params": list(model.lora.parameters()), "clipping_level": 0.02}
    base = list(model.base.parameters())
    optimizer = _optimizer(kind, base if added_later else [{"params": base}, lora], norm_scope)
    for step in range(STEPS):
        if step == ADDED:
            model.lora.requires_grad_(True)
            if added_later:
                optimizer.add_param_group(lora)
        optimizer.zero_grad()
        model(model.batch(step)).square().mean().backward()
        optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("kind", ["ClippedOptimizer", "ClippedSGD"])
@pytest.mark.parametrize("norm_scope", ["global", "group"])
def test_an_added_group_is_clipped_as_if_it_was_there_from_the_start(kind, norm_scope):
    later, optimizer = _run(kind, norm_scope, True)
    start, _ = _run(kind, norm_scope, False)
    assert optimizer.clipper.last_stats["clipped"]
    for a, b in zip(later.state_dict().values(), start.state_dict().values()):
        assert torch.equal(a, b)


def test_group_scope_autoclip_refuses_an_added_group_before_adding_it():
    model = Adapted()
    optimizer = ClippedOptimizer(torch.optim.SGD(model.base.parameters(), lr=0.1),
                                 GradientClipper("auto_clip", norm_scope="group"))
    model.lora.requires_grad_(True)
    optimizer.add_param_group({"params": [model.lora.bias]})  # no clip yet: no history to extend
    model(model.batch(0)).sum().backward()
    optimizer.step()
    with pytest.raises(ValueError, match="keeps one AutoClip history per parameter group.*norm_scope='global'"):
        optimizer.add_param_group({"params": [model.lora.weight]})
    assert len(optimizer.param_groups) == 2
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['clipping_level'\]"):
        ClippedOptimizer(torch.optim.SGD(model.base.parameters(), lr=0.1), GradientClipper()).add_param_group(
            {"params": [model.lora.weight], "clipping_level": -1.0})
