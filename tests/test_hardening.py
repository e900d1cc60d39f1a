"""One-process hardening: checkpoint rules, atomic loads, closures, assignable rates, refusals."""

import json
import os
import pickle

import pytest
import torch
from torch import nn

from dropgrad_dist import DropGrad, DropGradHookState, LinearDropRateScheduler, keep_mask, prepare_dropgrad

from .nets import Net, seeded_net


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


def test_closure_optimizers_mask_every_evaluation():
    """LBFGS evaluates the closure several times per step; each gradient gets the step's mask."""
    def closure_for(model, opt, masked_by_hand):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))

        def closure():
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            if masked_by_hand:
                for name, param in model.named_parameters():
                    keep = keep_mask(param.numel(), seed=4, step=0, key=name, rate=0.5).view_as(param)
                    param.grad.mul_(torch.where(keep, 2.0, 0.0))
            return loss
        return closure

    model, reference = seeded_net(), seeded_net()
    opt = DropGrad(torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5), drop_rate=0.5, model=model, seed=4)
    ref_opt = torch.optim.LBFGS(reference.parameters(), lr=0.5, max_iter=5)
    loss = opt.step(closure_for(model, opt, False))
    ref_loss = ref_opt.step(closure_for(reference, ref_opt, True))
    assert torch.equal(loss, ref_loss) and opt.step_index == 1
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_sparse_gradients_are_refused_clearly_and_complex_ones_are_masked_per_number():
    embedding = nn.Embedding(10, 4, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    opt = DropGrad(torch.optim.SGD(embedding.parameters(), lr=0.1), drop_rate=0.5, model=embedding)
    with pytest.raises(ValueError, match="does not support sparse gradients"):
        opt.step()
    weight = nn.Parameter(torch.randn(3, 5, dtype=torch.complex64))
    holder = nn.Module()
    holder.weight = weight
    weight.grad = torch.randn(3, 5, dtype=torch.complex64)
    grad = weight.grad.clone()
    DropGrad(torch.optim.SGD([weight], lr=1.0), drop_rate=0.5, model=holder, seed=2).mask_gradients_()
    keep = keep_mask(15, seed=2, step=0, key="weight", rate=0.5).view(3, 5)
    assert torch.equal(weight.grad, torch.where(keep, grad * 2.0, 0.0))


def test_schedulers_without_checkpoint_support_are_refused_up_front():
    class RateOnly:
        def get_drop_rate(self) -> float:
            return 0.1

        def step(self) -> None:
            pass

    model = seeded_net()
    with pytest.raises(ValueError, match="RateOnly lacks state_dict, load_state_dict"):
        DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate_scheduler=RateOnly(), model=model)


def _accelerated(**kwargs):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    handle = prepare_dropgrad(accelerator, model, optimizer, drop_rate=0.25, seed=7, **kwargs)
    return accelerator, model, optimizer, handle


class _Payload:
    """Unpickling this creates a marker file: proof that a checkpoint ran code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_accelerate_checkpoints_hold_no_pickle_and_a_tampered_file_runs_nothing(tmp_path):
    accelerator, model, optimizer, handle = _accelerated()
    for _ in range(2):
        accelerator.backward(model(torch.randn(5, 4)).square().mean())
        optimizer.step()
        optimizer.zero_grad()
    accelerator.save_state(str(tmp_path / "ckpt"))
    written = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    ours = [name for name in written if name.startswith("dropgrad_dist")]
    assert ours == ["dropgrad_dist_state_0.json"] and not any("custom_checkpoint" in n for n in written)
    state = json.loads((tmp_path / "ckpt" / ours[0]).read_text())
    assert state["dropgrad"]["step_index"] == 2 and state["dropgrad"]["config"]["seed"] == 7

    handle.target.step_index = 0
    accelerator.load_state(str(tmp_path / "ckpt"))
    assert handle.step_index == 2
    marker = tmp_path / "pwned"
    for name in ours:  # every file DropGrad writes
        (tmp_path / "ckpt" / name).write_bytes(pickle.dumps(_Payload(str(marker))))
        with pytest.raises(ValueError, match="is not a JSON checkpoint"):
            accelerator.load_state(str(tmp_path / "ckpt"))
        assert not marker.exists()


def test_prepare_dropgrad_validates_communication_in_every_setup():
    with pytest.raises(ValueError, match="communication must be 'dense' or 'compact', got 'bogus'"):
        _accelerated(communication="bogus")


def test_accelerate_load_refuses_another_configuration_unless_told(tmp_path):
    accelerator, model, optimizer, handle = _accelerated()
    accelerator.save_state(str(tmp_path / "ckpt"))
    path = tmp_path / "ckpt" / "dropgrad_dist_state_0.json"
    state = json.loads(path.read_text())
    state["dropgrad"]["config"]["seed"] = 8
    state["dropgrad"]["step_index"] = 5
    path.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="seed: checkpoint 8, this run 7"):
        accelerator.load_state(str(tmp_path / "ckpt"))
    assert handle.step_index == 0
    handle.strict_load = False
    with pytest.warns(RuntimeWarning):
        accelerator.load_state(str(tmp_path / "ckpt"))
    assert handle.step_index == 5 and handle.target.seed == 7
    assert os.path.exists(path)
