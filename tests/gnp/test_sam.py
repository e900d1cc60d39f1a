"""SAM/GNP in one process: davda54/sam's documented loops, ASAM, BatchNorm statistics, RNG replay,
the normalized mix, periodic steps, edge values, and the union of both passes' gradients."""

import pytest
import torch
from torch import nn

from dropgrad_dist import SAM, GradientNormPenalty
from dropgrad_dist.mask import MaskStream, keep_threshold, key_hash, uniform_u32

from ..nets import seeded_net

STEPS = 6


def _data(steps: int = STEPS, n: int = 16):
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(n, 6, generator=gen), torch.randn(n, 3, generator=gen)) for _ in range(steps)]


loss_function = nn.functional.mse_loss


# -- davda54/sam's README loops, written from its documentation; only the import differs --------------
def readme_two_step_loop(SAM, model, data, **kwargs):  # noqa: N803 (the README's name)
    base_optimizer = torch.optim.SGD  # define an optimizer for the "sharpness-aware" update
    optimizer = SAM(model.parameters(), base_optimizer, lr=0.1, momentum=0.9, **kwargs)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer.base_optimizer, T_max=200)
    for input, output in data:
        # first forward-backward pass
        loss = loss_function(output, model(input))  # use this loss for any training statistics
        loss.backward()
        optimizer.first_step(zero_grad=True)
        # second forward-backward pass
        loss_function(output, model(input)).backward()  # make sure to do a full forward pass
        optimizer.second_step(zero_grad=True)
        scheduler.step()
    return optimizer


def readme_closure_loop(SAM, model, data, **kwargs):  # noqa: N803
    base_optimizer = torch.optim.SGD
    optimizer = SAM(model.parameters(), base_optimizer, lr=0.1, momentum=0.9, **kwargs)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer.base_optimizer, T_max=200)
    for input, output in data:
        def closure():
            loss = loss_function(output, model(input))
            loss.backward()
            return loss

        loss = loss_function(output, model(input))
        loss.backward()
        optimizer.step(closure)
        optimizer.zero_grad()
        scheduler.step()
    return optimizer


