"""DropGrad on FSDP-sharded gradients: 2 gloo ranks mask and train exactly like 1 process.

Each spawned test groups several checks (spawning costs ~3 s); every rank compares against
the 1-process reference computed in the same process without a process group.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dropgrad_dist import DropGrad, set_mask_backend
from dropgrad_dist.layout.names import canonical_name
from dropgrad_dist.mask.local import drop_local_
from dropgrad_dist.testing import run_on_ranks

from ..fsdp_common import CONFIGS, clip_dense, make_model, reference_masked_ones, reference_params, train

pytestmark = pytest.mark.distributed  # every test here starts several processes

TOL = dict(rtol=1e-5, atol=1e-6)
MASK_KW = dict(drop_rate=0.5, seed=11)


# -- FSDP2 -----------------------------------------------------------------------------------------

def _fsdp2_model() -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    fully_shard(model.l1)
    fully_shard(model.l3)
    fully_shard(model)
    return model


def _check_fsdp2_masks(rank: int) -> list[str]:
    model = _fsdp2_model()
    dropgrad = DropGrad(torch.optim.SGD(model.parameters(), lr=0.0), model=model, **MASK_KW)
    for p in model.parameters():
        p.grad = torch.distributed.tensor.DTensor.from_local(
            torch.ones_like(p.to_local()), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    dropgrad.mask_gradients_()
    reference = reference_masked_ones(**MASK_KW)
    local_numels = {}
    for name, p in model.named_parameters():
        assert str(p.placements) == "(Shard(dim=0),)", p.placements
        local_numels[name] = p.grad.to_local().numel()
        assert torch.equal(p.grad.full_tensor(), reference[name]), name
    # (1, 7): rank 1 holds no row; (5, 7): 3 rows and 2 rows.
    assert local_numels["emb"] == (7 if rank == 0 else 0)
    assert local_numels["l1.weight"] == (21 if rank == 0 else 14)
    return ["fsdp2 masks == 1-process masks (uneven, empty shard)"]


def _check_fsdp2_table_rebuilds(rank: int) -> list[str]:
    """DropGrad's cached piece table over DTensor gradients: reused when FSDP2 reallocates the sharded
    gradients, rebuilt when they are resharded (Shard(0) -> Replicate); masks == the dense definition."""
    from torch.distributed.tensor import DTensor, Replicate

    from dropgrad_dist import drop_

    set_mask_backend("auto")  # the native kernel: the cached path (eager masks tensor by tensor)
    try:
        model = _fsdp2_model()
        dropgrad = DropGrad(torch.optim.SGD(model.parameters(), lr=0.0), model=model, **MASK_KW)
        for step, placement in enumerate(["sharded", "sharded", "replicated"]):
            for p in model.parameters():
                if placement == "sharded":
                    p.grad = DTensor.from_local(torch.ones_like(p.to_local()), p.device_mesh, p.placements,
                                                shape=p.shape, stride=p.stride())
                else:
                    p.grad = DTensor.from_local(torch.ones(p.shape), p.device_mesh, [Replicate()])
            if placement == "sharded":
                dropgrad.step()
            else:  # the step would add a replicated gradient to a sharded parameter: mask only
                dropgrad.mask_gradients_()
            for name, p in model.named_parameters():
                dense = drop_(torch.ones(p.shape), seed=MASK_KW["seed"], step=step, key=canonical_name(name),
                              rate=MASK_KW["drop_rate"])
                assert torch.equal(p.grad.full_tensor(), dense), (step, name)
            assert dropgrad._table.rebuilds == (1 if step < 2 else 2), (step, dropgrad._table.rebuilds)
    finally:
        set_mask_backend("eager")
    return ["fsdp2 cached table: reallocated grads reuse it, a reshard rebuilds it; masks == dense"]


def _check_dtensor_layouts(rank: int) -> list[str]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh = init_device_mesh("cpu", (2,))
    hsdp = init_device_mesh("cpu", (1, 2), mesh_dim_names=("replicate", "shard"))
    layouts = [
        (mesh, (4, 6), [Shard(1)]),
        (mesh, (3, 5, 2), [Shard(1)]),
        (mesh, (5, 3), [Replicate()]),
        (mesh, (7,), [Shard(0)]),
        (mesh, (1, 3), [Shard(0)]),
        (hsdp, (5, 3), [Replicate(), Shard(0)]),
    ]
    for i, (device_mesh, shape, placements) in enumerate(layouts):
        key = f"layout{i}"
        dense = torch.ones(shape)
        drop_local_(dense, key=key, rate=0.5, seed=5, step=2)
        sharded = distribute_tensor(torch.ones(shape), device_mesh, placements)
        drop_local_(sharded, key=key, rate=0.5, seed=5, step=2)
        assert torch.equal(sharded.full_tensor(), dense), (shape, placements)
    # Partial: masking each partial value masks their sum.
    partial = DTensor.from_local(torch.full((4, 3), float(rank + 1)), mesh, [Partial()])
    drop_local_(partial, key="partial", rate=0.5, seed=5, step=2)
    dense = torch.full((4, 3), 3.0)
    drop_local_(dense, key="partial", rate=0.5, seed=5, step=2)
    assert torch.equal(partial.full_tensor(), dense)
    # _StridedShard(0, sf=2) on 2 ranks: rank 0 holds rows 0 and 2, rank 1 rows 1 and 3 (two runs each).
    placement = _StridedShard(0, split_factor=2)
    local = placement._split_tensor(torch.ones(4, 3), 2, with_padding=False)[0][rank].contiguous()
    strided = DTensor.from_local(local, mesh, [placement], shape=(4, 3), stride=(3, 1))
    drop_local_(strided, key="s", rate=0.5, seed=5, step=2)
    dense = torch.ones(4, 3)
    drop_local_(dense, key="s", rate=0.5, seed=5, step=2)
    assert torch.equal(strided.full_tensor(), dense)
    return ["DTensor Shard(1)/Replicate/Partial/2-D mesh masks == dense", "_StridedShard masks == dense"]


def _check_fsdp2_training(rank: int, world_size: int) -> list[str]:
    done = []
    for config in CONFIGS:
        model = _fsdp2_model()
        train(model, config, rank, world_size)
        reference = reference_params(config)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.full_tensor(), reference[canonical_name(name)], **TOL, msg=name)
        done.append(f"fsdp2 {config} == 1-process")
    return done


def _dense_fsdp2(model: nn.Module, grads: bool) -> dict[str, torch.Tensor]:
    """Canonical name -> the full (all-gathered) gradient or parameter."""
    return {canonical_name(n): (p.grad if grads else p).full_tensor() for n, p in model.named_parameters()}


def _save(model: nn.Module, dropgrad: DropGrad, ckpt_dir: str, use_dcp: bool) -> dict:
    """Sharded state dicts: saved with DCP into ``ckpt_dir`` (or returned, copied, without DCP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    # The torch helpers get the wrapped optimizer (they would call DropGrad.step() to initialise
    # state and drop its "dropgrad" key); DropGrad's own state, the same on all ranks, goes beside it.
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, dropgrad.optimizer)}
    if use_dcp:
        dcp.save(state, checkpoint_id=ckpt_dir)
    if dist.get_rank() == 0:
        torch.save(dropgrad.dropgrad_state_dict(), os.path.join(ckpt_dir, "dropgrad.pt"))
    dist.barrier()
    return copy.deepcopy(state)


