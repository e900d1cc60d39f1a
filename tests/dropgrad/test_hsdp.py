"""HSDP: FSDP2 ``fully_shard`` on a 2-D (replicate, shard) mesh of 4 gloo ranks trains like 1 process.

Masks depend on (seed, step, parameter name, global coordinate, rate) and on no mesh
coordinate, so the 2 replicas x 2 shards of a (2, 2) mesh mask exactly the coordinates the
unsharded 1-process model masks, replicas stay bitwise equal, and the gradient norm used for
clipping is summed over the shard dimension only (never over replicas). One spawn runs every
check (4 ranks on a small machine cost ~5 s to start).
"""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dropgrad_dist import ClippedOptimizer, DropGrad, GradientClipper, RankDisagreement, set_mask_backend
from dropgrad_dist.layout.names import canonical_name
from dropgrad_dist.testing import run_on_ranks

from ..fsdp_common import CONFIGS, GLOBAL_BATCH, batch, make_model, reference_masked_ones, reference_params, train

pytestmark = pytest.mark.distributed  # every test here starts several processes

TOL = dict(rtol=1e-5, atol=1e-6)
MASK_KW = dict(drop_rate=0.5, seed=11)
MESH_SHAPE = (2, 2)  # (replicate, shard): rank = replica * 2 + shard
WORLD = MESH_SHAPE[0] * MESH_SHAPE[1]
STEPS = 3
# GradientClipper methods run as DropGrad(ClippedOptimizer(Adam, clipper)): mask, clip, step.
# The levels are below the gradient norms of Tiny's first steps, so every step clips.
CLIPPERS = {"norm": 0.05, "layer_wise": 0.02}


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", MESH_SHAPE, mesh_dim_names=("replicate", "shard"))


def _hsdp_model(mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    fully_shard(model.l1, mesh=mesh)
    fully_shard(model.l3, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full(model: nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """Canonical name -> the whole parameter (or gradient), gathered over the shard dimension."""
    return {canonical_name(n): (p.grad if grads else p).full_tensor() for n, p in model.named_parameters()}


def _local_digest(model: nn.Module) -> str:
    """A digest of this rank's local shards: equal on the two replicas of a shard, bitwise."""
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.to_local().detach().clone().numpy().tobytes())
    return digest.hexdigest()[:16]


def _check_masks(rank: int, mesh) -> list[str]:
    from torch.distributed.tensor import DTensor

    model = _hsdp_model(mesh)
    dropgrad = DropGrad(torch.optim.SGD(model.parameters(), lr=0.0), model=model, **MASK_KW)
    for p in model.parameters():
        p.grad = DTensor.from_local(torch.ones_like(p.to_local()), p.device_mesh, p.placements,
                                    shape=p.shape, stride=p.stride())
    dropgrad.mask_gradients_()
    reference = reference_masked_ones(**MASK_KW)
    shard = rank % MESH_SHAPE[1]
    for name, p in model.named_parameters():
        assert str(p.placements) == "(Replicate(), Shard(dim=0))", p.placements
        assert torch.equal(p.grad.full_tensor(), reference[name]), name
    local = {n: p.grad.to_local().numel() for n, p in model.named_parameters()}
    # (1, 7): shard 1 of either replica holds no row; (5, 7): 3 rows and 2 rows.
    assert local["emb"] == (7 if shard == 0 else 0) and local["l1.weight"] == (21 if shard == 0 else 14), local
    return ["hsdp masks == 1-process masks (uneven, empty shards)"]


def _check_training(rank: int, mesh) -> tuple[list[str], list[str]]:
    """Every fsdp_common config (SGD; Adam + torch clip_grad_norm_; update drop + step skips)."""
    done, digests = [], []
    for config in CONFIGS:
        model = _hsdp_model(mesh)
        train(model, config, rank, WORLD, steps=STEPS)
        reference = reference_params(config, steps=STEPS)
        for name, value in _full(model).items():
            torch.testing.assert_close(value, reference[name], **TOL, msg=name)
        done.append(f"hsdp {config} == 1-process")
        digests.append(_local_digest(model))
    return done, digests


def _clipped_dropgrad(model: nn.Module, method: str) -> DropGrad:
    clipper = GradientClipper(method, CLIPPERS[method], model=model)
    return DropGrad(ClippedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), clipper),
                    drop_rate=0.3, seed=7, model=model)


