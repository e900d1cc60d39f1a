"""Checkpoint rules of DropGrad and the DDP hook state on one process: another configuration is
refused (or kept with strict=False), malformed or partial dicts raise, and a refused load changes nothing."""

import json

import pytest
import torch

from dropgrad_dist import DropGrad, DropGradHookState, LinearDropRateScheduler

from ..nets import Net, seeded_net


def _trained(steps: int = 2, **kwargs) -> tuple[Net, DropGrad]:
    model = seeded_net()
    opt = DropGrad(torch.optim.Adam(model.parameters(), lr=1e-2), model=model, **kwargs)
    for step in range(steps):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _snapshot(opt: DropGrad) -> tuple:
    scheduler = opt.drop_rate_scheduler
    inner = {k: v.clone() for state in opt.optimizer.state.values() for k, v in state.items() if torch.is_tensor(v)}
    return (opt.seed, opt.step_index, scheduler.step_count if scheduler else None,
            json.dumps(opt.own_state_dict()), sorted((k, v.sum().item()) for k, v in inner.items()))


SCHEDULE = dict(drop_rate_scheduler=LinearDropRateScheduler(0.5, 0.1, 10))


@pytest.mark.parametrize("saved_kwargs, loaded_kwargs, message", [
    (dict(drop_rate=0.3), SCHEDULE, "drop_rate_scheduler: checkpoint None, this run \\['LinearDropRateScheduler'"),
    (SCHEDULE, dict(drop_rate=0.3), "different configuration \\(drop_rate: checkpoint None, this run 0.3"),
    (dict(drop_rate=0.3, seed=1), dict(drop_rate=0.3, seed=2), "seed: checkpoint 1, this run 2"),
    (dict(drop_rate=0.3), dict(drop_rate=0.4), "drop_rate: checkpoint 0.3, this run 0.4"),
    (dict(drop_rate=0.3), dict(drop_rate=0.3, params={"decoder": 0.0}), "params: checkpoint"),
])
def test_a_checkpoint_with_another_configuration_is_refused_and_changes_nothing(saved_kwargs, loaded_kwargs, message):
    _, saved = _trained(3, **saved_kwargs)
    state = saved.state_dict()
    _, target = _trained(1, **loaded_kwargs)
    before = _snapshot(target)
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(state)
    assert _snapshot(target) == before


def test_strict_false_keeps_this_runs_configuration_and_takes_the_progress():
    _, saved = _trained(3, drop_rate=0.3, seed=1)
    _, target = _trained(1, drop_rate=0.3, seed=2)
    with pytest.warns(RuntimeWarning, match="keeping this run's configuration"):
        target.load_state_dict(saved.state_dict(), strict=False)
    assert target.seed == 2 and target.step_index == 3


def test_a_bare_optimizer_state_dict_is_refused_unless_strict_false():
    _, saved = _trained(3, drop_rate=0.3)
    _, target = _trained(1, drop_rate=0.3)
    bare = saved.optimizer.state_dict()
    with pytest.raises(ValueError, match="no 'dropgrad' entry"):
        target.load_state_dict(bare)
    assert target.step_index == 1
    with pytest.warns(RuntimeWarning, match="masks restart at step 0"):
        target.load_state_dict(bare, strict=False)
    assert target.step_index == 1  # the wrapped optimizer loaded; DropGrad's step count unknown, untouched


@pytest.mark.parametrize("field, value, message", [
    ("step_index", 3.0, "field 'step_index' must be an int"),
    ("step_index", -1, "field 'step_index' must be an int"),
    ("step_index", True, "field 'step_index' must be an int"),
    ("step_index", None, "field 'step_index' must be an int"),
    ("scheduler", {"step_count": 2.5}, "field 'step_count' must be an int"),
    ("scheduler", {}, "has no 'step_count' field"),
])
def test_malformed_fields_raise_and_loading_is_atomic(field, value, message):
    _, saved = _trained(3, **SCHEDULE, seed=5)
    state = saved.state_dict()
    state["dropgrad"][field] = value
    _, target = _trained(1, **SCHEDULE, seed=5)
    before = _snapshot(target)
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(state)
    assert _snapshot(target) == before


def test_a_partial_dict_changes_nothing():
    _, target = _trained(1, drop_rate=0.3, seed=5)
    before = _snapshot(target)
    with pytest.raises(ValueError, match="has no 'step_index' field"):
        target.load_dropgrad_state_dict({"config": {"seed": 5}})
    assert _snapshot(target) == before


def test_hook_state_follows_the_same_checkpoint_rules():
    model = seeded_net()
    state = DropGradHookState(model, 0.3, seed=1)
    state.step_index = 7
    saved = state.state_dict()
    assert json.loads(json.dumps(saved)) == saved  # plain data
    other = DropGradHookState(seeded_net(), 0.3, seed=2)
    with pytest.raises(ValueError, match="seed: checkpoint 1, this run 2"):
        other.load_state_dict(saved)
    assert other.step_index == 0
    compact = DropGradHookState(seeded_net(), 0.3, seed=1, communication="compact")
    with pytest.raises(ValueError, match="communication: checkpoint 'dense', this run 'compact'"):
        compact.load_state_dict(saved)
    saved["step_index"] = 7.0
    same = DropGradHookState(seeded_net(), 0.3, seed=1)
    with pytest.raises(ValueError, match="field 'step_index' must be an int"):
        same.load_state_dict(saved)
    assert same.step_index == 0
    same.load_state_dict(state.state_dict())
    assert same.step_index == 7


@pytest.mark.parametrize("owner", ["DropGrad", "DropGradHookState"])
def test_schedule_presence_mismatch_raises_or_warns_alike_in_wrapper_and_hook(owner):
    def build(scheduler):
        model = seeded_net()
        rate = 0.1 if scheduler is None else None
        if owner == "DropGrad":
            return DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), rate, model=model,
                            drop_rate_scheduler=scheduler)
        return DropGradHookState(model, rate, drop_rate_scheduler=scheduler)

    def schedule():
        return LinearDropRateScheduler(0.1, 0.5, 10)

    saved = build(schedule()).state_dict()
    plain = build(None)
    with pytest.raises(ValueError, match=r"drop_rate_scheduler: checkpoint \['LinearDropRateScheduler"):
        plain.load_state_dict(saved)
    with pytest.warns(RuntimeWarning, match="the schedule keeps its position"):
        plain.load_state_dict(saved, strict=False)
    scheduled = build(schedule())
    scheduled.drop_rate_scheduler.step() if owner == "DropGrad" else scheduled.plan.scheduler.step()
    without = build(None).state_dict()
    with pytest.raises(ValueError, match="drop_rate_scheduler: checkpoint None"):
        scheduled.load_state_dict(without)
    with pytest.warns(RuntimeWarning, match="the schedule keeps its position"):
        scheduled.load_state_dict(without, strict=False)
    assert (scheduled.drop_rate_scheduler if owner == "DropGrad" else scheduled.plan.scheduler).step_count == 1