def _load(model: nn.Module, dropgrad: DropGrad, ckpt_dir: str, use_dcp: bool, saved: dict) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = saved
    if use_dcp:
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, dropgrad.optimizer)}
        dcp.load(state, checkpoint_id=ckpt_dir)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, dropgrad.optimizer, state["optim"])
    dropgrad.load_dropgrad_state_dict(torch.load(os.path.join(ckpt_dir, "dropgrad.pt"), weights_only=True))


def _check_resume(rank: int, world_size: int, make, ckpt_dir: str, dense, clip=clip_dense,
                  use_dcp: bool = True) -> list[str]:
    """Train 2 steps, checkpoint, resume in a fresh model and optimizer: same masks and parameters."""
    config = "adam_clip"
    make_opt, kwargs, _ = CONFIGS[config]
    straight_masks: list = []
    straight = make()
    train(straight, config, rank, world_size, steps=4, clip=clip,
          after_step=lambda _: straight_masks.append({n: g != 0 for n, g in dense(straight, True).items()}))

    first = make()
    saved = _save(first, train(first, config, rank, world_size, steps=2, clip=clip), ckpt_dir, use_dcp)
    resumed = make()
    dropgrad = DropGrad(make_opt(resumed.parameters()), model=resumed, **kwargs)
    _load(resumed, dropgrad, ckpt_dir, use_dcp, saved)
    assert dropgrad.step_index == 2
    resumed_masks: list = []
    train(resumed, config, rank, world_size, steps=2, dropgrad=dropgrad, start_step=2, clip=clip,
          after_step=lambda _: resumed_masks.append({n: g != 0 for n, g in dense(resumed, True).items()}))
    assert len(resumed_masks) == 2
    for after, before in zip(resumed_masks, straight_masks[2:]):
        for name in before:
            assert torch.equal(after[name], before[name]), name
    straight_params = dense(straight, False)
    for name, value in dense(resumed, False).items():
        assert torch.equal(value, straight_params[name]), (name, value - straight_params[name])
    return [f"resume from sharded state dicts{' via DCP' if use_dcp else ''} == uninterrupted run"]


