"""Gradient norm penalty and SAM in one process: the formula, exact restore, warmups, AMP, composition, errors."""

import pytest
import torch
from torch import nn

from dropgrad_dist import SAM, ClippedOptimizer, DropGrad, GradientClipper, GradientNormPenalty, keep_mask

from ..nets import seeded_net


def _data(step: int = 0, n: int = 16):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(n, 6, generator=gen), torch.randn(n, 3, generator=gen)


def _loss(model, step=0):
    x, y = _data(step)
    return nn.functional.mse_loss(model(x), y)


def _closure(model, step=0, calls=None):
    def closure():
        if calls is not None:
            calls.append([p.detach().clone() for p in model.parameters()])
        loss = _loss(model, step)
        loss.backward()
        return loss
    return closure


def _by_hand(model, alpha, r, step=0):
    """The formula with two explicit forward/backward passes: (1-a) g(theta) + a g(theta + r g/|g|)."""
    params = list(model.parameters())
    g1 = torch.autograd.grad(_loss(model, step), params)
    norm = torch.sqrt(sum(g.square().sum() for g in g1))
    with torch.no_grad():
        for p, g in zip(params, g1):
            p.add_(g, alpha=r / norm.item())
    g2 = torch.autograd.grad(_loss(model, step), params)
    with torch.no_grad():
        for p, g in zip(params, g1):
            p.sub_(g, alpha=r / norm.item())
    return [(1 - alpha) * a + alpha * b for a, b in zip(g1, g2)]


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 1.0])
def test_combined_gradient_is_the_formula_and_theta_is_restored_bitwise(alpha):
    model = seeded_net()
    theta = [p.detach().clone() for p in model.parameters()]
    want = _by_hand(seeded_net(), alpha, r=0.2)
    opt = GradientNormPenalty(torch.optim.SGD(model.parameters(), lr=0.0), alpha=alpha, r=0.2, model=model)
    calls = []
    loss = opt.step(_closure(model, calls=calls))
    assert torch.equal(loss, _loss(seeded_net()))  # the first evaluation's loss
    assert len(calls) == (1 if alpha == 0 else 2)
    for got, expected in zip(model.parameters(), want):
        torch.testing.assert_close(got.grad, expected, rtol=1e-5, atol=1e-7)
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta))  # lr 0: restored bitwise
    if alpha > 0:  # the second evaluation saw theta + r g/|g|, not theta
        assert not torch.equal(calls[1][0], theta[0])
    assert opt.step_index == 1


def test_sam_is_alpha_one_with_r_rho():
    a, b = seeded_net(), seeded_net()
    sam = SAM(torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9), rho=0.05, model=a)
    gnp = GradientNormPenalty(torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9), alpha=1.0, r=0.05, model=b)
    for step in range(3):
        sam.step(_closure(a, step))
        gnp.step(_closure(b, step))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("warmup, expected", [
    ("none", [(0.8, 0.1)] * 6),
    ("lambda", [(0.8 * t / 4, 0.1) for t in range(4)] + [(0.8, 0.1)] * 2),
    ("r", [(0.8, 0.1 * t / 4) for t in range(4)] + [(0.8, 0.1)] * 2),
    ("zero", [(0.0, 0.1)] * 4 + [(0.8, 0.1)] * 2),
])
def test_warmups_give_the_stated_coefficients_and_zero_runs_one_pass(warmup, expected):
    model = seeded_net()
    steps = 0 if warmup == "none" else 4
    opt = GradientNormPenalty(torch.optim.SGD(model.parameters(), lr=0.01), alpha=0.8, r=0.1, model=model,
                              warmup=warmup, warmup_steps=steps)
    for t, (alpha, r) in enumerate(expected):
        assert opt.coefficients() == pytest.approx((alpha, r))
        calls = []
        opt.step(_closure(model, t, calls))
        assert len(calls) == (1 if alpha == 0 or r == 0 else 2)  # r_t = 0 is a plain step
    assert opt.step_index == 6


@pytest.mark.parametrize("bad_pass", [0, 1])
def test_a_non_finite_pass_under_grad_scaler_skips_the_whole_step(bad_pass):
    model = seeded_net()
    theta = [p.detach().clone() for p in model.parameters()]
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = GradientNormPenalty(base, alpha=0.5, r=0.1, model=model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    calls = []

    def closure():
        loss = _loss(model) * (float("inf") if len(calls) == bad_pass else 1.0)
        calls.append(1)
        scaler.scale(loss).backward()
        return loss

    opt.step(closure, scaler=scaler)
    scaler.update()
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta))  # no perturbation left
    assert opt.step_index == 0 and not base.state and scaler.get_scale() < 2.0 ** 12
    assert len(calls) == (1 if bad_pass == 0 else 2)
    calls.clear()
    bad_pass = -1  # a finite step afterwards runs: scaled passes, one unscale, a real update
    opt.step(closure, scaler=scaler)
    assert opt.step_index == 1 and base.state


