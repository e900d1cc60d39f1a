"""The DropGrad optimizer wrapper on a single process."""

import math
import warnings

import pytest
import torch
from torch import nn

from dropgrad_dist import DropGrad, LinearDropRateScheduler, StepDropRateScheduler, keep_mask
from dropgrad_dist.mask import MaskStream

from ..nets import seeded_net


def _batch(step: int):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)


def _train(model, opt, steps, start=0, scaler=None):
    for step in range(start, start + steps):
        x, y = _batch(step)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _grads_after_backward(model, step=0):
    x, y = _batch(step)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_step_applies_the_engine_mask_and_rescales():
    model = seeded_net()
    grads = _grads_after_backward(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=1.0), drop_rate=0.4, seed=5, model=model)
    opt.step()
    for name, param in model.named_parameters():
        keep = keep_mask(param.numel(), seed=5, step=0, key=name, rate=0.4).view_as(param)
        want = before[name] - torch.where(keep, grads[name] * torch.tensor(1 / 0.6), 0.0)
        assert torch.equal(param.detach(), want), name
    assert opt.step_index == 1


def test_drop_rate_zero_is_bitwise_identical_to_the_bare_optimizer():
    bare, wrapped = seeded_net(), seeded_net()
    _train(bare, torch.optim.Adam(bare.parameters(), lr=1e-2), 5)
    _train(wrapped, DropGrad(torch.optim.Adam(wrapped.parameters(), lr=1e-2), drop_rate=0.0), 5)
    for a, b in zip(_params(bare), _params(wrapped)):
        assert torch.equal(a, b)


def test_drop_rate_one_zeroes_every_gradient_without_nan():
    model = seeded_net()
    before = _params(model)
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=1.0)
    _train(model, opt, 3)
    for a, b in zip(before, _params(model)):
        assert torch.equal(a, b)
    adam_model = seeded_net()
    _train(adam_model, DropGrad(torch.optim.Adam(adam_model.parameters()), drop_rate=1.0), 3)
    assert all(torch.isfinite(p).all() for p in adam_model.parameters())


def test_per_parameter_rates_by_parameter_name_module_and_glob():
    model = seeded_net()
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=1.0), drop_rate=0.25,
                   params={"*.bias": 0.0, "encoder": 0.5, model.decoder.weight: 0.75}, model=model)
    rates = {entry.key: opt.plan.rate_of(entry) for entry in opt.plan.entries}
    # the first matching entry wins: "*.bias" comes before "encoder"
    assert rates == {"encoder.weight": 0.5, "encoder.bias": 0.0, "decoder.weight": 0.75, "decoder.bias": 0.0}


def test_seed_dict_form_leaves_unlisted_parameters_untouched():
    model = seeded_net()
    weights = {p: 0.5 for n, p in model.named_parameters() if "weight" in n}
    grads = _grads_after_backward(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=1.0), drop_rate=None, params=weights)
    opt.step()
    for name in ("encoder.bias", "decoder.bias"):
        param = dict(model.named_parameters())[name]
        assert torch.equal(param.detach(), before[name] - grads[name])
    # DropGrad 0.1 documents the dict passed as drop_rate=
    assert len(DropGrad(torch.optim.SGD(model.parameters(), lr=1.0), drop_rate=weights).plan.entries) == 2


def test_keys_are_canonical_names_so_wrapped_models_mask_alike():
    plain = seeded_net()
    compiled = torch.compile(seeded_net())  # parameter names gain "_orig_mod."
    wrapped = nn.DataParallel(seeded_net())  # a leading "module." as DDP adds it
    both = torch.compile(nn.DataParallel(seeded_net()))
    keys = [
        [e.key for e in DropGrad(torch.optim.SGD(m.parameters(), lr=1.0), drop_rate=0.1, model=m).plan.entries]
        for m in (plain, compiled, wrapped, both)
    ]
    assert keys[0] == keys[1] == keys[2] == keys[3] == [
        "encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"]
    # A rate may name a parameter as the wrapped model does, or by its canonical name.
    by_raw = DropGrad(torch.optim.SGD(wrapped.parameters(), lr=1.0), params={"module.encoder": 0.3}, model=wrapped)
    assert [(e.key, e.fixed_rate) for e in by_raw.plan.entries] == [("encoder.weight", 0.3), ("encoder.bias", 0.3)]


