"""torch-clip's documented code runs with only the import lines changed, and does what its docs say.

The two examples of torch-clip's README are kept verbatim below; the test swaps their import
lines for ``dropgrad_dist.compat.torch_clip`` and runs them, then compares the parameters with a
straightforward reference of torch-clip's documented semantics (the README formulas: the
gradient is clipped, then momentum SGD without dampening; restarts to the mean of the iterates on
torch-clip's schedule, with a fresh optimizer state).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from dropgrad_dist import Restarter as NativeRestarter
from dropgrad_dist.compat.torch_clip import (
    ClippedSGD,
    ModelProperties,
    OptimizerProperties,
    Restarter,
    RestartProperties,
)

from ..nets import Net, seeded_net

README_CLIPPING = '''
from torch_clip.optimizers import  ClippedSGD
optimizer = ClippedSGD(model.parameters(), lr=5e-2, momentum=0.9, clipping_type="layer_wise", clipping_level=1)

loss = my_loss_function
for epoch in range(EPOCHS):
    for i, data in enumerate(train_loader, 0):
        outputs = net(inputs)
        loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
'''

README_RESTARTS = '''
from torch_clip.optimizers import ClippedSGD
from torch_clip.restarter import Restarter
from torch_clip.optimizers_collector import OptimizerProperties, ModelProperties, RestartProperties

loss = my_loss_function
model = my_model_object

optimizer_props = OptimizerProperties(ClippedSGD, lr=5e-2, momentum=0.9, 
                                      clipping_type="layer_wise", clipping_level=1)
restarter = Restarter(optimizer_properties=optimizer_props, first_restart_steps_cnt=50,
                      restart_coeff=1.25, max_steps_cnt=2000)
optimizer = optimizer_props.optimizer_class(model.parameters(), **optimizer_props.optimizer_kwargs)

for epoch in range(EPOCHS):
    for i, data in enumerate(train_loader, 0):
        outputs = model(inputs)
        loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        restarter.add_coords(model.parameters())
        optimizers = restarter.make_restart(net, optimizer)
'''  # noqa: W291 (the README's trailing space, kept verbatim)

OUR_IMPORTS = {
    "from torch_clip.optimizers import  ClippedSGD": "from dropgrad_dist.compat.torch_clip import ClippedSGD",
    "from torch_clip.optimizers import ClippedSGD": "from dropgrad_dist.compat.torch_clip import ClippedSGD",
    "from torch_clip.restarter import Restarter": "from dropgrad_dist.compat.torch_clip import Restarter",
    "from torch_clip.optimizers_collector import OptimizerProperties, ModelProperties, RestartProperties":
        "from dropgrad_dist.compat.torch_clip import OptimizerProperties, ModelProperties, RestartProperties",
}


def _with_our_imports(code: str) -> str:
    lines = [OUR_IMPORTS.get(line.rstrip(), line) for line in code.splitlines()]
    changed = [a for a, b in zip(code.splitlines(), lines) if a != b]
    assert changed and all(line.startswith("from torch_clip") for line in changed)
    return "\n".join(lines)


def _batch(scale: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    x, y = torch.randn(16, 6, generator=gen) * scale, torch.randn(16, 3, generator=gen) * 3 * scale
    return x.double(), y.double()


def _namespace(model: nn.Module, epochs: int, batches: int) -> dict:
    inputs, labels = _batch()
    criterion = nn.functional.mse_loss
    return {"model": model, "net": model, "my_model_object": model, "inputs": inputs, "labels": labels,
            "criterion": criterion, "my_loss_function": criterion, "EPOCHS": epochs,
            "train_loader": [None] * batches}


def _reference_sgd(steps: int, lr: float, momentum: float, clip, restart_steps=()) -> tuple[list, list]:
    """Momentum SGD (buffer ``b <- momentum * b + g``, ``b = g`` at first) on ``clip(grads)``;
    at each step in ``restart_steps`` the parameters become the mean of the iterates since the
    last restart and the buffers are dropped. Returns the parameters and what ``clip`` reported."""
    model = seeded_net().double()
    inputs, labels = _batch()
    params = list(model.parameters())
    buffers, iterates, clipped = None, [], []
    for step in range(1, steps + 1):
        model.zero_grad()
        nn.functional.mse_loss(model(inputs), labels).backward()
        grads, was_clipped = clip([p.grad.detach().clone() for p in params])
        clipped.append(was_clipped)
        with torch.no_grad():
            buffers = grads if buffers is None else [momentum * b + g for b, g in zip(buffers, grads)]
            for p, b in zip(params, buffers):
                p -= lr * b
        iterates.append([p.detach().clone() for p in params])
        if step in restart_steps:
            with torch.no_grad():
                for i, p in enumerate(params):
                    p.copy_(torch.stack([it[i] for it in iterates]).mean(0))
            buffers, iterates = None, []
    return [p.detach() for p in params], clipped


def _layer_wise(level: float):
    def clip(grads):
        factors = [min(1.0, level / float(g.norm())) for g in grads]
        return [g * f for g, f in zip(grads, factors)], [f < 1 for f in factors]
    return clip


# The README loops train on one fixed batch, where clipped steps make float32 rounding grow to
# ~1e-3 over 120 steps: they run in float64, compared to 1e-10.
def test_readme_clipping_example_runs_with_only_the_imports_changed():
    model = seeded_net().double()
    exec(_with_our_imports(README_CLIPPING), _namespace(model, epochs=3, batches=4))  # noqa: S102
    want, clipped = _reference_sgd(12, 5e-2, 0.9, _layer_wise(1.0))
    flags = {flag for step in clipped for flag in step}
    assert flags == {True, False}, clipped  # the level sits inside the range of the layers' norms
    for got, expected in zip(model.parameters(), want):
        torch.testing.assert_close(got.detach(), expected, rtol=1e-10, atol=1e-10)


def test_readme_restarts_example_runs_with_only_the_imports_changed():
    model = seeded_net().double()
    namespace = _namespace(model, epochs=2, batches=60)
    exec(_with_our_imports(README_RESTARTS), namespace)  # noqa: S102
    # torch-clip's schedule for (50, 1.25, 2000): after 51 iterates, then floor(62.5) + 1 = 63 more
    want, _ = _reference_sgd(120, 5e-2, 0.9, _layer_wise(1.0), restart_steps=(51, 114))
    assert namespace["restarter"].restarts == 2 and namespace["optimizers"] is namespace["optimizer"]
    for got, expected in zip(model.parameters(), want):
        torch.testing.assert_close(got.detach(), expected, rtol=1e-10, atol=1e-10)


def _torch_clip_schedule(first: int, coeff: float, max_steps: int, steps: int) -> list[int]:
    """torch-clip's documented rule: restart once more than ``n`` iterates are held, then
    ``n <- floor(n * coeff)``; only while the iterates held are fewer than ``max_steps``."""
    restarts, held, n = [], 0, first
    for step in range(1, steps + 1):
        held += 1
        if n < held < max_steps:
            restarts.append(step)
            held, n = 0, int(n * coeff)
    return restarts


@pytest.mark.parametrize("first, coeff, max_steps", [(10, 1.5, 100), (50, 1.25, 2000), (3, 1.0, 10), (7, 2.0, 60),
                                                     (1, 1.5, 20)])
def test_restart_schedule_is_torch_clips(first, coeff, max_steps):
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    restarter = Restarter(OptimizerProperties(ClippedSGD, lr=0.1), first, coeff, max_steps)
    native = NativeRestarter(first, coeff, max_steps)
    got, got_native = [], []
    for step in range(1, 400):
        restarter.add_coords(model.parameters())
        if restarter.make_restart(model, optimizer) is optimizer and restarter.restarts > len(got):
            got.append(step)
        if native.step(model, optimizer):
            got_native.append(step)
    assert got == _torch_clip_schedule(first, coeff, max_steps, 399)
    if (first, coeff, max_steps) == (10, 1.5, 100):
        assert got == [11, 27, 50, 84, 134, 208] and got_native == [10, 25, 48, 82, 133, 209]


def test_restart_is_the_exact_mean_and_checkpoints_with_its_schedule(tmp_path):
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    restarter = Restarter(OptimizerProperties(torch.optim.SGD, lr=0.1), first_restart_steps_cnt=4)
    snapshots = []
    for step in range(5):
        model.zero_grad()
        model(torch.randn(4, 3, generator=torch.Generator().manual_seed(step))).square().mean().backward()
        optimizer.step()
        snapshots.append([p.detach().clone() for p in model.parameters()])
        restarter.add_coords(model.parameters())
        assert restarter.make_restart(model, optimizer) is optimizer
    mean = [torch.stack([s[i] for s in snapshots]).mean(0) for i in range(2)]  # 5 iterates, 2 tensors
    assert restarter.restarts == 1 and not optimizer.state
    for got, want in zip(model.parameters(), mean):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-7)
    state = restarter.state_dict(model)
    assert state["config"]["schedule"] == "torch_clip"
    with pytest.raises(ValueError, match="schedule"):
        NativeRestarter(4, 1.5, 5000).load_state_dict(state, model)
    other = Restarter(OptimizerProperties(torch.optim.SGD, lr=0.1), first_restart_steps_cnt=4)
    other.load_state_dict(state, model)
    assert (other.period, other.restarts) == (6.0, 1)


def test_property_holders_and_bad_arguments():
    props = OptimizerProperties(ClippedSGD, lr=0.1, momentum=0.9, clipping_type="norm")
    assert props.optimizer_class is ClippedSGD and props.optimizer_kwargs["momentum"] == 0.9
    model = ModelProperties(Net).get_model()
    assert isinstance(model, Net)
    restart_props = RestartProperties(Restarter, first_restart_steps_cnt=5, restart_coeff=2.0, max_steps_cnt=50)
    restarter = restart_props.restart_class(props, **restart_props.get_kwargs())
    assert (restarter.first_restart_steps, restarter.restart_coeff, restarter.max_steps) == (5, 2.0, 50)
    assert restarter.optimizer_class is ClippedSGD
    with pytest.raises(TypeError, match="optimizer_properties must be an OptimizerProperties"):
        Restarter(ClippedSGD)
    with pytest.raises(TypeError, match="optimizer_class must be a callable"):
        OptimizerProperties("sgd")
    with pytest.raises(ValueError, match="restart_coeff must be a finite number >= 1"):
        Restarter(props, 10, 0.5)


# -- ClippedSGD: torch-clip's signature, options in param_groups, per-group norms --------------------
def _groups(model: Net, levels: tuple[float, float]) -> list[dict]:
    return [{"params": list(model.encoder.parameters()), "clipping_level": levels[0]},
            {"params": list(model.decoder.parameters()), "clipping_level": levels[1]}]


def _step_grads(model: nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)
    model.zero_grad()
    (nn.functional.mse_loss(model(x), y) * (1 + step % 5)).backward()


LEVELS = {"norm": (0.3, 0.6), "layer_wise": (0.2, 0.4), "coordinate_wise": (0.15, 0.5), "auto_clip": (1.0, 1.0)}


def _reference_group_run(method: str, scope: str, steps: int, change_at: int) -> tuple[list, list]:
    """torch-clip's documented formulas per group (its ``param_groups[i]['clipping_level']``), with
    the norm of each group (torch-clip's) or the global one; AutoClip's level is the exact
    ``p``-quantile of the norms so far, this step's included; momentum SGD without dampening."""
    model = seeded_net()
    groups = _groups(model, LEVELS[method])
    buffers: dict = {}
    histories = [[], []] if scope == "group" else [[]]
    decisions = []
    for step in range(steps):
        if step == change_at:
            groups[0]["clipping_level"] /= 2
        _step_grads(model, step)
        grads = [[p.grad.detach().double() for p in g["params"]] for g in groups]
        squares = [sum(float(x.square().sum()) for x in gs) for gs in grads]
        norms = [math.sqrt(s) for s in squares] if scope == "group" else [math.sqrt(sum(squares))] * 2
        clipped_now = []
        for k, (group, gs) in enumerate(zip(groups, grads)):
            level = group["clipping_level"]
            if method == "layer_wise":
                factors = [min(1.0, level / float(x.norm())) for x in gs]
                clipped_now.append(any(f < 1 for f in factors))
                gs[:] = [x * f for x, f in zip(gs, factors)]
            elif method == "coordinate_wise":
                clipped_now.append(any(bool((x.abs() > level).any()) for x in gs))
                gs[:] = [x.clamp(-level, level) for x in gs]
            else:
                history = histories[k] if scope == "group" else histories[0]
                if method == "auto_clip":
                    level = torch.quantile(torch.tensor(history + [norms[k]], dtype=torch.float64), 0.4).item()
                coefficient = min(1.0, level / norms[k])
                clipped_now.append(coefficient < 1)
                gs[:] = [x * coefficient for x in gs]
        for k in range(len(histories)):
            histories[k].append(norms[k])
        decisions.append(clipped_now)
        with torch.no_grad():
            for group, gs in zip(groups, grads):
                for p, g in zip(group["params"], gs):
                    buffers[p] = g if p not in buffers else 0.9 * buffers[p] + g
                    p -= 0.05 * buffers[p].float()
    return [p.detach() for p in model.parameters()], decisions


@pytest.mark.parametrize("scope", ["global", "group"])
@pytest.mark.parametrize("method", LEVELS)
def test_deterministic_methods_match_torch_clips_formulas_per_group(method, scope):
    steps, change_at = 12, 6
    want, decisions = _reference_group_run(method, scope, steps, change_at)
    flat = [d for step in decisions for d in step]
    assert any(flat) and not all(flat), decisions  # the levels sit inside the range of norms
    model = seeded_net()
    optimizer = ClippedSGD(_groups(model, LEVELS[method]), 0.05, 0.9, method, p_autoclip=0.4, norm_scope=scope)
    for step in range(steps):
        if step == change_at:  # like lr: the next step uses it
            optimizer.param_groups[0]["clipping_level"] /= 2
        _step_grads(model, step)
        optimizer.step()
        assert [g["clipped"] for g in optimizer.clipper.last_stats["groups"]] == decisions[step]
    for got, expected in zip(model.parameters(), want):
        torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-6)
    if scope == "group" and method != "layer_wise":
        norms = [g["norm"] for g in optimizer.clipper.last_stats["groups"]]
        assert norms[0] != pytest.approx(norms[1])  # two different norms: it is per group