def _train_clipped(model: nn.Module, dropgrad: DropGrad, rank: int, world_size: int) -> list[dict]:
    per = GLOBAL_BATCH // world_size
    stats = []
    for step in range(STEPS):
        x, y = batch(step)
        nn.functional.mse_loss(model(x[rank * per:(rank + 1) * per]), y[rank * per:(rank + 1) * per]).backward()
        dropgrad.step()
        stats.append(dict(dropgrad.optimizer.clipper.last_stats))
        dropgrad.zero_grad()
    return stats


def _check_clipping(rank: int, mesh) -> tuple[list[str], list[str]]:
    """GradientClipper under HSDP: its norm sums the shard dimension only, so it equals 1 process."""
    done, digests = [], []
    for method in CLIPPERS:
        reference_model = make_model()
        reference_stats = _train_clipped(reference_model, _clipped_dropgrad(reference_model, method), 0, 1)
        model = _hsdp_model(mesh)
        stats = _train_clipped(model, _clipped_dropgrad(model, method), rank, WORLD)
        assert all(s["clipped"] for s in reference_stats), reference_stats  # the check means something
        for got, want in zip(stats, reference_stats):
            # Summed over replicas too, the squared norm would be twice the 1-process one.
            assert got["clipped"] == want["clipped"]
            assert got["norm"] == pytest.approx(want["norm"], rel=1e-5), (method, got, want)
        expected = {canonical_name(n): p.detach() for n, p in reference_model.named_parameters()}
        for name, value in _full(model).items():
            torch.testing.assert_close(value, expected[name], **TOL, msg=(method, name))
        done.append(f"hsdp DropGrad(ClippedOptimizer({method})) == 1-process, same norms")
        digests.append(_local_digest(model))
    return done, digests


def _check_agreement(rank: int, mesh) -> list[str]:
    """The wrapper checks over the world (all 4 ranks) every step; rank 3 with another seed is named."""
    model = _hsdp_model(mesh)
    dropgrad = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.5, model=model)
    started = []
    start = dropgrad._agreement.start
    dropgrad._agreement.start = lambda fields, device=None: started.append(start(fields, device)) or started[-1]
    train(model, "sgd", rank, WORLD, steps=2, dropgrad=dropgrad)
    assert len(started) == 2 and all(p is not None for p in started)  # active: it ran a collective each step
    assert dist.get_world_size(dropgrad._agreement.group) == WORLD

    model = _hsdp_model(mesh)
    odd = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=0.5, model=model,
                   seed=1 if rank == WORLD - 1 else 0)  # replica 1, shard 1
    before = {n: v.clone() for n, v in _full(model).items()}
    with pytest.raises(RankDisagreement) as caught:
        train(model, "sgd", rank, WORLD, steps=1, dropgrad=odd)
    message = str(caught.value)
    assert "DropGrad: ranks disagree on 'seed' (ranks [0, 1, 2] vs [3])" in message, message
    assert f"rank {rank} has seed={1 if rank == WORLD - 1 else 0}" in message, message
    for name, value in _full(model).items():  # raised before the optimizer stepped
        assert torch.equal(value, before[name]), name
    return ["hsdp agreement check runs over all 4 ranks each step", "a rank with another seed is named"]


def _hsdp_all(rank: int, world_size: int) -> dict:
    assert world_size == WORLD
    set_mask_backend("eager")  # same bits as the compiled kernel (mask tests); compiling costs seconds per rank
    mesh = _mesh()
    assert list(mesh.get_coordinate()) == [rank // MESH_SHAPE[1], rank % MESH_SHAPE[1]], mesh.get_coordinate()
    done = _check_masks(rank, mesh)
    trained, train_digests = _check_training(rank, mesh)
    clipped, clip_digests = _check_clipping(rank, mesh)
    done += trained + clipped + _check_agreement(rank, mesh)
    return {"done": done, "digests": train_digests + clip_digests}


def test_hsdp_2x2_mesh_masks_training_clipping_and_agreement_match_one_process():
    results = run_on_ranks(_hsdp_all, WORLD, timeout=240)
    assert all(r["done"] == results[0]["done"] for r in results)
    assert len(results[0]["done"]) == 1 + len(CONFIGS) + len(CLIPPERS) + 2, results[0]["done"]
    # Replicas of a shard hold bitwise equal parameters: rank s and rank 2 + s (shard s).
    for shard in range(MESH_SHAPE[1]):
        assert results[shard]["digests"] == results[MESH_SHAPE[1] + shard]["digests"], shard
    assert results[0]["digests"] != results[1]["digests"]  # the two shards differ (the digest sees shards)
