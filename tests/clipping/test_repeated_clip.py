"""A repeated clip on unchanged gradients returns the previous result only when the options are unchanged too.

Each case clips once (nothing or little clipped), changes one option that decides the result (the
clipper's ``clipping_level`` or method, a group's ``clipping_level``, ``beta`` or ``p_autoclip``,
the grouping), clips again, and must equal a twin clipper (same state) that clips the same
gradients with the new options once.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from dropgrad_dist import GradientClipper


def test_the_issues_example_clips_again_at_the_new_level():
    torch.manual_seed(0)
    m = nn.Linear(12, 4)
    m(torch.randn(8, 12)).square().mean().backward()
    c = GradientClipper("norm", 2.0)
    first = c.clip_(m.parameters())
    assert not first["clipped"] and first["norm"] < 2.0
    c.clipping_level = 0.01
    second = c.clip_(m.parameters())
    assert second["clipped"] and second["level"] == 0.01
    norm = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in m.parameters()]))
    assert float(norm) <= 0.01 * (1 + 1e-6)
    assert c.clip_(m.parameters()) == second  # unchanged options: the same result again


def _params() -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(3)
    params = [nn.Parameter(torch.randn(4, 3, generator=gen)), nn.Parameter(torch.randn(5, generator=gen))]
    for param in params:
        param.grad = torch.randn(param.shape, generator=gen)
    return params


def _norm(params: list[nn.Parameter]) -> float:
    return float(torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in params])))


# Each case: (method, clipper keywords, the groups' keys, the change); levels are multiples of the global
# norm n of the gradients, chosen so that the first clip clips nothing and the second (but "grouping") clips.
Change = Callable[[GradientClipper, list[dict]], list[dict]]


def _set_group(key: str, value: float) -> Change:
    def change(clipper: GradientClipper, groups: list[dict]) -> list[dict]:
        groups[1][key] = value
        return groups
    return change


def _set_clipper(name: str, value: object) -> Change:
    def change(clipper: GradientClipper, groups: list[dict]) -> list[dict]:
        setattr(clipper, name, value)
        return groups
    return change


def _regroup(clipper: GradientClipper, groups: list[dict]) -> list[dict]:
    return [{"params": [p for g in groups for p in g["params"]], "clipping_level": groups[0]["clipping_level"]}]


CASES = {
    "clipper clipping_level": ("norm", {"clipping_level": 2.0}, [{}, {}], _set_clipper("clipping_level", 0.3)),
    "clipper method": ("no_clip", {"clipping_level": 0.3}, [{}, {}], _set_clipper("method", "norm")),
    "group clipping_level": ("layer_wise", {}, [{"clipping_level": 9.0}, {"clipping_level": 9.0}],
                             _set_group("clipping_level", 0.05)),
    "group beta": ("linear_rand_norm", {"clipping_level": 0.5, "beta": 1e-12}, [{}, {}],
                   _set_group("beta", 1.0 - 1e-12)),
    "group p_autoclip": ("auto_clip", {}, [{"p_autoclip": 1.0}, {"p_autoclip": 1.0}], _set_group("p_autoclip", 0.05)),
    "grouping": ("norm", {}, [{"clipping_level": 2.0}, {"clipping_level": 2.0}], _regroup),  # stats per group
}


@pytest.mark.parametrize("case", CASES)
def test_a_changed_option_is_not_answered_from_the_previous_clip(case):
    method, kwargs, keys, change = CASES[case]
    params = _params()
    n = _norm(params)
    kwargs = {k: v * n if k == "clipping_level" else v for k, v in kwargs.items()}
    keys = [{k: v * n if k == "clipping_level" else v for k, v in group.items()} for group in keys]
    clipper, twin = (GradientClipper(method, **kwargs) for _ in range(2))
    optimizer = torch.optim.SGD(params, lr=0.0)  # steps fill the AutoClip history, parameters stay
    for scale in (0.5, 2.0, 1.5):  # a history of norms around n: p_autoclip=1 never clips n, 0.05 does
        saved = [p.grad.clone() for p in params]
        for p in params:
            p.grad.mul_(scale)
        clipper.clip_(params)
        optimizer.step()
        for p, grad in zip(params, saved):
            p.grad = grad
    groups = [{"params": [p], **group} for p, group in zip(params, keys)]
    first = clipper.clip_groups_(groups)
    twin.load_state_dict(clipper.state_dict())
    twin_params = [nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(twin_params, params):
        p.grad = q.grad.clone()

    groups = change(clipper, groups)
    twin_of = dict(zip(map(id, params), twin_params))
    twin_groups = change(twin, [{**g, "params": [twin_of[id(p)] for p in g["params"]]} for g in groups])
    second = clipper.clip_groups_(groups)
    expected = twin.clip_groups_(twin_groups)
    assert not first["clipped"]
    assert second["clipped"] or case == "grouping", second
    assert second == expected
    for p, q in zip(params, twin_params):
        assert torch.equal(p.grad, q.grad)
