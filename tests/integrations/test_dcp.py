"""torch.distributed.checkpoint (DCP): the regularizers' state as one Stateful, tensors only, resharded.

One 4-rank run saves FSDP2 (4-way), HSDP (2x2) and DDP-hook checkpoints (and an ``async_save``)
and resumes each on its own layout (bitwise); one 2-rank run resumes them on FSDP2 2-way and DDP
on 2 ranks; this process resumes the FSDP2 and HSDP ones without any process group. Every resumed
run draws ``keep_mask``'s masks for the continued steps and ends where the uninterrupted run ends.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_state_dict

from dropgrad_dist import ClippedOptimizer, DropGrad, GradientClipper, set_mask_backend
from dropgrad_dist.bench.checkpoint import TrainState
from dropgrad_dist.core import checkpoint as _checkpoint
from dropgrad_dist.integrations.dcp import RegularizerState
from dropgrad_dist.testing import run_on_ranks
from tests.integrations.dcp_common import build, check_masks, full_params, train

SAVED_AT, MORE = 3, 3


# -- one process -------------------------------------------------------------------------------------
def test_state_tensor_round_trips_and_refuses_what_is_not_a_state():
    state = {"format": 1, "parts": {"dropgrad": {"step_index": 7, "config": {"seed": 3}}}}
    tensor = _checkpoint.state_tensor(state, 256)
    assert tensor.dtype == torch.uint8 and tensor.shape == (256,)
    assert _checkpoint.read_state_tensor(tensor, "T", "entry") == state
    with pytest.raises(ValueError, match="over the 8 bytes"):
        _checkpoint.state_tensor(state, 16)
    longer = tensor.clone()
    longer[:8] = torch.tensor(list((300).to_bytes(8, "little")), dtype=torch.uint8)
    with pytest.raises(ValueError, match="declares 300 bytes of JSON in a 256-byte tensor"):
        _checkpoint.read_state_tensor(longer, "T", "entry")
    trailing = tensor.clone()
    trailing[-1] = 1
    with pytest.raises(ValueError, match="bytes after its JSON"):
        _checkpoint.read_state_tensor(trailing, "T", "entry")
    with pytest.raises(ValueError, match="1-D uint8 tensor"):
        _checkpoint.read_state_tensor(tensor.float(), "T", "entry")
    raw = b'{"parts": {"x": NaN}}'
    bad = torch.zeros(64, dtype=torch.uint8)
    bad[:8] = torch.tensor(list(len(raw).to_bytes(8, "little")), dtype=torch.uint8)
    bad[8:8 + len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    with pytest.raises(ValueError, match="'parts.x' holds a non-finite float"):
        _checkpoint.read_state_tensor(bad, "T", "entry")


def _sgd_chain() -> tuple[nn.Module, DropGrad, GradientClipper]:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    clipper = GradientClipper("norm", 1.0)
    return model, DropGrad(ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), clipper), 0.5,
                           model=model), clipper


def test_torch_state_initialization_step_counts_nothing():
    """get_optimizer_state_dict steps an optimizer without state (lr 0, zero gradients): no mask step is taken."""
    model, chain, clipper = _sgd_chain()
    for _ in range(2):
        model(torch.randn(2, 4)).sum().backward()
        chain.step()
        chain.zero_grad()
    get_optimizer_state_dict(model, chain)  # SGD without momentum has no state: torch steps it
    assert (chain.step_index, clipper.step_index) == (2, 2)


def test_set_state_dict_names_what_to_add_and_regularizer_state_lets_it_load():
    model, chain, _ = _sgd_chain()
    with pytest.raises(ValueError, match=r"no 'dropgrad' entry.*RegularizerState\(optimizer\)"):
        set_state_dict(model, chain, model_state_dict=model.state_dict(),
                       optim_state_dict=get_optimizer_state_dict(model, chain))
    RegularizerState(chain)
    set_state_dict(model, chain, model_state_dict=model.state_dict(),
                   optim_state_dict=get_optimizer_state_dict(model, chain))


def test_one_process_resume_is_bitwise_and_a_refused_state_changes_nothing(tmp_path):
    set_mask_backend("eager")
    model, chain, regularizers, dropgrad = build("one")
    train(model, chain, 0, SAVED_AT)
    dcp.save({"train": TrainState(model, chain), "regularizers": regularizers}, checkpoint_id=str(tmp_path / "c"))
    train(model, chain, SAVED_AT, MORE)
    model2, chain2, regularizers2, dropgrad2 = build("one")
    dcp.load({"train": TrainState(model2, chain2), "regularizers": regularizers2}, checkpoint_id=str(tmp_path / "c"))
    assert dropgrad2.step_index == SAVED_AT and chain2.step_index == SAVED_AT
    check_masks(train(model2, chain2, SAVED_AT, MORE), SAVED_AT)
    assert all(torch.equal(a, b) for a, b in zip(full_params(model).values(), full_params(model2).values()))
    # Another seed: refused, naming the field, before any regularizer changes.
    model3, chain3, regularizers3, dropgrad3 = build("one")
    dropgrad3.seed = 12
    with pytest.raises(ValueError, match="seed: checkpoint 11, this run 12"):
        dcp.load({"regularizers": regularizers3}, checkpoint_id=str(tmp_path / "c"))
    assert (chain3.step_index, dropgrad3.step_index, dropgrad3.optimizer.clipper.step_index) == (0, 0, 0)


def test_capacity_is_checked_and_a_full_state_is_refused_when_saving():
    model, chain, clipper = _sgd_chain()
    with pytest.raises(ValueError, match="capacity must be"):
        RegularizerState(chain, capacity=4)
    with pytest.raises(TypeError, match="Restarter: pass model="):
        from dropgrad_dist import Restarter

        RegularizerState(Restarter(2))
    with pytest.raises(ValueError, match="over the 92 bytes"):
        RegularizerState(chain, capacity=100).state_dict()


# -- 4 ranks save, 2 ranks and one process resume ----------------------------------------------------
def _save_on_four(rank: int, world_size: int, root: str) -> dict:
    set_mask_backend("eager")
    finals = {}
    for layout in ("fsdp", "hsdp", "ddp"):
        model, chain, regularizers, _ = build(layout)
        train(model, chain, 0, SAVED_AT)
        app = {"train": TrainState(model, chain), "regularizers": regularizers}
        dcp.save(app, checkpoint_id=os.path.join(root, layout))
        if layout == "fsdp":
            dcp.async_save(app, checkpoint_id=os.path.join(root, "fsdp_async")).result()
        check_masks(train(model, chain, SAVED_AT, MORE), SAVED_AT)
        finals[layout] = {k: v.numpy() for k, v in full_params(model).items()}  # by value through the queue
        # The same layout resumes bitwise.
        model2, chain2, regularizers2, _ = build(layout)
        dcp.load({"train": TrainState(model2, chain2), "regularizers": regularizers2},
                 checkpoint_id=os.path.join(root, layout))
        check_masks(train(model2, chain2, SAVED_AT, MORE), SAVED_AT)
        resumed = full_params(model2)
        assert all(torch.equal(torch.from_numpy(finals[layout][k]), resumed[k]) for k in resumed), \
            f"{layout}: resumed on its own layout, not bitwise the uninterrupted run"
    return finals


def _resume(layout: str, checkpoint: str) -> dict[str, torch.Tensor]:
    model, chain, regularizers, target = build(layout)
    dcp.load({"train": TrainState(model, chain), "regularizers": regularizers}, checkpoint_id=checkpoint)
    assert target.step_index == SAVED_AT
    check_masks(train(model, chain, SAVED_AT, MORE), SAVED_AT)
    return full_params(model)


def _load_on_two(rank: int, world_size: int, root: str) -> dict:
    set_mask_backend("eager")
    return {name: {k: v.numpy() for k, v in _resume(layout, os.path.join(root, name)).items()}
            for name, layout in (("fsdp", "fsdp"), ("fsdp_async", "fsdp"), ("hsdp", "fsdp"), ("ddp", "ddp"))}


def _close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(torch.as_tensor(a[k]), torch.as_tensor(b[k]), rtol=1e-5,
                                                       atol=1e-6) for k in a)


@pytest.mark.distributed
def test_dcp_saved_on_four_ranks_resumes_on_four_two_and_one(tmp_path):
    root = str(tmp_path)
    four = run_on_ranks(_save_on_four, 4, root)[0]
    two = run_on_ranks(_load_on_two, 2, root)[0]
    for name, layout in (("fsdp", "fsdp"), ("fsdp_async", "fsdp"), ("hsdp", "hsdp"), ("ddp", "ddp")):
        assert _close(two[name], four[layout]), f"{name} resumed on 2 ranks differs from the 4-rank run"
    set_mask_backend("eager")
    for name in ("fsdp", "hsdp"):
        assert _close(_resume("one", os.path.join(root, name)), four[name]), f"{name} resumed in 1 process differs"