def test_torch_clips_positional_order_builds_norm_clipping():
    model, reference = seeded_net(), seeded_net()
    optimizer = ClippedSGD(model.parameters(), 0.1, 0.9, "norm")
    assert optimizer.clipper.method == "norm" and optimizer.param_groups[0]["momentum"] == 0.9
    assert {k: optimizer.param_groups[0][k] for k in ("clipping_type", "clipping_level", "beta", "do_restarts")} == \
        {"clipping_type": "norm", "clipping_level": 1.0, "beta": 0, "do_restarts": False}
    plain = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for step in (3, 4):
        _step_grads(model, step)
        optimizer.step()
        _step_grads(reference, step)
        norm = torch.sqrt(sum(p.grad.square().sum() for p in reference.parameters()))
        assert norm > 1.0
        for p in reference.parameters():
            p.grad *= 1.0 / norm
        plain.step()
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_beta_is_ignored_by_non_random_methods_and_zero_refused_for_random_ones():
    runs = []
    for beta in (0, 0.85):
        model = seeded_net()
        optimizer = ClippedSGD(model.parameters(), 0.1, 0.9, "norm", 0.5, beta)
        assert optimizer.param_groups[0]["beta"] == beta and optimizer.clipper.beta is None
        for step in range(3):
            _step_grads(model, step)
            optimizer.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    with pytest.raises(ValueError, match="beta=0 would never clip"):
        ClippedSGD(seeded_net().parameters(), 0.1, 0.9, "linear_rand_norm")  # torch-clip's default beta=0
    with pytest.raises(TypeError, match="beta must be a number"):
        ClippedSGD(seeded_net().parameters(), 0.1, clipping_type="norm", beta="0.5")
    model = seeded_net()
    optimizer = ClippedSGD(model.parameters(), 0.1, 0.9, "quadratic_rand_autoclip", beta=0.7, p_autoclip=0.3)
    assert optimizer.clipper.beta == 0.7 and optimizer.param_groups[0]["p_autoclip"] == 0.3
    optimizer.param_groups[0]["beta"] = 0.0
    _step_grads(model, 0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['beta'\] must be a number in \(0, 1\).*never clip"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_do_restarts_is_recorded_like_torch_clips_and_changes_nothing():
    runs = []
    for flag in (False, True):
        model = seeded_net()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            optimizer = ClippedSGD(model.parameters(), 0.1, 0.9, "layer_wise", 0.3, 0, flag)
        assert optimizer.param_groups[0]["do_restarts"] is flag
        assert [str(w.message) for w in caught if "do_restarts" in str(w.message)] != [] if flag else not caught
        for step in range(60):
            _step_grads(model, step)
            optimizer.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    with pytest.raises(TypeError, match="do_restarts must be True or False"):
        ClippedSGD(seeded_net().parameters(), 0.1, do_restarts="yes")


@pytest.mark.parametrize("key, value, error, message", [
    ("clipping_level", -1.0, ValueError, r"param_groups\[1\]\['clipping_level'\] must be a positive finite number"),
    ("clipping_level", "1", ValueError, r"param_groups\[1\]\['clipping_level'\] must be a positive finite number"),
    ("p_autoclip", 0.0, ValueError, r"param_groups\[1\]\['p_autoclip'\] must be a number in \(0, 1\]"),
    ("clipping_type", "layer_wise", ValueError,
     r"param_groups\[1\]\['clipping_type'\] is 'layer_wise'; the method is fixed"),
])
def test_param_group_options_are_validated_at_the_next_step(key, value, error, message):
    model = seeded_net()
    optimizer = ClippedSGD(_groups(model, (0.5, 0.5)), 0.1, 0.9, "auto_clip")
    _step_grads(model, 0)
    optimizer.step()
    optimizer.param_groups[1][key] = value
    _step_grads(model, 1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match=message):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert optimizer.clipper.step_index == 1


def test_param_group_options_checkpoint_and_new_groups_get_the_defaults(tmp_path):
    model = seeded_net()
    optimizer = ClippedSGD(model.encoder.parameters(), 0.1, 0.9, "norm", 2.0)
    optimizer.add_param_group({"params": list(model.decoder.parameters()), "clipping_level": 0.25})
    assert [g["clipping_level"] for g in optimizer.param_groups] == [2.0, 0.25]
    assert optimizer.param_groups[1]["clipping_type"] == "norm"
    with pytest.raises(ValueError, match=r"param_groups\[2\]\['clipping_level'\]"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "clipping_level": 0})
    assert len(optimizer.param_groups) == 2
    optimizer.param_groups[0]["clipping_level"] = 0.75
    _step_grads(model, 0)
    optimizer.step()
    torch.save(optimizer.state_dict(), tmp_path / "o.pt")
    other = ClippedSGD(seeded_net().encoder.parameters(), 0.1, 0.9, "norm", 2.0)
    other.add_param_group({"params": list(seeded_net().decoder.parameters())})
    other.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True))
    assert [g["clipping_level"] for g in other.param_groups] == [0.75, 0.25] and other.clipper.step_index == 1
