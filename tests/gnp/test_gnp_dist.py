"""GNP/SAM on 2 gloo ranks (DDP, FSDP2, FSDP1) against the one-process run on the global batch.

One spawn trains every configuration for 10 steps; the parent computes the references: the
one-process run (global perturbation), or by hand per replica (local perturbation).
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from torch import nn

from dropgrad_dist import DropGrad, DropGradHookState, GradientNormPenalty, set_mask_backend
from dropgrad_dist.layout.names import named_parameters
from dropgrad_dist.testing import run_on_ranks

from ..fsdp_common import GLOBAL_BATCH, batch, make_model

pytestmark = pytest.mark.distributed  # every test here starts several processes

STEPS = 10
ALPHA, R = 0.6, 0.05


def _half(step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch(step)
    per = GLOBAL_BATCH // world_size
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def _wrap(layout: str) -> nn.Module:
    model = make_model()
    if layout.startswith("ddp"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model)
    if layout == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.l1)
        return fully_shard(model)
    if layout == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        cpu = torch.device("cpu")
        model.l1 = FSDP(model.l1, use_orig_params=True, device_id=cpu)
        return FSDP(model, use_orig_params=True, device_id=cpu)
    return model


def _full(model: nn.Module, layout: str) -> dict[str, torch.Tensor]:
    if layout == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model):
            return {i.key: i.param.detach().clone().numpy() for i in named_parameters(model)}
    return {i.key: (i.param.full_tensor() if hasattr(i.param, "full_tensor") else i.param).detach().clone().numpy()
            for i in named_parameters(model)}


def _regrouped(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``l1``'s parameters (trained from the start) and the others (added as a group half-way)."""
    first = list(getattr(model, "module", model).l1.parameters())
    return first, [p for p in model.parameters() if all(p is not q for q in first)]


def train(config: str, layout: str = "single", rank: int = 0, world_size: int = 1) -> dict:
    """config: "global", "local", "dropgrad" (DropGrad + GNP), "accumulate" (2 micro-batches per pass),
    "regroup" / "local-regroup" (a parameter group added half-way: GNP's buffers are rebuilt)."""
    model = _wrap(layout)
    first, rest = _regrouped(model)
    regroup = config.endswith("regroup")
    base = torch.optim.SGD(first if regroup else model.parameters(), lr=0.1, momentum=0.9)
    if config == "dropgrad":
        if layout.startswith("ddp"):
            communication = "compact" if "compact" in layout else "dense"
            DropGradHookState(model, 0.4, seed=2, communication=communication).register()
        else:
            base = DropGrad(base, 0.4, seed=2, model=model)
    perturbation = "local" if config.startswith("local") else "global"
    opt = GradientNormPenalty(base, alpha=ALPHA, r=R, model=model, perturbation=perturbation)
    for step in range(STEPS):
        x, y = _half(step, rank, world_size)
        if regroup and step == STEPS // 2:
            opt.add_param_group({"params": rest})

        def closure():
            if config != "accumulate":
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss
            half = len(x) // 2  # the documented DDP pattern: no_sync on all but the last micro-batch
            with model.no_sync() if layout.startswith("ddp") else nullcontext():
                first = nn.functional.mse_loss(model(x[:half]), y[:half]) / 2
                first.backward()
            second = nn.functional.mse_loss(model(x[half:]), y[half:]) / 2
            second.backward()
            return first + second

        opt.step(closure)
        opt.zero_grad()
    return _full(model, layout) | ({} if layout == "single" else {"buffer rebuilds": opt._buffers.rebuilds})