def test_scaled_passes_give_the_unscaled_formula():
    model, reference = seeded_net(), seeded_net()
    opt = GradientNormPenalty(torch.optim.SGD(model.parameters(), lr=1.0), alpha=0.6, r=0.1, model=model)
    ref = GradientNormPenalty(torch.optim.SGD(reference.parameters(), lr=1.0), alpha=0.6, r=0.1, model=reference)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

    def scaled():
        loss = _loss(model)
        scaler.scale(loss).backward()
        return loss

    opt.step(scaled, scaler=scaler)
    ref.step(_closure(reference))
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_masks_and_clips_the_combined_gradient():
    model, reference = seeded_net(), seeded_net()
    clipper = GradientClipper("norm", 0.05)
    chain = DropGrad(ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), clipper), 0.5, seed=4, model=model)
    GradientNormPenalty(chain, alpha=0.7, r=0.1, model=model).step(_closure(model))
    g = _by_hand(reference, 0.7, 0.1)
    masked = []
    for (name, p), grad in zip(reference.named_parameters(), g):
        keep = keep_mask(p.numel(), seed=4, step=0, key=name, rate=0.5).view_as(p)
        masked.append(torch.where(keep, grad * 2.0, 0.0))
    norm = torch.sqrt(sum(m.square().sum() for m in masked))
    for p, ref, m in zip(model.parameters(), reference.parameters(), masked):
        torch.testing.assert_close(p.detach(), ref.detach() - m * (0.05 / norm), rtol=1e-5, atol=1e-7)


def test_a_closure_may_accumulate_micro_batches():
    whole, split = seeded_net(), seeded_net()
    a = GradientNormPenalty(torch.optim.SGD(whole.parameters(), lr=0.1), alpha=0.8, r=0.1, model=whole)
    b = GradientNormPenalty(torch.optim.SGD(split.parameters(), lr=0.1), alpha=0.8, r=0.1, model=split)
    x, y = _data(0)

    def accumulate():
        total = 0.0
        for part in range(4):  # four micro-batches of 4 rows: the same mean loss as the whole batch
            loss = nn.functional.mse_loss(split(x[4 * part:4 * part + 4]), y[4 * part:4 * part + 4]) / 4
            loss.backward()
            total += loss.detach()
        return total

    a.step(_closure(whole))
    b.step(accumulate)
    for p, q in zip(whole.parameters(), split.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("options", [dict(alpha=0.8, r=0.1, every=2), dict(alpha=1.0, r=0.5, adaptive=True)])
def test_an_engine_running_both_passes_itself_equals_step_with_a_closure(options):
    """begin_passes / first_pass_context / finish_passes / step() (Trainer's form) is step(closure), bitwise."""
    models = seeded_net(), seeded_net()
    penalties = [GradientNormPenalty(DropGrad(torch.optim.SGD(m.parameters(), lr=0.1), 0.5, seed=2, model=m),
                                     **options, model=m) for m in models]

    def backward(model, step):
        x, y = _data(step)
        for part in range(2):  # two accumulated micro-batches
            (nn.functional.mse_loss(model(x[8 * part:8 * part + 8]), y[8 * part:8 * part + 8]) / 2).backward()

    for step in range(3):  # with every=2, step 1 is a plain (one-pass) step
        penalties[0].step(lambda: backward(models[0], step))
        engine = penalties[1]
        engine.zero_grad(set_to_none=True)
        engine.begin_passes()
        with engine.first_pass_context():
            backward(models[1], step)
        engine.finish_passes(lambda: backward(models[1], step))
        engine.step()
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)
    assert [(g.step_index, g.penalty_steps) for g in penalties] == [(3, 3 if "every" not in options else 2)] * 2


@pytest.mark.parametrize("bad_pass", [0, 1])
def test_an_engine_step_under_grad_scaler_skips_a_non_finite_pass(bad_pass):
    """As AcceleratedOptimizer steps it: scaler.step(penalty) after finish_passes; nothing moves or counts."""
    model = seeded_net()
    theta = [p.detach().clone() for p in model.parameters()]
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    penalty = GradientNormPenalty(base, alpha=0.5, r=0.1, model=model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)

    def backward(which):
        scaler.scale(_loss(model) * (float("inf") if which == bad_pass else 1.0)).backward()

    for _ in range(2):  # the skipped step, then (bad_pass = -1) a finite one
        penalty.zero_grad(set_to_none=True)
        penalty.begin_passes()
        with penalty.first_pass_context():
            backward(0)
        penalty.finish_passes(lambda: backward(1), scaler=scaler)
        scaler.step(penalty)
        scaler.update()
        if bad_pass >= 0:
            assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta))  # no perturbation left
            assert penalty.step_index == 0 and not base.state and scaler.get_scale() < 2.0 ** 12
        bad_pass = -1
    assert penalty.step_index == penalty.penalty_steps == 1 and base.state