def test_mask_keys_are_unique_per_model():
    class OwnModuleAttribute(nn.Module):
        """A top-level attribute named `module` and a parameter of its own: not a DDP wrapper."""

        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(2, 2, bias=False)
            self.weight = nn.Parameter(torch.ones(2, 2))

    model = OwnModuleAttribute()
    plan = DropGrad(torch.optim.SGD(model.parameters(), lr=1.0), drop_rate=0.5, model=model).plan
    keys = [e.key for e in plan.entries]
    assert keys == ["weight", "module.weight"]  # own parameters first, as named_parameters() lists them

    class Colliding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Module()
            self.block.weight = nn.Parameter(torch.ones(2))
            self.block._checkpoint_wrapped_module = nn.Module()  # a wrapper segment is dropped from keys
            self.block._checkpoint_wrapped_module.weight = nn.Parameter(torch.ones(2))

    model = Colliding()
    with pytest.raises(ValueError, match="parameters 'block.weight' and 'block._checkpoint_wrapped_module.weight' "
                                         "would share the mask key 'block.weight'"):
        DropGrad(torch.optim.SGD(model.parameters(), lr=1.0), drop_rate=0.5, model=model)


def test_without_model_keys_are_positions_in_param_groups():
    model = seeded_net()
    groups = [{"params": [model.encoder.weight, model.encoder.bias]},
              {"params": [model.decoder.weight, model.decoder.bias], "lr": 0.5}]
    opt = DropGrad(torch.optim.SGD(groups, lr=1.0), drop_rate=0.1)
    assert [e.key for e in opt.plan.entries] == [
        "param_groups[0][0]", "param_groups[0][1]", "param_groups[1][0]", "param_groups[1][1]"]


def test_non_contiguous_gradients_are_masked_by_logical_index():
    conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    conv(torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)).sum().backward()
    grad = conv.weight.grad.clone()
    assert not grad.is_contiguous()
    before = conv.weight.detach().clone()
    DropGrad(torch.optim.SGD(conv.parameters(), lr=1.0), drop_rate=0.5, model=conv).step()
    keep = keep_mask(grad.numel(), seed=0, step=0, key="weight", rate=0.5).view(grad.shape)
    assert torch.equal(conv.weight.detach(), before - torch.where(keep, grad * 2.0, 0.0))


@pytest.mark.parametrize("kwargs, message", [
    (dict(drop_rate=1.5), "drop_rate must be a number in \\[0, 1\\]"),
    (dict(drop_rate=float("nan")), "drop_rate must be a number in \\[0, 1\\]"),
    (dict(drop_rate="0.1"), "drop_rate must be a number in \\[0, 1\\]"),
    (dict(), "no drop rate given"),
    (dict(params={"nothing.*": 0.1}, use_model=True), "'nothing.\\*' matches no parameter"),
    (dict(params={"encoder.weight": 0.1}), "need model="),
    (dict(params={"encoder.*": -0.1}, use_model=True), "params\\['encoder.\\*'\\] must be a number"),
    (dict(drop_rate=0.1, drop_rate_scheduler=LinearDropRateScheduler(0.1, 0, 5)), "either drop_rate or"),
    (dict(drop_rate_scheduler=0.3), "drop_rate_scheduler must have get_drop_rate"),
    (dict(drop_rate=0.1, step_skip_rate=2), "step_skip_rate must be a number in \\[0, 1\\]"),
    (dict(drop_rate=0.1, seed="x"), "seed must be an int"),
    (dict(drop_rate=0.1, seed=1 << 64), "seed must be an int in \\[0, 18446744073709551616\\)"),
    (dict(drop_rate=0.1, seed=-1), "seed must be an int in"),
    (dict(params={"encoder": 0.2, "encoder.weight": 0.9}, use_model=True),
     "'encoder.weight' is shadowed by the earlier entry 'encoder', which already gives the rate of 'encoder.weight'"),
])
def test_bad_arguments_raise_value_errors_naming_them(kwargs, message):
    model = seeded_net()
    model_arg = {"model": model} if kwargs.pop("use_model", False) else {}
    with pytest.raises(ValueError, match=message):
        DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs, **model_arg)


