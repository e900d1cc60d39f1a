"""SAM/ASAM/GNP options on 2 gloo ranks (DDP, FSDP2) against the one-process run on the global batch.

One spawn trains every configuration: ASAM, the normalized mix, periodic and probabilistic steps,
davda54/sam's two-step and closure forms, first-pass RNG replay and BatchNorm statistics.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dropgrad_dist import SAM, GradientNormPenalty
from dropgrad_dist.layout.names import named_parameters
from dropgrad_dist.testing import run_on_ranks

from ..fsdp_common import make_model
from .test_gnp_dist import _full, _half

pytestmark = pytest.mark.distributed  # every test here starts several processes

STEPS = 6
HIDDEN = 6
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class Noisy(nn.Module):
    """A hidden layer with random masking (``torch.rand``: consumed element by element, so rank 1's
    half of a batch draws what the one-process batch draws for its rows) or BatchNorm."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(7, HIDDEN), nn.Linear(HIDDEN, 5)
        self.kind = kind
        self.bn = nn.BatchNorm1d(HIDDEN) if kind == "bn" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.l1(x)
        if self.kind == "bn":
            h = self.bn(h)
        else:
            h = h * (torch.rand(h.shape) > 0.5) * 2.0
        return self.l2(torch.tanh(h))


def _model(config: str) -> nn.Module:
    return Noisy(config) if config in ("rng", "bn") else make_model()


def _wrap(model: nn.Module, layout: str) -> nn.Module:
    if layout == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, broadcast_buffers=False)  # each rank's BN statistics are its own
    if layout == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.l1)
        return fully_shard(model)
    return model


def _optimizer(config: str, model: nn.Module) -> torch.optim.Optimizer:
    sgd = lambda: torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # noqa: E731
    if config == "davda54_two_step":
        return SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    if config == "davda54_closure":
        return SAM(model.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, lr=0.1, momentum=0.9)
    if config == "asam":
        return SAM(sgd(), rho=0.5, adaptive=True, model=model)
    if config == "every":
        return SAM(sgd(), rho=0.05, every=2, model=model)
    if config == "bn":
        return SAM(sgd(), rho=0.05, model=model)
    options = {"normalized": dict(mix="normalized"), "probability": dict(probability=0.5, seed=3)}.get(config, {})
    return GradientNormPenalty(sgd(), alpha=0.6, r=0.05, model=model, **options)


def _loss(model: nn.Module, config: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if config == "bn" and len(x) == 8:  # one process: BatchNorm per half, as each rank normalizes its own
        return (nn.functional.mse_loss(model(x[:4]), y[:4]) + nn.functional.mse_loss(model(x[4:]), y[4:])) / 2
    return nn.functional.mse_loss(model(x), y)


def train(config: str, layout: str = "single", rank: int = 0, world_size: int = 1) -> dict:
    model = _wrap(_model(config), layout)
    opt = _optimizer(config, model)
    thetas, first_pass_stats = [], None
    for step in range(STEPS):
        x, y = _half(step, rank, world_size)
        thetas.append(_full(model, layout))
        if config == "rng":
            torch.manual_seed(500 + step)
            if rank == 1:
                torch.rand(4, HIDDEN)  # what rank 0's rows draw in the one-process batch
        if config.startswith("davda54"):  # davda54/sam's README loops
            loss = _loss(model, config, x, y)
            loss.backward()
            if config == "davda54_two_step":
                opt.first_step(zero_grad=True)
                _loss(model, config, x, y).backward()
                opt.second_step(zero_grad=True)
            else:
                opt.step(lambda: _loss(model, config, x, y).backward())
                opt.zero_grad()
            continue
        passes = []

        def closure():
            loss = _loss(model, config, x, y)
            loss.backward()
            passes.append(1)
            if config == "bn" and len(passes) == 1:
                nonlocal first_pass_stats
                first_pass_stats = _bn_stats(model)
            return loss

        opt.step(closure)
        opt.zero_grad()
    out = {"params": _full(model, layout), "thetas": thetas, "penalty_steps": getattr(opt, "penalty_steps", None)}
    if config == "bn":
        out.update(stats=_bn_stats(model), first_pass_stats=first_pass_stats)
    return out


def _bn_stats(model: nn.Module) -> dict:
    bn = model.module.bn if hasattr(model, "module") else model.bn
    return {name: getattr(bn, name).detach().clone().numpy() for name in BUFFERS}


LAYOUTS = {"asam": ("ddp", "fsdp2"), "normalized": ("ddp", "fsdp2"), "probability": ("ddp",), "every": ("fsdp2",),
           "davda54_two_step": ("ddp", "fsdp2"), "davda54_closure": ("ddp",), "rng": ("ddp",), "bn": ("ddp",)}


def _all(rank: int, world_size: int) -> dict:
    return {(config, layout): train(config, layout, rank, world_size)
            for config, layouts in LAYOUTS.items() for layout in layouts}


@pytest.fixture(scope="module")
def ranks():
    return run_on_ranks(_all, 2, timeout=300)


def _close(got: dict, want: dict, tol: float = 1e-5) -> None:
    for name, value in want.items():
        torch.testing.assert_close(torch.from_numpy(got[name]), torch.from_numpy(value), rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("config, layout", [(c, layout) for c, ls in LAYOUTS.items() for layout in ls])
def test_two_ranks_equal_one_process_on_the_global_batch(ranks, config, layout):
    want = train(config)
    for results in ranks:
        got = results[(config, layout)]
        _close(got["params"], want["params"])
        assert got["penalty_steps"] == want["penalty_steps"]
    if config in ("probability", "every"):
        assert 0 < want["penalty_steps"] < STEPS


def test_replayed_randomness_matters_in_the_distributed_run(ranks):
    """Without the replay the second pass draws new masks: the one-process run is then another run."""
    model = Noisy("rng")
    opt = GradientNormPenalty(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), alpha=0.6, r=0.05,
                              model=model, replay_rng=False)
    for step in range(STEPS):
        x, y = _half(step, 0, 1)
        torch.manual_seed(500 + step)
        opt.step(lambda: _loss(model, "rng", x, y).backward())
        opt.zero_grad()
    fresh = {i.key: i.param.detach().numpy() for i in named_parameters(model)}
    assert any(abs(fresh[k] - v).max() > 1e-4 for k, v in ranks[0][("rng", "ddp")]["params"].items())


def test_each_rank_keeps_the_batch_norm_statistics_of_its_first_passes(ranks):
    """Rank r's running statistics: one update per step, from its half batch at the unperturbed theta_t."""
    reference = train("bn")
    for rank, results in enumerate(ranks):
        got = results[("bn", "ddp")]
        model = Noisy("bn")
        for step, theta in enumerate(reference["thetas"]):
            loaded = model.load_state_dict({k: torch.from_numpy(v) for k, v in theta.items()}, strict=False)
            assert not loaded.unexpected_keys and set(loaded.missing_keys) <= {f"bn.{b}" for b in BUFFERS}
            model(_half(step, rank, 2)[0])
        assert int(got["stats"]["num_batches_tracked"]) == STEPS
        _close(got["stats"], _bn_stats(model))
        _close(got["stats"], got["first_pass_stats"])
