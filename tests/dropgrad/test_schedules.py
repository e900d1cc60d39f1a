"""Drop-rate schedules: the documented formulas, state round trips and argument checks."""

import math

import pytest

from dropgrad_dist import (
    CosineAnnealingDropRateScheduler,
    LinearDropRateScheduler,
    StepDropRateScheduler,
)


def _rates(scheduler, steps):
    out = []
    for _ in range(steps):
        out.append(scheduler.get_drop_rate())
        scheduler.step()
    return out


def test_linear_formula_and_final_after_num_steps():
    rates = _rates(LinearDropRateScheduler(0.5, 0.1, num_steps=8), 12)
    for t, rate in enumerate(rates):
        want = 0.5 + (0.1 - 0.5) * t / 8 if t < 8 else 0.1
        assert rate == pytest.approx(want, abs=1e-15)
    assert rates[8:] == [0.1] * 4


def test_cosine_formula_and_final_after_num_steps():
    rates = _rates(CosineAnnealingDropRateScheduler(0.4, 0.0, num_steps=10), 13)
    for t, rate in enumerate(rates):
        want = 0.0 + 0.5 * (0.4 - 0.0) * (1 + math.cos(math.pi * t / 10)) if t < 10 else 0.0
        assert rate == pytest.approx(want, abs=1e-15)
    assert rates[0] == pytest.approx(0.4) and rates[5] == pytest.approx(0.2)


def test_step_schedule_uses_largest_key_not_after_t():
    scheduler = StepDropRateScheduler(0.3, {5: 0.1, 2: 0.2, 9: 0.0})
    assert _rates(scheduler, 11) == [0.3, 0.3, 0.2, 0.2, 0.2, 0.1, 0.1, 0.1, 0.1, 0.0, 0.0]


@pytest.mark.parametrize("make", [
    lambda: LinearDropRateScheduler(0.5, 0.0, 10),
    lambda: CosineAnnealingDropRateScheduler(0.5, 0.0, 10),
    lambda: StepDropRateScheduler(0.5, {3: 0.25}),
])
def test_state_dict_round_trip_resumes_the_schedule(make):
    uninterrupted = make()
    want = _rates(uninterrupted, 8)
    first = make()
    got = _rates(first, 4)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert got + _rates(resumed, 4) == want


@pytest.mark.parametrize("make, argument", [
    (lambda: LinearDropRateScheduler(1.2, 0.0, 10), "initial_drop_rate"),
    (lambda: LinearDropRateScheduler(0.1, float("nan"), 10), "final_drop_rate"),
    (lambda: CosineAnnealingDropRateScheduler(0.1, 0.0, 0), "num_steps"),
    (lambda: CosineAnnealingDropRateScheduler("0.1", 0.0, 5), "initial_drop_rate"),
    (lambda: StepDropRateScheduler(0.1, {2: -0.5}), "drop_rate_schedule\\[2\\]"),
    (lambda: StepDropRateScheduler(0.1, {-1: 0.5}), "drop_rate_schedule keys"),
    (lambda: StepDropRateScheduler(0.1, [0.5]), "drop_rate_schedule must be a mapping"),
])
def test_bad_arguments_name_the_argument(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()