def _fsdp2_all(rank: int, world_size: int, ckpt_dir: str) -> list[str]:
    # Same masks as the compiled kernel (tested in the mask tests); compiling costs ~4 s per rank.
    set_mask_backend("eager")
    return (_check_fsdp2_masks(rank) + _check_fsdp2_table_rebuilds(rank) + _check_dtensor_layouts(rank)
            + _check_fsdp2_training(rank, world_size)
            + _check_resume(rank, world_size, _fsdp2_model, ckpt_dir, _dense_fsdp2))


def test_fsdp2_masks_training_clipping_and_resume_match_one_process(tmp_path):
    results = run_on_ranks(_fsdp2_all, 2, str(tmp_path))
    assert results[0] == results[1]
    assert len(results[0]) == 1 + 1 + 2 + len(CONFIGS) + 1, results[0]


# -- FSDP1 -----------------------------------------------------------------------------------------

def _fsdp1_model(use_orig_params: bool = True) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = make_model()
    cpu = torch.device("cpu")  # FSDP1 needs device_id to run on CPU
    model.l1 = FSDP(model.l1, use_orig_params=use_orig_params, device_id=cpu)
    return FSDP(model, use_orig_params=use_orig_params, device_id=cpu)


def _dense_fsdp1(model: nn.Module, grads: bool) -> dict[str, torch.Tensor]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model, with_grads=grads):
        return {canonical_name(n): (p.grad if grads else p).detach().clone() for n, p in model.named_parameters()}


def _fsdp1_clip(model: nn.Module, max_norm: float) -> torch.Tensor:
    return model.clip_grad_norm_(max_norm)  # FSDP1's own: the norm over all shards


def _check_fsdp1_masks(rank: int) -> list[str]:
    model = _fsdp1_model()
    dropgrad = DropGrad(torch.optim.SGD(model.parameters(), lr=0.0), model=model, **MASK_KW)
    for p in model.parameters():
        if p.numel():
            p.grad = torch.ones_like(p)
    dropgrad.mask_gradients_()
    # Pieces not starting at 0 exist: the flat shard boundary cuts through a parameter.
    partial = sum(1 for start in dropgrad._starts.values() if start > 0)
    assert partial >= (1 if rank == 1 else 0), dropgrad._starts
    reference = reference_masked_ones(**MASK_KW)
    dense = _dense_fsdp1(model, grads=True)
    for name, grad in dense.items():
        assert torch.equal(grad, reference[name]), name
    return ["fsdp1 masks == 1-process masks (partial pieces)"]


def _check_fsdp1_errors() -> list[str]:
    model = _fsdp1_model()
    with pytest.raises(ValueError, match="pass model="):
        DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.1)
    flat = _fsdp1_model(use_orig_params=False)
    with pytest.raises(ValueError, match="use_orig_params=True"):
        DropGrad(torch.optim.SGD(flat.parameters(), lr=0.1), drop_rate=0.1, model=flat)
    return ["fsdp1 without model= / use_orig_params=False rejected"]


def _check_fsdp1_training(rank: int, world_size: int) -> list[str]:
    done = []
    for config in CONFIGS:
        model = _fsdp1_model()
        train(model, config, rank, world_size, clip=_fsdp1_clip)
        reference = reference_params(config)
        for name, value in _dense_fsdp1(model, grads=False).items():
            torch.testing.assert_close(value, reference[name], **TOL, msg=name)
        done.append(f"fsdp1 {config} == 1-process")
    return done


