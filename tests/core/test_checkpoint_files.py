"""Checkpoint files that are malformed or hostile: ValueError naming the field, nothing changed.

The JSON rules (size, nesting, integer range, finite floats, a present configuration) live in
``dropgrad_dist.core.checkpoint``; restart sums (safetensors) are checked for dtype, shape,
finiteness, device and consistency with the JSON counters.
"""

import copy
import json

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from dropgrad_dist import Restarter, prepare_regularizers
from dropgrad_dist.core import checkpoint as ckpt

JSON_NAME = "dropgrad_dist_state_0.json"
SUMS_NAME = "dropgrad_dist_state_0_rank0.safetensors"


def _trained(tmp_path):
    """One process, every regularizer with a checkpointed state, 3 steps, saved."""
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    handle = prepare_regularizers(accelerator, model, optimizer, dropgrad=dict(drop_rate=0.25, seed=7),
                                  clipping=dict(method="auto_clip", p_autoclip=0.5),
                                  restarts=dict(first_restart_steps=5, restart_coeff=2.0, max_steps=100))
    for step in range(3):
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(step))
        accelerator.backward(model(x).square().mean())
        optimizer.step()
        optimizer.zero_grad()
    accelerator.save_state(str(tmp_path / "ckpt"))
    return accelerator, model, optimizer, handle


def _snapshot(model, optimizer, handle) -> tuple:
    return (copy.deepcopy(handle.state_dict()), {k: v.clone() for k, v in handle.restart_sums().items()},
            [p.detach().clone() for p in model.parameters()], copy.deepcopy(optimizer.state_dict()))


