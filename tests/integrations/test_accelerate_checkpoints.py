"""prepare_dropgrad's Accelerate checkpoints on one process: JSON only (no pickle, a tampered file runs
nothing), another configuration refused unless told, communication validated."""

import json
import os
import pickle

import pytest
import torch
from torch import nn

from dropgrad_dist import prepare_dropgrad


def _accelerated(**kwargs):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    handle = prepare_dropgrad(accelerator, model, optimizer, drop_rate=0.25, seed=7, **kwargs)
    return accelerator, model, optimizer, handle


class _Payload:
    """Unpickling this creates a marker file: proof that a checkpoint ran code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_accelerate_checkpoints_hold_no_pickle_and_a_tampered_file_runs_nothing(tmp_path):
    accelerator, model, optimizer, handle = _accelerated()
    for _ in range(2):
        accelerator.backward(model(torch.randn(5, 4)).square().mean())
        optimizer.step()
        optimizer.zero_grad()
    accelerator.save_state(str(tmp_path / "ckpt"))
    written = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    ours = [name for name in written if name.startswith("dropgrad_dist")]
    assert ours == ["dropgrad_dist_state_0.json"] and not any("custom_checkpoint" in n for n in written)
    state = json.loads((tmp_path / "ckpt" / ours[0]).read_text())
    assert state["dropgrad"]["step_index"] == 2 and state["dropgrad"]["config"]["seed"] == 7

    handle.target.step_index = 0
    accelerator.load_state(str(tmp_path / "ckpt"))
    assert handle.step_index == 2
    marker = tmp_path / "pwned"
    for name in ours:  # every file DropGrad writes
        (tmp_path / "ckpt" / name).write_bytes(pickle.dumps(_Payload(str(marker))))
        with pytest.raises(ValueError, match="is not a JSON checkpoint"):
            accelerator.load_state(str(tmp_path / "ckpt"))
        assert not marker.exists()


def test_prepare_dropgrad_validates_communication_in_every_setup():
    with pytest.raises(ValueError, match="communication must be 'dense' or 'compact', got 'bogus'"):
        _accelerated(communication="bogus")


def test_accelerate_load_refuses_another_configuration_unless_told(tmp_path):
    accelerator, model, optimizer, handle = _accelerated()
    accelerator.save_state(str(tmp_path / "ckpt"))
    path = tmp_path / "ckpt" / "dropgrad_dist_state_0.json"
    state = json.loads(path.read_text())
    state["dropgrad"]["config"]["seed"] = 8
    state["dropgrad"]["step_index"] = 5
    path.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="seed: checkpoint 8, this run 7"):
        accelerator.load_state(str(tmp_path / "ckpt"))
    assert handle.step_index == 0
    handle.strict_load = False
    with pytest.warns(RuntimeWarning):
        accelerator.load_state(str(tmp_path / "ckpt"))
    assert handle.step_index == 5 and handle.target.seed == 7
    assert os.path.exists(path)
