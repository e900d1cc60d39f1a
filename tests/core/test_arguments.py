"""Rates, seeds and other numbers are accepted as any real scalar (NumPy, 0-d tensors), never as bools.

A wrong type is a ``TypeError``, a wrong value a ``ValueError``."""

import numpy as np
import pytest
import torch
from torch import nn

from dropgrad_dist import DropGrad, GradientClipper, LinearDropRateScheduler, StepDropRateScheduler
from dropgrad_dist.core.checks import ArgumentTypeError, check_rate
from dropgrad_dist.ddp.hook import DropGradHookState

from ..nets import seeded_net

RATES = [np.float32(0.5), np.float16(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor(0.5, dtype=torch.bfloat16),
         0.5]
SEEDS = [np.int64(3), np.uint8(3), np.int32(3), torch.tensor(3), 3]
NOT_NUMBERS = [True, np.bool_(False), torch.tensor(True), torch.tensor([0.5]), 0.5j, "0.5", [0.5]]


def _masked_grads(drop_rate, seed) -> list[torch.Tensor]:
    model = seeded_net()
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.0), drop_rate=drop_rate, seed=seed, model=model)
    nn.functional.mse_loss(model(torch.ones(4, 6)), torch.zeros(4, 3)).backward()
    opt.step()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("rate", RATES, ids=lambda r: type(r).__name__ + str(getattr(r, "dtype", "")))
@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: type(s).__name__)
def test_dropgrad_takes_numpy_and_tensor_scalars_as_the_same_numbers(rate, seed):
    want = _masked_grads(0.5, 3)
    got = _masked_grads(rate, seed)
    for a, b in zip(want, got):
        assert torch.equal(a, b)


def test_canonical_types_are_stored():
    model = seeded_net()
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=np.float32(0.25), seed=np.int64(7),
                   params={"decoder.bias": torch.tensor(0.75)}, model=model)
    assert type(opt.seed) is int and opt.seed == 7
    assert type(opt.drop_rate) is float and opt.drop_rate == 0.25
    opt.drop_rate = np.float64(0.125)
    assert type(opt.drop_rate) is float and opt.drop_rate == 0.125
    opt.state_dict()  # plain data only: a NumPy scalar in it would raise


def test_hook_state_takes_real_scalars():
    model = seeded_net()
    state = DropGradHookState(model, drop_rate=np.float32(0.5), seed=np.int64(9),
                              params={"encoder.weight": torch.tensor(0.25, dtype=torch.float64)})
    assert type(state.seed) is int and state.seed == 9
    assert state.plan.default_rate() == 0.5
    assert state.state_dict()["config"]["seed"] == 9


def test_schedules_take_real_scalars():
    linear = LinearDropRateScheduler(np.float32(0.5), torch.tensor(0.0), np.int64(4))
    assert linear.num_steps == 4 and type(linear.num_steps) is int
    assert linear.rate_at(2) == pytest.approx(0.25)
    stepped = StepDropRateScheduler(np.float64(0.5), {np.int64(2): np.float32(0.25), torch.tensor(5): 0})
    assert list(stepped.drop_rate_schedule) == [2, 5] and all(type(t) is int for t in stepped.drop_rate_schedule)
    assert stepped.rate_at(3) == 0.25 and stepped.rate_at(5) == 0.0


def test_clipper_takes_real_scalars():
    clipper = GradientClipper("linear_rand_norm", np.float32(2.0), beta=torch.tensor(0.5),
                              p_autoclip=np.float64(0.5), history_size=np.int64(3), seed=np.uint16(4))
    assert (clipper.clipping_level, clipper.beta, clipper.p_autoclip, clipper.history_size, clipper.seed) == \
        (2.0, 0.5, 0.5, 3, 4)
    assert all(type(v) is float for v in (clipper.clipping_level, clipper.beta, clipper.p_autoclip))
    assert type(clipper.seed) is int and type(clipper.history_size) is int
    clipper.state_dict()


@pytest.mark.parametrize("value", NOT_NUMBERS, ids=repr)
def test_bools_and_non_scalars_are_type_errors_naming_the_argument(value):
    model = seeded_net()
    with pytest.raises(TypeError, match=r"drop_rate must be a number in \[0, 1\]"):
        DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=value, model=model)
    with pytest.raises(TypeError, match="seed must be an int in"):
        DropGradHookState(model, drop_rate=0.1, seed=value)
    with pytest.raises(TypeError, match="clipping_level must be a positive finite number"):
        GradientClipper("norm", value)


def test_type_errors_are_still_value_errors_for_callers_who_catch_those():
    with pytest.raises(ValueError, match="drop_rate"):
        check_rate("0.5", "drop_rate")
    assert issubclass(ArgumentTypeError, TypeError) and issubclass(ArgumentTypeError, ValueError)


@pytest.mark.parametrize("model", ["net", 3, None.__class__])
def test_a_model_that_is_no_module_is_a_type_error(model):
    net = seeded_net()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        DropGrad(torch.optim.SGD(net.parameters(), lr=0.1), drop_rate=0.1, model=model)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        GradientClipper("norm", 1.0, model=model)


def _value_error_only(call, match):
    """``call()`` raises a ValueError matching ``match`` that is no TypeError (a wrong value, not a wrong type)."""
    with pytest.raises(ValueError, match=match) as error:
        call()
    assert not isinstance(error.value, TypeError)


@pytest.mark.parametrize("value", [np.float32(1.5), np.float64("nan"), torch.tensor(-0.1), 10 ** 400],
                         ids=["float32", "nan", "tensor", "huge_int"])
def test_out_of_range_scalars_are_value_errors(value):
    model = seeded_net()
    _value_error_only(lambda: DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=value, model=model),
                      r"drop_rate must be a number in \[0, 1\]")


@pytest.mark.parametrize("level", [0, np.float32(-1.0), float("inf"), torch.tensor(float("nan"))], ids=repr)
def test_non_positive_levels_are_value_errors(level):
    _value_error_only(lambda: GradientClipper("norm", level), "clipping_level must be a positive finite number")


@pytest.mark.parametrize("seed", [np.float32(3.0), torch.tensor(3.0), 3.0, 1.5])
def test_seeds_must_be_integers(seed):
    with pytest.raises(TypeError, match="seed must be an int in"):
        GradientClipper("norm", 1.0, seed=seed)


@pytest.mark.parametrize("seed", [np.int64(-1), -1, 2 ** 64])
def test_seeds_out_of_range_are_value_errors(seed):
    _value_error_only(lambda: GradientClipper("norm", 1.0, seed=seed), "seed must be an int in")


def test_huge_values_are_shown_short_in_messages():
    with pytest.raises(ValueError, match="num_steps must be an int >= 1") as error:
        LinearDropRateScheduler(0.5, 0.0, -10 ** 400)
    assert len(str(error.value)) < 200
    assert not isinstance(error.value, TypeError)