def _fsdp1_all(rank: int, world_size: int, ckpt_dir: str) -> list[str]:
    set_mask_backend("eager")
    # use_dcp=False: torch 2.15's DCP load of this FSDP1 optimizer state raises "Missing key optim.param_groups"
    return (_check_fsdp1_masks(rank) + _check_fsdp1_errors() + _check_fsdp1_training(rank, world_size)
            + _check_resume(rank, world_size, _fsdp1_model, ckpt_dir, _dense_fsdp1, _fsdp1_clip,
                            use_dcp=False))


def test_fsdp1_orig_params_masks_training_clipping_and_resume_match_one_process(tmp_path):
    results = run_on_ranks(_fsdp1_all, 2, str(tmp_path))
    assert results[0] == results[1]
    assert len(results[0]) == 1 + 1 + len(CONFIGS) + 1, results[0]


# -- Accelerate ------------------------------------------------------------------------------------

def _accelerator_on_cpu(fsdp_version: int):
    """Accelerate with its FSDP plugin, forced onto CPU.

    accelerate 1.15 turns the plugin on only for accelerator distributed types (MULTI_GPU, NPU,
    XPU, ...): with 2 CPU processes it silently wraps the model in DDP. Setting the state's
    distributed type to FSDP (and the device to "cpu": FSDP1 rejects Accelerate's "cpu:0") runs
    Accelerate's real FSDP prepare path on CPU.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    extra = {"use_orig_params": True} if fsdp_version == 1 else {}
    plugin = FullyShardedDataParallelPlugin(fsdp_version=fsdp_version, **extra)
    accelerator = Accelerator(fsdp_plugin=plugin, cpu=True)
    assert accelerator.distributed_type == DistributedType.MULTI_CPU  # the silent fallback
    PartialState._shared_state.update(distributed_type=DistributedType.FSDP, device=torch.device("cpu"))
    AcceleratorState().fsdp_plugin = plugin
    assert accelerator.distributed_type == DistributedType.FSDP
    return accelerator


def _accelerate_all(rank: int, world_size: int, fsdp_version: int) -> list[str]:
    set_mask_backend("eager")
    accelerator = _accelerator_on_cpu(fsdp_version)
    config = "adam_clip"
    make_opt, kwargs, _ = CONFIGS[config]
    reference = reference_params(config)
    done = []
    for where in ("around", "inside"):
        accelerator.free_memory()  # forget the previous model: clip_grad_norm_ looks models up by parameters
        model = make_model()
        model, prepared = accelerator.prepare(model, make_opt(model.parameters()))
        if where == "around":  # DropGrad(AcceleratedOptimizer); call dropgrad.step()
            stepper = DropGrad(prepared, model=model, **kwargs)
        else:  # DropGrad replaces the AcceleratedOptimizer's inner optimizer; call prepared.step()
            prepared.optimizer = DropGrad(prepared.optimizer, model=model, **kwargs)
            stepper = prepared
        train(model, config, rank, world_size, dropgrad=stepper,
              clip=lambda m, n: accelerator.clip_grad_norm_(m.parameters(), n))
        dense = _dense_fsdp2(model, False) if fsdp_version == 2 else _dense_fsdp1(model, False)
        for name, value in dense.items():
            torch.testing.assert_close(value, reference[name], **TOL, msg=name)
        done.append(f"accelerate fsdp{fsdp_version} DropGrad {where} the prepared optimizer == 1-process")
    return done


@pytest.mark.parametrize("fsdp_version", [2, 1])
def test_accelerate_fsdp_plugin_prepared_model_matches_one_process(fsdp_version):
    results = run_on_ranks(_accelerate_all, 2, fsdp_version)
    assert results[0] == results[1] and len(results[0]) == 2, results


# -- example -------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", [[], ["--fsdp1"]], ids=["fsdp2", "fsdp1"])
def test_fsdp_example_runs_under_torchrun(flag):
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "DROPGRAD_MASK_BACKEND": "eager"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(root / "examples" / "fsdp_step_wrapper.py"), "--steps", "3", "--width", "16", *flag],
        cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step   2" in proc.stdout and "DropGrad step_index 3" in proc.stdout, proc.stdout
