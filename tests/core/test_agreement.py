"""Ranks that disagree get an error within seconds, never a silent divergence, a hang or a backend abort.

One spawn of 2 gloo ranks (process-group timeout 60 s) runs every scenario in turn; each
scenario builds fresh models, so an error in one leaves the next unaffected. The results
carry each rank's error message and how long it took to arrive.
"""

import time

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dropgrad_dist import DropGrad, DropGradHookState, dropgrad_hook, keep_mask
from dropgrad_dist.testing import run_on_ranks

pytestmark = pytest.mark.distributed  # every test here starts several processes

PG_TIMEOUT = 60.0  # seconds; every error must arrive well inside it


class Net(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ComplexNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter(torch.randn(3, 5, dtype=torch.complex64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x


def _batch(rank: int, step: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(100 * step + rank)).to(dtype)


def _ddp(dtype: torch.dtype = torch.float32) -> DDP:
    return DDP(Net(dtype), bucket_cap_mb=0.0005)  # several buckets


def _train(rank: int, ddp: DDP, opt: torch.optim.Optimizer, steps: int, skip_on: tuple[int, int] | None = None) -> None:
    for step in range(steps):
        ddp(_batch(rank, step)).square().mean().backward()
        if (rank, step) != skip_on:  # this rank misses one optimizer step
            opt.step()
        opt.zero_grad()


def _wrapper_seed(rank: int) -> None:
    ddp = _ddp()
    _train(rank, ddp, DropGrad(torch.optim.SGD(ddp.parameters(), lr=0.1), 0.5, seed=rank, model=ddp), 2)


def _wrapper_loaded_elsewhere(rank: int) -> None:
    ddp = _ddp()
    opt = DropGrad(torch.optim.SGD(ddp.parameters(), lr=0.1), 0.5, model=ddp)
    _train(rank, ddp, opt, 2)
    if rank == 1:  # only one rank resumes from a checkpoint taken at another step
        state = opt.dropgrad_state_dict()
        state["step_index"] = 9
        opt.load_dropgrad_state_dict(state)
    _train(rank, ddp, opt, 2)


def _fsdp_rates(rank: int) -> None:
    from torch.distributed.fsdp import fully_shard

    model = Net()
    fully_shard(model)
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), 0.5 if rank == 0 else 0.25, model=model)
    model(_batch(rank, 0)).square().mean().backward()
    opt.step()


def _hook_skip(rank: int, communication: str) -> None:
    ddp = _ddp()
    DropGradHookState(ddp, 0.5, communication=communication).register()
    _train(rank, ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), 4, skip_on=(1, 1))


def _hook_loaded_elsewhere(rank: int) -> None:
    ddp = _ddp()
    state = DropGradHookState(ddp, 0.5, communication="compact")
    state.register()
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    _train(rank, ddp, opt, 2)
    if rank == 0:
        saved = state.state_dict()
        saved["step_index"] = 0
        state.load_state_dict(saved)
    _train(rank, ddp, opt, 2)


def _hook_and_wrapper(rank: int) -> None:
    ddp = _ddp()
    DropGradHookState(ddp, 0.5).register()
    _train(rank, ddp, DropGrad(torch.optim.SGD(ddp.parameters(), lr=0.1), 0.5, model=ddp), 1)


def _hook_registered_by_ddp_and_wrapper(rank: int) -> None:
    """torch's own registration skips state.register: the hook claims its parameters when it runs."""
    ddp = _ddp()
    ddp.register_comm_hook(DropGradHookState(ddp, 0.5), dropgrad_hook)
    _train(rank, ddp, DropGrad(torch.optim.SGD(ddp.parameters(), lr=0.1), 0.5, model=ddp), 1)


def _hook_double_step(rank: int, communication: str) -> None:
    ddp = _ddp()
    DropGradHookState(ddp, 0.5, communication=communication).register()
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(3):
        ddp(_batch(rank, step)).square().mean().backward()
        opt.step()
        if (rank, step) == (1, 0):  # this rank steps the same gradients twice
            opt.step()
        opt.zero_grad()


def _hook_rate_assigned_on_one_rank(rank: int) -> None:
    ddp = _ddp()
    state = DropGradHookState(ddp, 0.5)
    state.register()
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    _train(rank, ddp, opt, 1)
    if rank == 0:
        state.drop_rate = 0.25
    _train(rank, ddp, opt, 1)


def _hook_sparse(rank: int) -> None:
    torch.manual_seed(0)
    ddp = DDP(nn.Embedding(10, 4, sparse=True))
    DropGradHookState(ddp, 0.5).register()
    ddp(torch.tensor([rank, 3])).sum().backward()


SCENARIOS = {
    "wrapper: different seeds": _wrapper_seed,
    "wrapper: one rank loads another step": _wrapper_loaded_elsewhere,
    "fsdp2 wrapper: different rates": _fsdp_rates,
    "hook dense: one rank skips a step": lambda rank: _hook_skip(rank, "dense"),
    "hook compact: one rank skips a step": lambda rank: _hook_skip(rank, "compact"),
    "hook compact: one rank loads a checkpoint": _hook_loaded_elsewhere,
    "hook and wrapper on the same gradients": _hook_and_wrapper,
    "hook by ddp.register_comm_hook and wrapper": _hook_registered_by_ddp_and_wrapper,
    "hook dense: one rank steps twice": lambda rank: _hook_double_step(rank, "dense"),
    "hook compact: one rank steps twice": lambda rank: _hook_double_step(rank, "compact"),
    "hook: one rank assigns another drop_rate": _hook_rate_assigned_on_one_rank,
    "hook: sparse gradients": _hook_sparse,
}


