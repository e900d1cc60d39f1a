"""The clipping family in one process: each method against a NumPy reference, history, resume, AMP, errors."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from dropgrad_dist import (
    CLIPPING_METHODS,
    ClippedOptimizer,
    ClippedSGD,
    DropGrad,
    GradientClipper,
    Restarter,
    keep_mask,
)
from dropgrad_dist.clipping.history import NormHistory

from ..nets import seeded_net


def _backward(model: nn.Module, step: int, scale: float = 1.0) -> None:
    gen = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)
    model.zero_grad()
    (nn.functional.mse_loss(model(x), y) * scale * (1 + step % 5)).backward()


def _grads(model: nn.Module) -> list[np.ndarray]:
    return [p.grad.detach().double().numpy().copy() for p in model.parameters()]


def _reference_clip(grads: list[np.ndarray], method: str, level: float, beta: float | None, p: float,
                    history: list[float], draw: float) -> tuple[list[np.ndarray], float]:
    """The formulas of the issue, in NumPy (float64)."""
    norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
    if method == "no_clip":
        return grads, norm
    if method == "layer_wise":
        return [g * min(1.0, level / math.sqrt(float((g ** 2).sum()))) for g in grads], norm
    if method == "coordinate_wise":
        return [np.clip(g, -level, level) for g in grads], norm
    if "auto" in method:
        level = float(np.quantile(np.array(history + [norm]), p, method="linear"))
    alpha = level / norm
    if alpha >= 1:
        return grads, norm
    if "rand" in method:
        power = 1 if method.startswith("linear") else 2
        if not draw < beta ** (alpha ** power):
            return grads, norm
    return [g * alpha for g in grads], norm


@pytest.mark.parametrize("method", CLIPPING_METHODS)
def test_each_method_matches_its_formula_over_steps(method):
    beta = 0.6 if "rand" in method else None
    model = seeded_net()
    clipper = GradientClipper(method, clipping_level=2.0, beta=beta, p_autoclip=0.6, seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    history, decisions = [], set()
    for step in range(12):
        _backward(model, step)
        raw = _grads(model)
        want, norm = _reference_clip(raw, method, 2.0, beta, 0.6, history, clipper.draw())
        stats = clipper.clip_(model.parameters())
        for got, expected in zip(_grads(model), want):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-8)
        assert stats["norm"] == pytest.approx(norm, rel=1e-5)
        decisions.add(stats["clipped"])
        optimizer.step()  # a step that ran: the norm joins the history, t advances
        history.append(stats["norm"])
    assert clipper.step_index == 12 and list(clipper.history.values) == pytest.approx(history)
    if method != "no_clip":
        assert decisions == {True, False}, decisions  # the level sits inside the range of norms


def test_random_decision_uses_the_known_per_step_draw_and_no_global_rng():
    clipper = GradientClipper("quadratic_rand_norm", 1.0, beta=0.5, seed=9)
    before = torch.get_rng_state()
    draws = [clipper.draw(t) for t in range(2000)]
    assert torch.equal(before, torch.get_rng_state())
    assert draws == [GradientClipper("linear_rand_norm", 2.0, beta=0.9, seed=9).draw(t) for t in range(2000)]
    assert abs(np.mean(draws) - 0.5) < 4 * math.sqrt(1 / 12 / 2000)
    # alpha = 0.5: quadratic clips with probability 0.5 ** 0.25; decided by u(seed, t) alone.
    model = nn.Linear(2, 1, bias=False)
    for t in range(40):
        model.weight.grad = torch.tensor([[3.0, 4.0]])  # norm 5 = 2 x the level 2.5
        clipper = GradientClipper("quadratic_rand_norm", 2.5, beta=0.5, seed=9)
        clipper.step_index = t
        stats = clipper.clip_(model.parameters())
        assert stats["clipped"] == (clipper.draw(t) < 0.5 ** 0.25)
        assert stats["coefficient"] == (0.5 if stats["clipped"] else 1.0)


def test_autoclip_quantile_is_exactly_torch_quantile_over_the_window():
    gen = torch.Generator().manual_seed(0)
    values = (torch.randn(5000, generator=gen).exp() * 3).tolist() + [1.0] * 50  # heavy tail and ties
    for size in (None, 7, 1000):
        history = NormHistory(size)
        for i, value in enumerate(values):
            if i % 97 == 0 or i > len(values) - 5:
                window = list(history.values)[-size:] if size else list(history.values)
                for q in (0.0001, 0.5, 0.75, 1.0):
                    want = torch.quantile(torch.tensor(window + [value], dtype=torch.float64), q).item()
                    assert history.quantile_with(value, q) == want, (size, i, q)
            history.append(value)
        assert len(history) == (size or len(values))


def test_a_grad_scaler_skipped_step_adds_nothing_and_does_not_advance():
    model = seeded_net()
    optimizer = ClippedSGD(model.parameters(), lr=0.1, momentum=0.9, clipping_type="auto_clip", p_autoclip=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for step in range(3):
        optimizer.zero_grad()
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
        scaler.scale(model(x).square().mean()).backward()
        if step == 1:
            model.decoder.bias.grad[0] = float("inf")
        scaler.step(optimizer)
        scaler.update()
    assert optimizer.clipper.step_index == 2 and len(optimizer.clipper.history) == 2
    assert all(math.isfinite(v) for v in optimizer.clipper.history.values)
    # Standalone: unscale, clip, then the scaler skips: the pending norm is dropped at the next clip.
    clipper = GradientClipper("auto_clip")
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.zero_grad()
    scaler.scale(model(torch.randn(4, 6)).square().mean() * float("inf")).backward()
    scaler.unscale_(plain)
    assert not math.isfinite(clipper.clip_(model.parameters())["norm"])
    scaler.step(plain)
    assert clipper.step_index == 0 and len(clipper.history) == 0


def test_resume_mid_run_is_exact(tmp_path):
    def make():
        model = seeded_net()
        return model, ClippedSGD(model.parameters(), lr=0.05, momentum=0.9, clipping_type="linear_rand_autoclip",
                                 beta=0.7, p_autoclip=0.5, seed=2)

    def run(model, optimizer, steps):
        for step in steps:
            _backward(model, step)
            optimizer.step()

    model, optimizer = make()
    run(model, optimizer, range(10))
    want = [p.detach().clone() for p in model.parameters()]
    model, optimizer = make()
    run(model, optimizer, range(5))
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "c.pt")
    model, optimizer = make()
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    assert optimizer.clipper.step_index == 5 and len(optimizer.clipper.history) == 5
    run(model, optimizer, range(5, 10))
    assert all(torch.equal(a, b) for a, b in zip(want, model.parameters()))
    other = ClippedSGD(seeded_net().parameters(), lr=0.05, clipping_type="auto_clip", seed=2)
    with pytest.raises(ValueError, match="method: checkpoint 'linear_rand_autoclip', this run 'auto_clip'"):
        other.load_state_dict(saved["optimizer"])
    assert other.clipper.step_index == 0


def test_mask_then_clip_then_step_under_dropgrad():
    model, reference = seeded_net(), seeded_net()
    clipper = GradientClipper("norm", 0.01)
    optimizer = DropGrad(ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), clipper), 0.5, model=model,
                         seed=1)
    _backward(model, 0)
    _backward(reference, 0)
    optimizer.step()
    grads = []
    for name, param in reference.named_parameters():
        keep = keep_mask(param.numel(), seed=1, step=0, key=name, rate=0.5).view_as(param)
        grads.append(torch.where(keep, param.grad * 2.0, 0.0))
    norm = torch.sqrt(sum(g.square().sum() for g in grads))
    for param, ref, grad in zip(model.parameters(), reference.parameters(), grads):
        torch.testing.assert_close(param.detach(), ref.detach() - grad * (0.01 / norm))
    state = optimizer.state_dict()
    assert state["dropgrad"]["step_index"] == 1 and state["clipping"]["step_index"] == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="clip_all"), "method \\(clipping_type\\) must be one of 'no_clip', 'norm'"),
    (dict(method="linear_rand_norm"), "beta must be a number in \\(0, 1\\) for method 'linear_rand_norm'"),
    (dict(method="quadratic_rand_autoclip", beta=0.0), "beta=0 would never clip"),
    (dict(method="linear_rand_norm", beta=1.0), "beta must be a number in \\(0, 1\\)"),
    (dict(method="norm", beta=0.5), "beta applies to the random methods"),
    (dict(clipping_level=0.0), "clipping_level must be a positive finite number"),
    (dict(clipping_level=-1), "clipping_level must be a positive finite number"),
    (dict(clipping_level=float("inf")), "clipping_level must be a positive finite number"),
    (dict(clipping_level="1"), "clipping_level must be a positive finite number"),
    (dict(p_autoclip=0.0), "p_autoclip must be a number in \\(0, 1\\]"),
    (dict(p_autoclip=1.5), "p_autoclip must be a number in \\(0, 1\\]"),
    (dict(history_size=0), "history_size must be an int >= 1"),
    (dict(seed=-3), "seed must be an int in"),
])
def test_bad_input_raises_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GradientClipper(**kwargs)


def test_an_int_level_is_that_number():
    assert GradientClipper("norm", 2).clipping_level == 2.0
    clipped = ClippedSGD(seeded_net().parameters(), lr=0.1, clipping_type="layer_wise", clipping_level=1)
    assert clipped.clipper.clipping_level == 1.0


def test_restarter_sets_the_exact_mean_resets_the_optimizer_and_grows_the_period():
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    restarter = Restarter(first_restart_steps=3, restart_coeff=1.5, max_steps=5)
    snapshots, restarted_at = [], []
    for step in range(12):
        _backward_linear(model, step)
        optimizer.step()
        snapshots.append([p.detach().clone() for p in model.parameters()])
        if restarter.step(model, optimizer):
            restarted_at.append(step)
            mean = [torch.stack([s[i] for s in snapshots]).mean(0) for i in range(2)]
            assert all(torch.allclose(p, m, atol=1e-7) for p, m in zip(model.parameters(), mean))
            assert not optimizer.state  # momentum buffers gone
            snapshots = []
    # periods 3, 4.5 (5 steps), 6.75 > max_steps: no third restart
    assert restarted_at == [2, 7] and restarter.restarts == 2 and not restarter.active


def _backward_linear(model: nn.Module, step: int) -> None:
    model.zero_grad()
    model(torch.randn(4, 3, generator=torch.Generator().manual_seed(step))).square().mean().backward()


def test_restarter_checkpoint_round_trips_and_torch_clip_usage_runs(tmp_path):
    def run(model, optimizer, restarter, steps):
        for step in steps:
            _backward_linear(model, step)
            optimizer.step()
            restarter.add_coords(model.parameters())  # torch-clip's two calls
            restarter.make_restart(model, optimizer)

    def make():
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        return model, torch.optim.SGD(model.parameters(), lr=0.1), Restarter(4, 1.25, 100)

    model, optimizer, restarter = make()
    run(model, optimizer, restarter, range(11))
    want = [p.detach().clone() for p in model.parameters()]
    model, optimizer, restarter = make()
    run(model, optimizer, restarter, range(6))
    torch.save({"restarter": restarter.state_dict(model), "model": model.state_dict(),
                "optimizer": optimizer.state_dict()}, tmp_path / "r.pt")
    model, optimizer, restarter = make()
    saved = torch.load(tmp_path / "r.pt", weights_only=True)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    restarter.load_state_dict(saved["restarter"], model)
    run(model, optimizer, restarter, range(6, 11))
    assert all(torch.equal(a, b) for a, b in zip(want, model.parameters()))
    with pytest.raises(ValueError, match="restart_coeff: checkpoint 1.25, this run 2.0"):
        Restarter(4, 2.0, 100).load_state_dict(saved["restarter"], model)
    with pytest.raises(ValueError, match="restart_coeff must be a finite number >= 1"):
        Restarter(4, 0.5)
