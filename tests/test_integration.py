"""prepare_dropgrad in one process: the mode it picks, its handle, and the setups it refuses."""

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from dropgrad_dist import DropGrad, prepare_dropgrad


def _prepared():
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    return accelerator, model, optimizer


def test_single_process_gets_the_step_wrapper_and_a_checkpointable_handle():
    accelerator, model, optimizer = _prepared()
    handle = prepare_dropgrad(accelerator, model, optimizer, drop_rate=0.25, params={"2.bias": 0.0}, seed=7)
    assert handle.mode == "wrapper" and isinstance(optimizer.optimizer, DropGrad)
    for _ in range(2):
        accelerator.backward(model(torch.randn(5, 4)).square().mean())
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    assert handle.step_index == 2
    assert handle.metrics() == {"drop_rate": 0.25, "kept_fraction": 0.75}
    saved = handle.state_dict()
    handle.target.step_index = 0
    handle.load_state_dict(saved)
    assert handle.step_index == 2 and saved["state"]["config"]["seed"] == 7


def test_refuses_unprepared_optimizers_and_unsupported_setups(monkeypatch):
    accelerator, model, optimizer = _prepared()
    with pytest.raises(ValueError, match="optimizer must be the optimizer returned by accelerator.prepare"):
        prepare_dropgrad(accelerator, model, optimizer.optimizer, drop_rate=0.1)
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.DEEPSPEED))
    with pytest.raises(ValueError, match="does not support Accelerate's .*DEEPSPEED"):
        prepare_dropgrad(accelerator, model, optimizer, drop_rate=0.1)


def test_checkpoint_from_another_mode_is_refused():
    accelerator, model, optimizer = _prepared()
    handle = prepare_dropgrad(accelerator, model, optimizer, drop_rate=0.1)
    with pytest.raises(ValueError, match="saved with DropGrad as 'ddp_hook'"):
        handle.load_state_dict({"mode": "ddp_hook", "state": {}})