def davda54_reference(model, data, rho=0.05, adaptive=False):
    """davda54/sam's algorithm by hand: e = rho T^2 g / (||T g|| + 1e-12), T = |w| (adaptive) or 1."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=200)
    params = list(model.parameters())
    for x, y in data:
        g1 = torch.autograd.grad(loss_function(y, model(x)), params)
        scales = [p.detach().abs() if adaptive else torch.ones_like(p) for p in params]
        norm = torch.sqrt(sum((t * g).square().sum() for t, g in zip(scales, g1)))
        old = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, t, g in zip(params, scales, g1):
                p.add_(t * t * g * rho / (norm + 1e-12))
        g2 = torch.autograd.grad(loss_function(y, model(x)), params)
        with torch.no_grad():
            for p, o, g in zip(params, old, g2):
                p.copy_(o)
                p.grad = g
        opt.step()
        scheduler.step()
    return [p.detach() for p in params]


class Counting(nn.Module):
    """seeded_net() that counts its forward passes."""

    def __init__(self):
        super().__init__()
        self.net, self.calls = seeded_net(), 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


@pytest.mark.parametrize("loop", [readme_two_step_loop, readme_closure_loop])
@pytest.mark.parametrize("adaptive, rho", [(False, 0.05), (True, 0.5)])
def test_davda54_readme_loops_match_its_algorithm(loop, adaptive, rho):
    model = Counting()
    data = _data()
    optimizer = loop(SAM, model, data, rho=rho, adaptive=adaptive)
    want = davda54_reference(seeded_net(), data, rho=rho, adaptive=adaptive)
    for got, expected in zip(model.parameters(), want):
        torch.testing.assert_close(got.detach(), expected, rtol=1e-6, atol=1e-7)
    assert model.calls == 2 * STEPS  # two passes per step, whichever form
    assert optimizer.param_groups[0]["rho"] == rho and optimizer.param_groups[0]["adaptive"] is adaptive
    assert isinstance(optimizer.base_optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["lr"] == optimizer.base_optimizer.param_groups[0]["lr"] < 0.1  # scheduled
    assert optimizer.step_index == STEPS


def test_asam_differs_from_sam_and_our_form_matches_davda54_form():
    data = _data()
    sam, asam = seeded_net(), seeded_net()
    readme_closure_loop(SAM, sam, data, rho=0.5)
    readme_closure_loop(SAM, asam, data, rho=0.5, adaptive=True)
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(sam.parameters(), asam.parameters()))
    ours = seeded_net()
    opt = SAM(torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9), rho=0.5, adaptive=True, model=ours)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=200)
    for x, y in data:
        def closure():
            loss = loss_function(y, ours(x))
            loss.backward()
            return loss
        opt.step(closure)
        scheduler.step()
    for a, b in zip(ours.parameters(), asam.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_param_group_rho_is_read_every_step_and_zero_is_a_plain_step():
    data = _data(2)
    changed, direct = seeded_net(), seeded_net()
    opt = SAM(changed.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    opt.param_groups[0]["rho"] = 0.2
    other = SAM(direct.parameters(), torch.optim.SGD, rho=0.2, lr=0.1)
    for o, m in ((opt, changed), (other, direct)):
        for x, y in data:
            loss_function(y, m(x)).backward()
            o.first_step(zero_grad=True)
            loss_function(y, m(x)).backward()
            o.second_step(zero_grad=True)
    assert all(torch.equal(a, b) for a, b in zip(changed.parameters(), direct.parameters()))
    opt.param_groups[0]["rho"] = 0.0
    assert not opt.penalizes()
    opt.param_groups[0]["rho"] = -1.0
    with pytest.raises(ValueError, match=r"param_groups\[i\]\['rho'\] must be a finite number >= 0"):
        opt.penalizes()


def test_constructor_forms_refuse_mixed_arguments():
    model = seeded_net()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    assert SAM(sgd, 0.1).r == 0.1  # our form, rho positional
    with pytest.raises(TypeError, match="base_optimizer= is for SAM\\(params, base_optimizer_cls"):
        SAM(sgd, torch.optim.SGD)
    with pytest.raises(TypeError, match="unknown keyword\\(s\\) \\['lr'\\]"):
        SAM(sgd, rho=0.1, lr=0.1)
    with pytest.raises(TypeError, match="base_optimizer must be an optimizer class"):
        SAM(model.parameters(), "sgd")
    with pytest.raises(TypeError, match="adaptive must be True or False"):
        SAM(model.parameters(), torch.optim.SGD, adaptive=1, lr=0.1)
    two_step = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="second_step needs a first_step"):
        two_step.second_step()


def test_two_step_form_under_grad_scaler_skips_a_non_finite_first_pass():
    model = seeded_net()
    theta = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    (x, y), = _data(1)
    scaler.scale(loss_function(y, model(x)) * float("inf")).backward()
    opt.first_step(zero_grad=True)
    scaler.scale(loss_function(y, model(x))).backward()
    opt.second_step(zero_grad=True, scaler=scaler)
    scaler.update()
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta))
    assert opt.step_index == 0 and scaler.get_scale() < 2.0 ** 12
    scaler.scale(loss_function(y, model(x))).backward()  # a finite step runs, unscaled like the plain one
    opt.first_step(zero_grad=True)
    scaler.scale(loss_function(y, model(x))).backward()
    opt.second_step(zero_grad=True, scaler=scaler)
    want = davda54_reference(seeded_net(), [(x, y)], rho=0.05)
    for got, expected in zip(model.parameters(), want):  # the reference's cosine LR is 0.1 at its first step
        torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-7)


# -- BatchNorm running statistics ---------------------------------------------------------------------
def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


@pytest.mark.parametrize("keep", [True, False])
def test_second_pass_leaves_batch_norm_statistics_as_the_first_pass_left_them(keep):
    model, plain = _bn_net(), _bn_net()
    (x, y), = _data(1)
    opt = GradientNormPenalty(torch.optim.SGD(model.parameters(), lr=0.1), alpha=0.7, r=0.1, model=model,
                              bn_stats_from_first_pass=keep)

    def closure():
        loss = loss_function(y, model(x))
        loss.backward()
        return loss

    opt.step(closure)
    plain(x)  # a plain step's forward: one update of the running statistics
    bn, want = model[1], plain[1]
    assert int(bn.num_batches_tracked) == (1 if keep else 2)
    assert torch.equal(bn.running_mean, want.running_mean) == keep
    assert torch.equal(bn.running_var, want.running_var) == keep


# -- RNG replay -----------------------------------------------------------------------------------------
def _dropout_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Dropout(0.5), nn.Linear(32, 3))


@pytest.mark.parametrize("replay", [True, False])
def test_second_pass_sees_the_first_pass_dropout_masks_and_the_stream_continues_as_after_one_pass(replay):
    model = _dropout_net()
    masks = []
    model[2].register_forward_hook(lambda module, inputs, output: masks.append(output == 0))
    (x, y), = _data(1)
    opt = GradientNormPenalty(torch.optim.SGD(model.parameters(), lr=0.1), alpha=0.8, r=0.1, model=model,
                              replay_rng=replay)

    def closure():
        loss = loss_function(y, model(x))
        loss.backward()
        return loss

    torch.manual_seed(123)
    opt.step(closure)
    after_step = torch.get_rng_state()
    assert len(masks) == 2 and masks[0].any()
    assert torch.equal(masks[0], masks[1]) == replay
    plain = _dropout_net()
    torch.manual_seed(123)
    loss_function(y, plain(x)).backward()  # one plain forward/backward from the same state
    assert torch.equal(after_step, torch.get_rng_state()) == replay


# -- the normalized mix -----------------------------------------------------------------------------------
def _closure(model, x, y):
    def closure():
        loss = loss_function(y, model(x))
        loss.backward()
        return loss
    return closure


def test_normalized_mix_is_the_reference_formula_and_scale_free_under_grad_scaler():
    model, scaled_model = seeded_net(), seeded_net()
    (x, y), = _data(1)
    reference = seeded_net()
    params = list(reference.parameters())
    g1 = torch.autograd.grad(loss_function(y, reference(x)), params)
    norm = torch.sqrt(sum(g.square().sum() for g in g1))
    with torch.no_grad():
        for p, g in zip(params, g1):
            p.add_(g * (0.1 / norm))
    g2 = torch.autograd.grad(loss_function(y, reference(x)), params)
    want = [0.2 * a / norm + 0.8 * b for a, b in zip(g1, g2)]
    raw = [0.2 * a + 0.8 * b for a, b in zip(g1, g2)]
    opt = GradientNormPenalty(torch.optim.SGD(model.parameters(), lr=0.0), alpha=0.8, r=0.1, mix="normalized")
    opt.step(_closure(model, x, y))
    for p, expected in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-7)
    assert any((p.grad - other).abs().max() > 1e-3 for p, other in zip(model.parameters(), raw))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaled = GradientNormPenalty(torch.optim.SGD(scaled_model.parameters(), lr=0.0), alpha=0.8, r=0.1,
                                 mix="normalized")

    def scaled_closure():
        loss = loss_function(y, scaled_model(x))
        scaler.scale(loss).backward()
        return loss

    scaled.step(scaled_closure, scaler=scaler)
    for p, expected in zip(scaled_model.parameters(), want):  # unscaled by scaler.step
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-7)


# -- periodic and probabilistic steps --------------------------------------------------------------------
def _run_counting(opt, model, steps, start=0):
    passes = []
    for t in range(start, start + steps):
        x, y = _data(1)[0]
        calls = []

        def closure():
            calls.append(1)
            return _closure(model, x * (t + 1), y)()

        opt.step(closure)
        passes.append(len(calls))
    return passes


def test_every_k_runs_the_two_pass_step_on_multiples_of_k():
    model = seeded_net()
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.01), rho=0.05, every=3)
    assert _run_counting(opt, model, 7) == [2, 1, 1, 2, 1, 1, 2]
    assert opt.penalty_steps == 3 and opt.step_index == 7


def test_probability_is_a_draw_of_seed_and_step_and_resumes_from_the_checkpoint():
    def make():
        model = seeded_net()
        return model, GradientNormPenalty(torch.optim.SGD(model.parameters(), lr=0.01), alpha=0.5, r=0.05,
                                          probability=0.5, seed=11)

    expected = [uniform_u32(11, t, MaskStream.SKIP, key=key_hash("gradient_norm_penalty.every"))
                < keep_threshold(0.5) for t in range(12)]
    model, opt = make()
    torch.manual_seed(0)
    whole = _run_counting(opt, model, 12)
    assert whole == [2 if e else 1 for e in expected] and 1 in whole and 2 in whole
    assert opt.penalty_steps == sum(expected)
    want = [p.detach().clone() for p in model.parameters()]
    model, opt = make()
    torch.manual_seed(99)  # the global RNG plays no part
    first = _run_counting(opt, model, 5)
    saved = {"model": model.state_dict(), "opt": opt.state_dict()}
    assert saved["opt"]["gnp"]["penalty_steps"] == sum(expected[:5])
    model, opt = make()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    assert first + _run_counting(opt, model, 7, start=5) == whole
    assert all(torch.equal(a, b) for a, b in zip(want, model.parameters()))
    model, other = make()
    other.seed = 12
    with pytest.raises(ValueError, match="seed: checkpoint 11, this run 12"):
        other.load_state_dict(saved["opt"])


# -- edge values --------------------------------------------------------------------------------------------
def test_r_zero_is_plain_training_and_warmup_steps_zero_is_no_ramp():
    model, plain = seeded_net(), seeded_net()
    opt = GradientNormPenalty(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), alpha=0.8, r=0)
    ref = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    assert _run_counting(opt, model, 3) == [1, 1, 1]
    for t in range(3):
        x, y = _data(1)[0]
        ref.zero_grad()
        loss_function(y, plain(x * (t + 1))).backward()
        ref.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))
    for warmup in ("lambda", "r", "zero"):
        opt = GradientNormPenalty(torch.optim.SGD(seeded_net().parameters(), lr=0.1), alpha=0.8, r=0.1,
                                  warmup=warmup, warmup_steps=0)
        assert opt.coefficients() == (0.8, 0.1) and opt.penalizes()


# -- issue 18 item 4: a gradient only at the perturbed point ---------------------------------------------
@pytest.mark.parametrize("alpha", [0.6, 1.0])
def test_a_parameter_with_a_gradient_only_at_the_perturbed_point_is_weighted_by_alpha(alpha):
    """An MoE-like switch: the first pass uses expert ``a``, the perturbed pass expert ``b``."""
    a, b = nn.Parameter(torch.tensor([1.0, 2.0])), nn.Parameter(torch.tensor([3.0, -1.0]))
    calls = []

    def closure():
        expert = a if not calls else b
        calls.append(1)
        loss = (expert ** 2).sum()
        loss.backward()
        return loss

    opt = GradientNormPenalty(torch.optim.SGD([a, b], lr=0.0), alpha=alpha, r=0.1)
    opt.step(closure)
    torch.testing.assert_close(b.grad, alpha * 2 * b.detach())  # alpha * g2, g1 = 0
    torch.testing.assert_close(a.grad, (1 - alpha) * 2 * a.detach())  # (1 - alpha) * g1, g2 = 0