def _fp64_and_complex(rank: int) -> dict:
    """Compact mode keeps huge finite fp64 gradients finite; complex parameters are masked per number."""
    ddp = _ddp(torch.float64)
    state = DropGradHookState(ddp, 0.5, communication="compact", seed=3)
    state.register()
    (ddp(_batch(rank, 0, torch.float64)).square().mean() * 1e300).backward()
    huge_finite = all(bool(torch.isfinite(p.grad).all()) for p in ddp.parameters())

    torch.manual_seed(0)
    complex_model = ComplexNet()
    ddp_complex = DDP(complex_model)
    DropGradHookState(ddp_complex, 0.5, seed=3).register()
    ddp_complex(torch.tensor(float(rank + 1))).abs().square().sum().backward()
    plain = ComplexNet()
    (plain(torch.tensor(1.0)).abs().square().sum() * 2.5).backward()  # the mean over ranks of (rank + 1)**2
    keep = keep_mask(15, seed=3, step=0, key="weight", rate=0.5).view(3, 5)
    expected = torch.where(keep, plain.weight.grad * 2.0, 0.0)  # kept coordinates x 1/(1-p)
    complex_ok = torch.allclose(complex_model.weight.grad, expected)
    return {"huge_finite": huge_finite, "complex_ok": complex_ok}


def _run_scenarios(rank: int, world_size: int) -> dict:
    results = {}
    for name, scenario in SCENARIOS.items():
        start = time.perf_counter()
        try:
            scenario(rank)
            error = None
        except Exception as err:  # the scenario's expected error (or a wrong one: the test says which)
            error = f"{type(err).__name__}: {err}"
        results[name] = {"error": error, "seconds": time.perf_counter() - start}
    results["fp64 and complex"] = _fp64_and_complex(rank)
    return results


@pytest.fixture(scope="module")
def outcomes():
    return run_on_ranks(_run_scenarios, 2, timeout=240, pg_timeout=PG_TIMEOUT)


@pytest.mark.parametrize("scenario, message", [
    ("wrapper: different seeds", "DropGrad: ranks disagree on 'seed' \\(ranks \\[0\\] vs \\[1\\]\\)"),
    ("wrapper: one rank loads another step", "DropGrad: ranks disagree on 'step_index' \\(ranks \\[0\\] vs \\[1\\]\\)"),
    ("fsdp2 wrapper: different rates", "DropGrad: ranks disagree on 'rates' \\(ranks \\[0\\] vs \\[1\\]\\)"),
    ("hook dense: one rank skips a step", "DropGradHookState: ranks disagree on 'step_index'"),
    ("hook compact: one rank skips a step", "DropGradHookState: ranks disagree on 'step_index'"),
    ("hook compact: one rank loads a checkpoint", "DropGradHookState: ranks disagree on 'step_index'"),
    ("hook and wrapper on the same gradients", "masked by a DropGradHookState .* and again by a DropGrad wrapper"),
    ("hook by ddp.register_comm_hook and wrapper", "masked by a DropGradHookState .* and again by a DropGrad wrapper"),
    ("hook dense: one rank steps twice",
     "DropGradHookState: ranks disagree on 'optimizer.step\\(\\) calls since the last backward' "
     "\\(ranks \\[0\\] vs \\[1\\]\\)"),
    ("hook compact: one rank steps twice",
     "DropGradHookState: ranks disagree on 'optimizer.step\\(\\) calls since the last backward' "
     "\\(ranks \\[0\\] vs \\[1\\]\\)"),
    ("hook: one rank assigns another drop_rate",
     "DropGradHookState: ranks disagree on 'rates' \\(ranks \\[0\\] vs \\[1\\]\\)"),
    ("hook: sparse gradients", "does not support sparse gradients"),
])
def test_every_rank_gets_a_clear_error_within_seconds(outcomes, scenario, message):
    for rank, result in enumerate(outcomes):
        outcome = result[scenario]
        assert outcome["error"] is not None, f"rank {rank}: no error"
        assert __import__("re").search(message, outcome["error"]), f"rank {rank}: {outcome['error']}"
        assert outcome["seconds"] < PG_TIMEOUT / 2, f"rank {rank} waited {outcome['seconds']:.1f} s"


def test_compact_keeps_huge_finite_fp64_gradients_and_complex_parameters_are_masked_per_number(outcomes):
    for result in outcomes:
        assert result["fp64 and complex"] == {"huge_finite": True, "complex_ok": True}


def _hook_on_rank_zero_only(rank: int, world_size: int) -> None:
    ddp = _ddp()
    if rank == 0:
        DropGradHookState(ddp, 0.5).register()
    for step in range(3):
        ddp(_batch(rank, step)).square().mean().backward()


def test_one_rank_without_the_hook_is_a_backend_error_within_seconds_not_a_hang():
    """No code of ours runs on a rank without the hook, so nothing can name it: the collectives stop
    pairing up (the agreement check on one rank, a bucket all-reduce on the other) and gloo aborts
    the rank whose expected size differs. Documented in the README; NCCL would hang until the timeout."""
    start = time.perf_counter()
    # Which rank reports first varies: the aborted one (SIGABRT) or its peer (connection reset).
    with pytest.raises(RuntimeError, match="died with exit code -6 without a result|Connection reset by peer"):
        run_on_ranks(_hook_on_rank_zero_only, 2, timeout=120, pg_timeout=PG_TIMEOUT)
    assert time.perf_counter() - start < PG_TIMEOUT / 2
