"""DropGrad's drop rate between steps: assignable like DropGrad 0.3.5, refused while a schedule sets it,
and schedulers that cannot be checkpointed refused up front."""

import pytest
import torch

from dropgrad_dist import DropGrad, keep_mask

from ..core.test_state_dict_rules import SCHEDULE
from ..nets import seeded_net


def test_drop_rate_is_assignable_between_steps_like_dropgrad_0_3_5():
    model = seeded_net()
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=1.0), drop_rate=0.1, model=model, seed=3)
    opt.drop_rate = 0.5
    assert opt.drop_rate == 0.5
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    model(x).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for name, param in model.named_parameters():
        keep = keep_mask(param.numel(), seed=3, step=0, key=name, rate=0.5).view_as(param)
        assert torch.equal(param.detach(), before[name] - torch.where(keep, grads[name] * 2.0, 0.0))
    with pytest.raises(ValueError, match="drop_rate must be a number in \\[0, 1\\]"):
        opt.drop_rate = 1.5
    untouched = DropGrad(torch.optim.SGD(model.parameters(), lr=1.0), params={"decoder": 0.2}, model=model)
    untouched.drop_rate = 0.3  # parameters no entry matches now get the assigned default
    assert [(e.key, e.fixed_rate) for e in untouched.plan.entries] == [
        ("encoder.weight", None), ("encoder.bias", None), ("decoder.weight", 0.2), ("decoder.bias", 0.2)]
    scheduled = DropGrad(torch.optim.SGD(model.parameters(), lr=1.0), **SCHEDULE, model=model)
    with pytest.raises(ValueError, match="cannot be assigned while a drop_rate_scheduler sets it"):
        scheduled.drop_rate = 0.2


def test_schedulers_without_checkpoint_support_are_refused_up_front():
    class RateOnly:
        def get_drop_rate(self) -> float:
            return 0.1

        def step(self) -> None:
            pass

    model = seeded_net()
    with pytest.raises(ValueError, match="RateOnly lacks state_dict, load_state_dict"):
        DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate_scheduler=RateOnly(), model=model)