def test_an_engine_step_out_of_order_is_refused():
    model = seeded_net()
    penalty = GradientNormPenalty(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    with pytest.raises(ValueError, match="finish_passes needs begin_passes"):
        penalty.finish_passes(lambda: None)
    penalty.begin_passes()
    _loss(model).backward()
    with pytest.raises(ValueError, match="needs finish_passes"):
        penalty.step()
    assert penalty.step_index == 0


def test_an_engine_replays_each_recorded_micro_batch_from_its_own_random_state():
    """record_micro_batch / finish_passes(micro_batch=) (Lightning's and Trainer's form): in the second pass
    dropout draws each micro-batch's first-pass masks again, whatever the engine drew between micro-batches."""
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.Linear(16, 3))

    models = make(), make()
    penalties = [GradientNormPenalty(torch.optim.SGD(m.parameters(), lr=0.1), alpha=0.5, r=0.1, model=m)
                 for m in models]
    x, y = _data(0)

    def backward(model, part):
        (nn.functional.mse_loss(model(x[8 * part:8 * part + 8]), y[8 * part:8 * part + 8]) / 2).backward()

    def closure():  # the reference: the draw between the micro-batches runs again in its second pass
        backward(models[0], 0)
        torch.rand(3)
        backward(models[0], 1)

    torch.manual_seed(1)
    penalties[0].step(closure)
    after = [torch.rand(4)]
    torch.manual_seed(1)
    engine, lasts = penalties[1], []
    engine.zero_grad(set_to_none=True)
    engine.begin_passes()
    for part in range(2):
        if part:
            torch.rand(3)  # what the engine draws between micro-batches (a sampler, a hook), not replayed
        engine.record_micro_batch(part)
        with engine.first_pass_context():
            backward(models[1], part)
    engine.finish_passes(micro_batch=lambda part, last: (lasts.append(last), backward(models[1], part)))
    engine.step()
    after.append(torch.rand(4))
    assert lasts == [False, True] and engine.penalty_steps == 1
    assert torch.equal(*after)  # the random stream continues as after the first pass
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)


def test_an_engine_refuses_the_first_pass_given():
    model = seeded_net()
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)  # davda54's form: first_pass="given"
    with pytest.raises(ValueError, match=r"first_pass='given' does not fit .* use first_pass='closure'"):
        sam.begin_passes()
    assert sam.step_index == 0
    penalty = GradientNormPenalty(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    penalty.begin_passes()
    _loss(model).backward()
    with pytest.raises(ValueError, match="second_pass= .* or micro_batch= .* exactly one"):
        penalty.finish_passes()


def test_resume_is_exact(tmp_path):
    def make():
        model = seeded_net()
        opt = GradientNormPenalty(torch.optim.Adam(model.parameters(), lr=1e-2), alpha=0.8, r=0.05, model=model,
                                  warmup="lambda", warmup_steps=6)
        return model, opt

    model, opt = make()
    for step in range(8):
        opt.step(_closure(model, step))
        opt.zero_grad()
    want = [p.detach().clone() for p in model.parameters()]
    model, opt = make()
    for step in range(4):
        opt.step(_closure(model, step))
        opt.zero_grad()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "g.pt")
    model, opt = make()
    saved = torch.load(tmp_path / "g.pt", weights_only=True)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    assert opt.step_index == 4 and opt.coefficients() == (0.8 * 4 / 6, 0.05)
    for step in range(4, 8):
        opt.step(_closure(model, step))
        opt.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(want, model.parameters()))
    other = GradientNormPenalty(torch.optim.Adam(seeded_net().parameters(), lr=1e-2), alpha=0.5, r=0.05,
                                warmup="lambda", warmup_steps=6)
    with pytest.raises(ValueError, match="alpha: checkpoint 0.8, this run 0.5"):
        other.load_state_dict(saved["opt"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(alpha=1.5), "alpha must be a number in \\[0, 1\\]"),
    (dict(alpha=-0.1), "alpha must be a number in \\[0, 1\\]"),
    (dict(r=-1.0), "r must be a finite number >= 0"),
    (dict(r=float("inf")), "r must be a finite number >= 0"),
    (dict(warmup="linear"), "warmup must be one of 'none', 'lambda', 'r', 'zero'"),
    (dict(mix="unit"), "mix must be one of 'raw', 'normalized'"),
    (dict(every=0), "every must be an int >= 1"),
    (dict(probability=1.5), "probability must be a number in \\[0, 1\\]"),
    (dict(every=2, probability=0.5), "give every= .* or probability= .*, not both"),
    (dict(warmup_steps=-1), "warmup_steps must be an int >= 0"),
    (dict(perturbation="per_device"), "perturbation must be one of 'global', 'local'"),
])
def test_bad_input_raises_clear_errors(kwargs, message):
    model = seeded_net()
    with pytest.raises(ValueError, match=message):
        GradientNormPenalty(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_closure_missing_or_without_backward_is_refused():
    model = seeded_net()
    opt = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05, model=model)
    with pytest.raises(ValueError, match="needs a closure that computes the loss, calls backward"):
        opt.step()
    with pytest.raises(ValueError, match="the closure found no gradient: the first pass must call backward"):
        opt.step(lambda: _loss(model))
    assert opt.step_index == 0