def _scaler_overflow_on_one_rank(rank: int) -> dict:
    """fp16-style GradScaler: rank 1's second pass overflows; every rank skips and keeps theta."""
    model = _wrap("ddp")
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = GradientNormPenalty(base, alpha=ALPHA, r=R, model=model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    theta = _full(model, "ddp")
    calls = []

    def closure():
        x, y = _half(0, rank, 2)
        loss = nn.functional.mse_loss(model(x), y)
        if rank == 1 and len(calls) == 1:
            loss = loss * float("inf")
        calls.append(1)
        scaler.scale(loss).backward()
        return loss

    opt.step(closure, scaler=scaler)
    scaler.update()
    after = _full(model, "ddp")
    return {"unchanged": all((after[k] == theta[k]).all() for k in theta), "step_index": opt.step_index,
            "momentum": bool(base.state), "scale": scaler.get_scale()}


LAYOUTS = {"global": ("ddp", "fsdp2", "fsdp1"), "local": ("ddp",), "accumulate": ("ddp", "fsdp2", "fsdp1"),
           "dropgrad": ("ddp", "ddp-compact", "fsdp2"), "regroup": ("ddp", "fsdp2"), "local-regroup": ("ddp",)}


def _all(rank: int, world_size: int) -> dict:
    set_mask_backend("eager")  # bitwise the compiled masks (tested with the engine), without compiling
    results = {(config, layout): train(config, layout, rank, world_size)
               for config, layouts in LAYOUTS.items() for layout in layouts}
    results["scaler"] = _scaler_overflow_on_one_rank(rank)
    return results


@pytest.fixture(scope="module")
def ranks():
    return run_on_ranks(_all, 2, timeout=300)


def _close(got: dict, want: dict, tol: float = 1e-5) -> None:
    for name, value in want.items():
        torch.testing.assert_close(torch.from_numpy(got[name]), torch.from_numpy(value), rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("config, layout", [(c, layout) for c, ls in LAYOUTS.items() if not c.startswith("local")
                                            for layout in ls])
def test_global_perturbation_equals_one_process_on_the_global_batch(ranks, config, layout):
    want = train(config if config in ("dropgrad", "regroup") else "global")
    if config in ("dropgrad", "regroup"):  # the masks (the late group) matter: the reference is not the plain run
        assert any(abs(want[k] - v).max() > 1e-4 for k, v in train("global").items())
    for results in ranks:
        _close(results[(config, layout)], want)
        assert results[(config, layout)]["buffer rebuilds"] == (2 if config == "regroup" else 1)


def _local_reference(regroup: bool = False) -> dict:
    """Per replica: g1_r on its half, g2_r at theta + r g1_r/|g1_r|; step on mean((1-a) g1_r + a g2_r).
    ``regroup``: over ``l1``'s parameters, the others added as a group half-way."""
    model = make_model()
    first, rest = _regrouped(model)
    opt = torch.optim.SGD(first if regroup else model.parameters(), lr=0.1, momentum=0.9)
    for step in range(STEPS):
        if regroup and step == STEPS // 2:
            opt.add_param_group({"params": rest})
        params = [p for group in opt.param_groups for p in group["params"]]
        total = [torch.zeros_like(p) for p in params]
        for rank in range(2):
            x, y = _half(step, rank, 2)
            g1 = torch.autograd.grad(nn.functional.mse_loss(model(x), y), params)
            norm = torch.sqrt(sum(g.square().sum() for g in g1)).item()
            theta = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, g in zip(params, g1):
                    p.add_(g, alpha=R / norm)
            g2 = torch.autograd.grad(nn.functional.mse_loss(model(x), y), params)
            with torch.no_grad():
                for p, t in zip(params, theta):
                    p.copy_(t)
            for acc, a, b in zip(total, g1, g2):
                acc += ((1 - ALPHA) * a + ALPHA * b) / 2
        for p, g in zip(params, total):
            p.grad = g
        opt.step()
    return {i.key: i.param.detach().clone().numpy() for i in named_parameters(model)}


def test_local_perturbation_is_per_replica_and_differs_from_global(ranks):
    want, regrouped = _local_reference(), _local_reference(regroup=True)
    for results in ranks:
        _close(results[("local", "ddp")], want)
        assert any(abs(results[("local", "ddp")][k] - results[("global", "ddp")][k]).max() > 1e-4 for k in want)
        _close(results[("local-regroup", "ddp")], regrouped)  # the rank-average of g1 over rebuilt buffers
        assert results[("local-regroup", "ddp")]["buffer rebuilds"] == 2
        assert any(abs(regrouped[k] - want[k]).max() > 1e-4 for k in want)


def test_an_overflow_on_one_rank_skips_the_step_on_every_rank(ranks):
    for results in ranks:
        scaler = results["scaler"]
        assert scaler["unchanged"] and scaler["step_index"] == 0 and not scaler["momentum"]
        assert scaler["scale"] < 2.0 ** 10
