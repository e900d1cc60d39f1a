"""The clipper's cached norm pieces (layout_cache.py) across layout changes, against a clipper that builds them fresh.

Each step, one clipper keeps its layout over the whole run while a new clipper on an identical
copy of the model builds it from scratch; the clipped gradients must be bitwise equal (same ops
in the same order), and close to the formula computed per tensor in float64 (where the reduction
order differs). The layout object must be reused exactly when the layout is unchanged.
"""

from __future__ import annotations

import pytest
import torch

from dropgrad_dist import GradientClipper
from dropgrad_dist.clipping.layout_cache import ClipLayout

needs_cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def _net(device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4), torch.nn.Linear(4, 3)]
    return torch.nn.Sequential(*layers).to(device)


def _fresh_grads(params: list[torch.nn.Parameter], step: int, in_place: bool) -> None:
    """Gradients of step ``step``: new tensors (as after ``zero_grad(set_to_none=True)``) or written in place."""
    generator = torch.Generator().manual_seed(step)
    for param in params:
        value = torch.randn(param.shape, generator=generator, dtype=torch.float64).to(param.device, param.dtype) * 3
        if in_place and param.grad is not None:
            param.grad.copy_(value)
        else:
            param.grad = value


def _reference(method: str, level: float, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """The method's formula per tensor, in float64."""
    wide = [g.double() for g in grads]
    if method == "layer_wise":
        return [g * min(1.0, level / float(g.norm())) for g in wide]
    total = float(torch.stack([g.norm() for g in wide]).norm())
    return [g * min(1.0, level / total) for g in wide]


# Each step: (what changes before it, whether the cached layout must be the previous step's).
_STEPS = [
    ("first clip", False),
    ("same gradient tensors, new values", True),
    ("zero_grad(set_to_none=True), fresh gradients", True),
    ("a new parameter group", False),
    ("model.double(): the same gradient tensors, new dtype", False),
    ("a gradient of one layer in bfloat16 (mixed dtypes)", False),
    ("a parameter without gradient", False),
    ("zero_grad(set_to_none=True), fresh gradients again", False),  # the None gradient is back
    ("unchanged", True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["norm", "layer_wise"])
def test_cached_layout_matches_fresh_clipper_across_layout_changes(method: str, device: str) -> None:
    kept_model, fresh_model = _net(device), _net(device)
    kept = GradientClipper(method, clipping_level=0.5)
    groups = {id(m): [list(m[0].parameters())] for m in (kept_model, fresh_model)}
    previous_layout = None
    for step, (change, reused) in enumerate(_STEPS):
        for model in (kept_model, fresh_model):
            params_groups = groups[id(model)]
            if change == "a new parameter group":
                params_groups.append([p for layer in (model[2], model[3]) for p in layer.parameters()])
            elif change.startswith("model.double()"):
                model.double()
            elif change.startswith("a gradient of one layer in bfloat16"):
                model[2].to(torch.bfloat16)
            params = [p for group in params_groups for p in group]
            _fresh_grads(params, step, in_place=change.startswith(("same", "model.double", "a gradient", "unchanged")))
            if change == "a parameter without gradient":
                params[-1].grad = None
        kept_groups = [{"params": group} for group in groups[id(kept_model)]]
        fresh_groups = [{"params": group} for group in groups[id(fresh_model)]]
        kept_params = [p for group in groups[id(kept_model)] for p in group]
        before = [None if p.grad is None else p.grad.clone() for p in kept_params]
        got = kept.clip_groups_(kept_groups)
        want = GradientClipper(method, clipping_level=0.5).clip_groups_(fresh_groups)
        fresh_params = [p for group in groups[id(fresh_model)] for p in group]
        for a, b in zip(kept_params, fresh_params):
            assert (a.grad is None) == (b.grad is None), change
            if a.grad is not None:
                assert a.grad.dtype == b.grad.dtype and torch.equal(a.grad, b.grad), (method, change)
        assert got["norm"] == want["norm"] and got["norm_after"] == want["norm_after"], change
        held = [(g, p.grad) for g, p in zip(before, kept_params) if g is not None]
        expected = _reference(method, 0.5, [g for g, _ in held])
        for (_, clipped), formula in zip(held, expected):
            tolerance = 1e-2 if clipped.dtype == torch.bfloat16 else 1e-5
            torch.testing.assert_close(clipped.double(), formula, rtol=tolerance, atol=tolerance)
        assert (kept._layout is previous_layout) == reused, change
        previous_layout = kept._layout


def test_layout_local_detects_each_kind_of_change() -> None:
    model = _net()
    params = list(model.parameters())
    _fresh_grads(params, 0, in_place=False)
    layout = ClipLayout(params, None)
    assert layout.local(params) is not None
    _fresh_grads(params, 1, in_place=False)  # new tensors, same layout
    assert layout.local(params) is not None
    assert layout.local(params[:-1]) is None  # other parameters
    params[0].grad.data = params[0].grad.data.double()  # the same tensor object, its data swapped
    assert layout.local(params) is None
    _fresh_grads(params, 2, in_place=False)
    params[1].grad = None  # a gradient vanished: no longer in the norm
    assert layout.local(params) is None
    assert ClipLayout(params, None).local(params) is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_scaling_equals_the_python_scalar_and_per_tensor_factor_multiplies(dtype: torch.dtype) -> None:
    """scale_ (a 0-d tensor of the gradients' dtype on CPU) and scale_each_ (cached factor views) give
    bitwise the products of ``_foreach_mul_`` by the Python float and by ``factors.to(dtype)``'s 0-d tensors."""
    model = _net().to(dtype)
    params = list(model.parameters())
    _fresh_grads(params, 3, in_place=False)
    params[0].data = params[0].data.float()  # another dtype in the mix (float32 unless dtype is)
    params[0].grad = params[0].grad.float()
    layout = ClipLayout(params, None)
    grads = [p.grad for p in params]
    for coefficient in (0.123456789123, 1 / 3, 0.7777777777):
        want = [g.clone() for g in grads]
        for group in {g.dtype for g in want}:
            torch._foreach_mul_([g for g in want if g.dtype == group], coefficient)
        got = [g.clone() for g in grads]
        layout.scale_(got, coefficient)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), coefficient
    factors = torch.linspace(0.1, 0.9, len(params), dtype=torch.float64) / 3
    want = [g * factor.to(g.dtype) for g, factor in zip(grads, factors)]
    got = [g.clone() for g in grads]
    layout.scale_each_(got, factors)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    layout.scale_each_(got, factors.flip(0))  # the cached views hold the new factors
    assert all(torch.equal(a, b * factor.to(b.dtype)) for a, b, factor in zip(got, want, factors.flip(0)))