def test_non_optimizer_is_rejected():
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        DropGrad(seeded_net(), drop_rate=0.1)


def test_scheduler_advances_once_per_step_and_drives_the_rate():
    model = seeded_net()
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1),
                   drop_rate_scheduler=StepDropRateScheduler(0.5, {2: 0.1}))
    seen = []
    for step in range(4):
        seen.append(opt.drop_rate)
        _train(model, opt, 1, start=step)
    assert seen == [0.5, 0.5, 0.1, 0.1]
    assert opt.drop_rate_scheduler.step_count == 4


def test_lr_schedulers_on_wrapper_or_wrapped_optimizer_work_without_warnings():
    for attach_to_wrapper in (True, False):
        model = seeded_net()
        inner = torch.optim.SGD(model.parameters(), lr=1.0)
        opt = DropGrad(inner, drop_rate=0.1)
        lr_sched = torch.optim.lr_scheduler.StepLR(opt if attach_to_wrapper else inner, step_size=1, gamma=0.5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for step in range(3):
                _train(model, opt, 1, start=step)
                lr_sched.step()
        assert inner.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.125


def test_grad_scaler_steps_and_still_skips_overflowing_steps():
    model = seeded_net()
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate_scheduler=LinearDropRateScheduler(0.5, 0, 10))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    _train(model, opt, 2, scaler=scaler)
    assert opt.step_index == 2
    before = _params(model)
    x, y = _batch(9)
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    scaler.scale(loss).backward()
    model.encoder.weight.grad[0, 0] = float("inf")  # overflow on a coordinate the mask may drop
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    for a, b in zip(before, _params(model)):
        assert torch.equal(a, b)
    assert opt.step_index == 2 and opt.drop_rate_scheduler.step_count == 2
    assert scaler.get_scale() == 2.0 ** 9


def test_full_update_drop_keeps_dropped_coordinates_and_rescales_kept_updates():
    model = seeded_net()
    grads = _grads_after_backward(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.5), drop_rate=0.3, full_update_drop=True,
                   seed=2, model=model)
    opt.step()
    update_masks, grad_masks = [], []
    for name, param in model.named_parameters():
        keep = keep_mask(param.numel(), seed=2, step=0, key=name, rate=0.3,
                         stream=MaskStream.UPDATE).view_as(param)
        update_masks.append(keep.flatten())
        grad_masks.append(keep_mask(param.numel(), seed=2, step=0, key=name, rate=0.3))
        assert torch.equal(param.detach()[~keep], before[name][~keep])
        update = -0.5 * grads[name]
        torch.testing.assert_close(param.detach()[keep], (before[name] + update / 0.7)[keep])
    # a different stream than the gradient mask (equal by chance with probability ~1e-16)
    assert not torch.equal(torch.cat(update_masks), torch.cat(grad_masks))


def test_step_skip_rate_skips_whole_steps_by_seed_and_step():
    model = seeded_net()
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.0, step_skip_rate=1.0)
    before = _params(model)
    _train(model, opt, 3)
    assert all(torch.equal(a, b) for a, b in zip(before, _params(model)))
    assert opt.step_index == 3 and opt.last_step_skipped
    half = DropGrad(torch.optim.SGD(seeded_net().parameters(), lr=0.1), drop_rate=0.0, step_skip_rate=0.5, seed=9)
    decisions = [half.should_skip_step(t) for t in range(400)]
    assert abs(sum(decisions) - 200) < 4 * math.sqrt(100)
    again = DropGrad(torch.optim.SGD(seeded_net().parameters(), lr=0.1), drop_rate=0.0, step_skip_rate=0.5, seed=9)
    assert decisions == [again.should_skip_step(t) for t in range(400)]