def _same(a: tuple, b: tuple) -> bool:
    def equal(x, y):
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and torch.equal(x, y)
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(equal(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return isinstance(y, (list, tuple)) and len(x) == len(y) and all(map(equal, x, y))
        return x == y
    return equal(a, b)


def _nudge(model, optimizer, handle) -> None:
    """Move every piece of state away from the checkpoint, so that a partial load would show."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for state in optimizer.optimizer.state.values() if hasattr(optimizer.optimizer, "state") else ():
        for value in state.values():
            if torch.is_tensor(value) and value.is_floating_point():
                value.add_(1.0)
    handle.dropgrad.step_index += 10
    handle.clipper.step_index += 10
    handle.restarter.count += 1


def _deep(levels: int) -> str:
    return "[" * levels + "]" * levels


# (what replaces the field's value in the JSON text, field, message)
JSON_CASES = {
    "deep_array": (("clipping", "history"), _deep(100_000), "'clipping' nests deeper than 32 levels"),
    "deep_object": (("dropgrad", "config"), '{"a":' * 50_000 + "1" + "}" * 50_000, "'dropgrad' nests deeper"),
    "huge_int_history": (("clipping", "history"), "[" + "9" * 400 + "]",
                         "'clipping.history\\[0\\]' holds an integer outside"),
    "huge_int_period": (("restarts", "period"), "1" + "0" * 400, "'restarts.period' holds an integer outside"),
    "infinite_period": (("restarts", "period"), "Infinity", "'restarts.period' holds a non-finite float"),
    "overflowing_period": (("restarts", "period"), "1e400", "'restarts.period' holds a non-finite float"),
    "nan_history": (("clipping", "history"), "[1.0, NaN]", "'clipping.history\\[1\\]' holds a non-finite float"),
    "huge_step_count": (("dropgrad", "step_index"), str(2 ** 64), "'dropgrad.step_index' holds an integer outside"),
    "empty_config": (("clipping", "config"), "{}", "method: missing from the checkpoint's config"),
    "partial_config": (("restarts", "config"), '{"first_restart_steps": 5}',
                       "restart_coeff: missing from the checkpoint's config"),
}


def _write_with(path, field: tuple, text: str) -> None:
    state = json.loads(path.read_text())
    state[field[0]][field[1]] = "@@PLACEHOLDER@@"
    path.write_text(json.dumps(state).replace('"@@PLACEHOLDER@@"', text))


@pytest.mark.parametrize("case", sorted(JSON_CASES))
def test_a_malformed_json_field_is_named_and_nothing_changes(case, tmp_path):
    field, text, message = JSON_CASES[case]
    accelerator, model, optimizer, handle = _trained(tmp_path)
    _write_with(tmp_path / "ckpt" / JSON_NAME, field, text)
    _nudge(model, optimizer, handle)
    before = _snapshot(model, optimizer, handle)
    with pytest.raises(ValueError, match=message):
        accelerator.load_state(str(tmp_path / "ckpt"))
    assert _same(_snapshot(model, optimizer, handle), before)


@pytest.mark.parametrize("where", ["dropgrad", "restarts"])
def test_a_missing_config_is_refused_unless_strict_false(where, tmp_path):
    accelerator, model, optimizer, handle = _trained(tmp_path)
    path = tmp_path / "ckpt" / JSON_NAME
    state = json.loads(path.read_text())
    del state[where]["config"]
    path.write_text(json.dumps(state))
    before = _snapshot(model, optimizer, handle)
    with pytest.raises(ValueError, match="config"):
        accelerator.load_state(str(tmp_path / "ckpt"))
    assert _same(_snapshot(model, optimizer, handle), before)


def test_an_oversized_file_is_refused_before_parsing(tmp_path, monkeypatch):
    accelerator, model, optimizer, handle = _trained(tmp_path)
    path = tmp_path / "ckpt" / JSON_NAME
    monkeypatch.setattr(ckpt, "MAX_JSON_BYTES", path.stat().st_size + 100)
    accelerator.load_state(str(tmp_path / "ckpt"))  # at the limit: loads
    path.write_text(path.read_text() + " " * 200)
    with pytest.raises(ValueError, match="larger than"):
        accelerator.load_state(str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match="over the"):  # and nothing is written that could not be read back
        ckpt.write_json(tmp_path / "big.json", {"history": [1.0] * 10_000})


def test_in_memory_state_dicts_follow_the_same_rules():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    restarter = Restarter(4, 2.0, 100)
    restarter.step(model, torch.optim.SGD(model.parameters(), lr=0.1))
    state = restarter.state_dict(model)
    for period, message in [(float("inf"), "non-finite"), (10 ** 400, "integer outside"), (0.5, "period")]:
        with pytest.raises(ValueError, match=message):
            Restarter(4, 2.0, 100).load_state_dict({**state, "period": period}, model)
    with pytest.raises(ValueError, match="config"):
        Restarter(4, 2.0, 100).load_state_dict({k: v for k, v in state.items() if k != "config"}, model)


def test_restart_periods_that_would_leave_the_float_range_are_refused_at_construction():
    with pytest.raises(ValueError, match="restart_coeff=1e\\+308 with max_steps=2000 would grow the period"):
        Restarter(first_restart_steps=2, restart_coeff=1e308)
    with pytest.raises(ValueError, match="first_restart_steps must be an int in"):
        Restarter(first_restart_steps=10 ** 400)
    restarter = Restarter(first_restart_steps=2, restart_coeff=1e300, max_steps=2000)  # huge but finite: fine
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        restarter.step(model, optimizer)
    assert restarter.restarts == 1 and not restarter.active
    ckpt.write_json("/dev/null", restarter.state_dict())  # still a savable state


# -- restart sums (safetensors) ----------------------------------------------------------------------

def _tamper_sums(path, change) -> None:
    sums = load_file(str(path))
    save_file(change(sums), str(path))


SUM_CASES = {
    "int64": (lambda s: {k: v.to(torch.int64) for k, v in s.items()}, "dtype torch.int64"),
    "float64_for_float32": (lambda s: {k: v.double() for k, v in s.items()}, "expected torch.float32"),
    "float16": (lambda s: {k: v.half() for k, v in s.items()}, "dtype torch.float16"),
    "nan": (lambda s: {k: v.fill_(float("nan")) if k == "0.bias" else v for k, v in s.items()}, "non-finite"),
    "inf": (lambda s: {k: v.fill_(float("inf")) if k == "2.weight" else v for k, v in s.items()}, "non-finite"),
    "shape": (lambda s: {k: v.reshape(-1) if k == "0.weight" else v for k, v in s.items()}, "has shape \\(32,\\)"),
    "missing": (lambda s: {k: v for k, v in s.items() if k != "2.bias"}, "missing \\['2.bias'\\]"),
}


@pytest.mark.parametrize("case", sorted(SUM_CASES))
def test_malformed_restart_sums_are_named_and_nothing_changes(case, tmp_path):
    change, message = SUM_CASES[case]
    accelerator, model, optimizer, handle = _trained(tmp_path)
    _tamper_sums(tmp_path / "ckpt" / SUMS_NAME, change)
    _nudge(model, optimizer, handle)
    before = _snapshot(model, optimizer, handle)
    with pytest.raises(ValueError, match=f"'sums'.*{message}|{message}"):
        accelerator.load_state(str(tmp_path / "ckpt"))
    assert _same(_snapshot(model, optimizer, handle), before)


@pytest.mark.parametrize("count, message", [(0, "holds 4 sums but field 'count' is 0"),
                                            (None, "counts 3 snapshots but field 'sums' is empty")])
def test_sums_and_count_must_agree(count, message, tmp_path):
    accelerator, model, optimizer, handle = _trained(tmp_path)
    if count is None:
        save_file({}, str(tmp_path / "ckpt" / SUMS_NAME))
    else:
        path = tmp_path / "ckpt" / JSON_NAME
        state = json.loads(path.read_text())
        state["restarts"]["count"] = count
        path.write_text(json.dumps(state))
    _nudge(model, optimizer, handle)
    before = _snapshot(model, optimizer, handle)
    with pytest.raises(ValueError, match=message):
        accelerator.load_state(str(tmp_path / "ckpt"))
    assert _same(_snapshot(model, optimizer, handle), before)


def test_a_good_checkpoint_still_resumes_exactly(tmp_path):
    accelerator, model, optimizer, handle = _trained(tmp_path)
    want = _snapshot(model, optimizer, handle)
    _nudge(model, optimizer, handle)
    accelerator.load_state(str(tmp_path / "ckpt"))
    assert _same(_snapshot(model, optimizer, handle), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="moves sums saved from CPU onto a GPU parameter")
def test_restart_sums_go_to_the_parameters_device():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    restarter = Restarter(3, 2.0, 100)
    restarter.step(model, optimizer)
    saved = {**restarter.state_dict(model)}
    saved["sums"] = {k: v.cpu() for k, v in saved["sums"].items()}
    gpu_model = nn.Linear(3, 2).cuda()
    gpu_model.load_state_dict(model.state_dict())
    resumed = Restarter(3, 2.0, 100)
    resumed.load_state_dict(saved, gpu_model)
    assert all(total.device == p.device for total, p in zip(resumed._sums, gpu_model.parameters()))
    gpu_optimizer = torch.optim.SGD(gpu_model.parameters(), lr=0.1)
    assert not resumed.step(gpu_model, gpu_optimizer)  # adds the GPU iterate to the loaded sums
    assert resumed.step(gpu_model, gpu_optimizer)  # and restarts from their mean