def test_resume_from_checkpoint_gives_bitwise_identical_training(tmp_path):
    def make():
        model = seeded_net()
        opt = DropGrad(torch.optim.Adam(model.parameters(), lr=1e-2), seed=4, model=model,
                       drop_rate_scheduler=LinearDropRateScheduler(0.6, 0.1, 6))
        return model, opt

    model, opt = make()
    _train(model, opt, 8)
    uninterrupted = _params(model)

    model, opt = make()
    _train(model, opt, 4)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    model, opt = make()
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    assert opt.step_index == 4 and opt.drop_rate_scheduler.step_count == 4
    _train(model, opt, 4, start=4)
    for a, b in zip(uninterrupted, _params(model)):
        assert torch.equal(a, b)


def test_accelerate_prepare_accepts_the_wrapper():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = seeded_net()
    reference = seeded_net()
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.5, model=model)
    ref_opt = DropGrad(torch.optim.SGD(reference.parameters(), lr=0.1), drop_rate=0.5, model=reference)
    prepared_model, prepared_opt = accelerator.prepare(model, opt)
    for step in range(3):
        x, y = _batch(step)
        prepared_opt.zero_grad()
        accelerator.backward(nn.functional.cross_entropy(prepared_model(x), y))
        prepared_opt.step()
    _train(reference, ref_opt, 3)
    assert opt.step_index == 3
    for a, b in zip(_params(reference), _params(model)):
        assert torch.equal(a, b)
    assert prepared_opt.state_dict()["dropgrad"]["step_index"] == 3


def test_masking_before_clipping_masks_once():
    """mask_gradients_() then in-place clipping then step(): the clipped masked gradient is stepped."""
    model = seeded_net()
    grads = _grads_after_backward(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=1.0), drop_rate=0.5, seed=1, model=model)
    opt.mask_gradients_()
    opt.mask_gradients_()  # idempotent within a step
    masked = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.01)
    opt.step()
    for name, param in model.named_parameters():
        keep = keep_mask(param.numel(), seed=1, step=0, key=name, rate=0.5).view_as(param)
        assert torch.equal(masked[name], torch.where(keep, grads[name] * 2.0, 0.0))
        torch.testing.assert_close(param.detach(), before[name] - masked[name] * (0.01 / (norm + 1e-6)))


def test_dropgrad_inside_accelerated_optimizer_with_grad_scaler():
    """prepare_dropgrad's wrapper mode under a GradScaler: masks applied, overflow skips the step."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from dropgrad_dist.integrations.accelerate import _install_step_chain

    Accelerator(cpu=True)  # AcceleratedOptimizer reads the global Accelerate state
    model, reference = seeded_net(), seeded_net()
    accelerated = AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    dropgrad = DropGrad(accelerated.optimizer, drop_rate=0.5, model=model, seed=3)
    _install_step_chain(accelerated, dropgrad)
    ref_opt = DropGrad(torch.optim.SGD(reference.parameters(), lr=0.1), drop_rate=0.5, model=reference, seed=3)
    for step in range(3):
        x, y = _batch(step)
        accelerated.zero_grad()
        accelerated.scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        accelerated.step()
        assert not accelerated.step_was_skipped
    _train(reference, ref_opt, 3)
    assert dropgrad.step_index == 3
    for a, b in zip(_params(reference), _params(model)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)  # scaled by 2**10 and back: exact up to rounding
    before = _params(model)
    x, y = _batch(7)
    accelerated.zero_grad()
    accelerated.scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    model.decoder.bias.grad[0] = float("nan")
    accelerated.step()
    assert accelerated.step_was_skipped and dropgrad.step_index == 3
    assert all(torch.equal(a, b) for a, b in zip(before, _params(model)))
