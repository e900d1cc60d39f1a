"""Mask-then-compress DDP hooks (bf16, fp16, PowerSGD; directly and through Accelerate), compiled DDP,
and the hook's per-layout bucket tables across a DDP bucket rebuild.

One spawn of 2 gloo ranks runs every configuration; each rank returns the synchronized gradient of
every step (learning rate 0, so every step sees the same parameters), compared here with the
one-process ``DropGrad`` run on the global batch.
"""

import pickle

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dropgrad_dist import DropGrad, DropGradHookState, compressed_hook, dropgrad_hook, keep_mask
from dropgrad_dist.dropgrad.schedules import LinearDropRateScheduler
from dropgrad_dist.mask import mask_backend, set_mask_backend
from dropgrad_dist.testing import run_on_ranks

pytestmark = pytest.mark.distributed

SEED, RATE, STEPS = 11, 0.5, 4


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y)


def _powersgd_state():
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState

    # Steps 0 and 1 all-reduce uncompressed, steps 2 and 3 compress the 16x6 and 3x16 weights to rank 1.
    return PowerSGDState(process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=2,
                         min_compression_rate=1.0)


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, rank: int, forward=None) -> list[list[np.ndarray]]:
    forward = model if forward is None else forward
    grads = []
    for step in range(STEPS):
        optimizer.zero_grad()
        _loss(forward, *_batch(step, rank)).backward()
        grads.append([p.grad.detach().numpy().copy() for p in model.parameters()])
        optimizer.step()
    return grads


def _direct(rank: int, compress) -> list[list[np.ndarray]]:
    ddp = DDP(_net())
    state = DropGradHookState(ddp, drop_rate=RATE, seed=SEED)
    state.register(ddp, compressed_hook(_powersgd_state() if compress == "powersgd" else compress))
    return _train(ddp, torch.optim.SGD(ddp.parameters(), lr=0.0), rank)


def _accelerated(rank: int, how: str) -> list[list[np.ndarray]]:
    from accelerate import Accelerator
    from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs, DistributedType

    from dropgrad_dist import prepare_regularizers

    kwargs = [DistributedDataParallelKwargs(comm_hook=DDPCommunicationHookType.BF16)] if how == "kwargs" else []
    accelerator = Accelerator(cpu=True, kwargs_handlers=kwargs)
    assert accelerator.distributed_type == DistributedType.MULTI_CPU
    model = _net()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))
    options = dict(drop_rate=RATE, seed=SEED, **({"compress": "bf16"} if how == "option" else {}))
    regularizers = prepare_regularizers(accelerator, model, optimizer, dropgrad=options)
    assert model._comm_hooks[0][0].__qualname__ == "dropgrad_wrapper(bf16_compress_hook)"
    grads = _train(model, optimizer, rank)
    assert regularizers.dropgrad.step_index == STEPS
    return grads


def _compiled(rank: int) -> list[list[np.ndarray]]:
    ddp = DDP(_net())
    DropGradHookState(ddp, drop_rate=RATE, seed=SEED).register(ddp)
    return _train(ddp, torch.optim.SGD(ddp.parameters(), lr=0.0), rank, forward=torch.compile(ddp, backend="eager"))


def _python_reducer_refusals() -> list[str]:
    import torch._dynamo

    messages = []
    with torch._dynamo.config.patch(optimize_ddp="python_reducer"):
        ddp = DDP(_net())
        state = DropGradHookState(ddp, drop_rate=RATE, seed=SEED)
        try:
            state.register(ddp)
        except ValueError as error:
            messages.append(str(error))
        ddp.register_comm_hook(state, dropgrad_hook)  # bypassing register: the hook itself refuses
        try:
            _loss(torch.compile(ddp, backend="eager"), *_batch(0, 0)).backward()
        except RuntimeError as error:
            messages.append(str(error))
    return messages


class _OutOfOrder(nn.Module):
    """Parameters registered in one order, used in another: DDP's bucket rebuild reorders them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.last, self.first = nn.Linear(16, 3), nn.Linear(6, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.tanh(self.first(x)))


# The cached bucket tables under a fixed rate, and under a schedule with per-parameter rates (the
# pieces' rates change every step).
_LAYOUT_RATES = {"fixed": lambda: dict(drop_rate=RATE),
                 "schedule": lambda: dict(params={"first.bias": 0.0, "last.*": 0.8},
                                          drop_rate_scheduler=LinearDropRateScheduler(0.2, 0.6, STEPS))}


def _masks_exact(state: DropGradHookState) -> bool:
    """Synchronized gradients are zero exactly where ``keep_mask`` (``drop_`` per tensor) drops."""
    return all(torch.equal(entry.param.grad.reshape(-1) != 0,
                           keep_mask(entry.param.numel(), seed=SEED, step=state.step_index, key=entry.key,
                                     rate=state.plan.rate_of(entry)))
               for entry in state.plan.entries)


def _layout_steps(state: DropGradHookState, ddp: DDP, rank: int, steps: range) -> tuple[list[int], list[bool]]:
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
    layouts, exact = [], []
    for step in steps:
        optimizer.zero_grad()
        _loss(ddp, *_batch(step, rank)).backward()
        layouts.append(state._tables.builds)
        exact.append(_masks_exact(state))
        optimizer.step()
    return layouts, exact


def _bucket_rebuild(rank: int) -> dict:
    """Every round's zero pattern against the engine's keep mask, across DDP's bucket rebuild, a rate
    schedule, and the state pickled and registered on a new model (a new parameter set), on the native
    kernels through the cached tables ("compiled": a kernel failure raises)."""
    previous = mask_backend()
    set_mask_backend("compiled")
    results = {}
    try:
        for communication in ("dense", "compact"):
            for rates, make_rates in _LAYOUT_RATES.items():
                ddp = DDP(_OutOfOrder(), bucket_cap_mb=0.0001)  # about one parameter per bucket
                state = DropGradHookState(ddp, seed=SEED, communication=communication, **make_rates())
                state.register(ddp)
                layouts, exact = _layout_steps(state, ddp, rank, range(STEPS))
                moved = pickle.loads(pickle.dumps(state))
                new_ddp = DDP(_OutOfOrder(), bucket_cap_mb=0.0001)
                moved.register(new_ddp)
                _, exact_moved = _layout_steps(moved, new_ddp, rank, range(STEPS, STEPS + 2))
                results[communication, rates] = dict(layouts=layouts, exact=exact, exact_moved=exact_moved,
                                                     step_moved=moved.step_index)
    finally:
        set_mask_backend(previous)
    return results


def _all_configs(rank: int, world_size: int) -> dict:
    results = {f"direct-{c}": _direct(rank, c) for c in ("bf16", "fp16", "powersgd")}
    results.update({f"accelerate-{how}": _accelerated(rank, how) for how in ("option", "kwargs")})
    results["compiled-ddpoptimizer"] = _compiled(rank)
    results["python_reducer"] = _python_reducer_refusals()
    results["bucket_rebuild"] = _bucket_rebuild(rank)
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_on_ranks(_all_configs, 2)


@pytest.fixture(scope="module")
def reference() -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
    """The one-process DropGrad run on the global batch: masked gradients and keep masks per step."""
    model = _net()
    optimizer = DropGrad(torch.optim.SGD(model.parameters(), lr=0.0), drop_rate=RATE, seed=SEED, model=model)
    names = [name for name, _ in model.named_parameters()]
    grads, keeps, scales = [], [], []
    for step in range(STEPS):
        # Each rank's own gradient magnitude (the size of what the half-precision all-reduce rounds).
        local = [torch.autograd.grad(_loss(model, *_batch(step, rank)), list(model.parameters())) for rank in range(2)]
        scales.append([(a.abs() + b.abs()).numpy() / 2 for a, b in zip(*local)])
        optimizer.zero_grad()
        x, y = zip(*(_batch(step, rank) for rank in range(2)))
        _loss(model, torch.cat(x), torch.cat(y)).backward()
        keeps.append([keep_mask(p.numel(), seed=SEED, step=step, key=name, rate=RATE).reshape(p.shape).numpy()
                      for name, p in zip(names, model.parameters())])
        optimizer.step()
        grads.append([p.grad.detach().numpy().copy() for p in model.parameters()])
    return grads, keeps, scales


# Half precision rounds twice (each rank's half, their sum): relative 2**-7 (bf16), 2**-10 (fp16).
_TOLERANCE = {"direct-bf16": 1e-2, "direct-fp16": 2e-3, "accelerate-option": 1e-2, "accelerate-kwargs": 1e-2,
              "compiled-ddpoptimizer": 1e-6}


@pytest.mark.parametrize("name", sorted(_TOLERANCE))
def test_composed_and_compiled_hooks_match_the_one_process_run(ranks, reference, name):
    expected, keeps, scales = reference
    tolerance = _TOLERANCE[name]
    for per_rank in ranks:
        for step in range(STEPS):
            for got, want, keep, scale in zip(per_rank[name][step], expected[step], keeps[step], scales[step]):
                assert not np.any(got[~keep]), (name, step)  # exactly zero where dropped
                # Each rank's masked share is rounded, then their sum: the error scales with the shares.
                bound = tolerance * (np.abs(want) + scale / (1 - RATE)) + 1e-7
                assert np.all(np.abs(got - want) <= bound), (name, step, np.abs(got - want).max())


def test_powersgd_composition_drops_the_same_coordinates_on_every_rank(ranks, reference):
    expected, keeps, _ = reference
    run = [per_rank["direct-powersgd"] for per_rank in ranks]
    for step in range(STEPS):
        for k, keep in enumerate(keeps[step]):
            assert all(not np.any(grads[step][k][~keep]) for grads in run)  # zero where dropped
            np.testing.assert_array_equal(run[0][step][k], run[1][step][k])  # one result on every rank
            if step < 2:  # before start_powerSGD_iter PowerSGD all-reduces exactly
                np.testing.assert_allclose(run[0][step][k], expected[step][k], rtol=1e-5, atol=1e-7)
    # From step 2 the weights are rank-1 approximations: not the exact average, but kept coordinates move.
    weight = run[0][3][0]
    assert not np.allclose(weight, expected[3][0], rtol=1e-3) and np.any(weight[keeps[3][0]])


def test_python_reducer_is_refused_with_a_clear_message(ranks):
    for messages in ranks:
        assert len(messages["python_reducer"]) == 2
        assert all("python_reducer" in m and "DDPOptimizer" in m for m in messages["python_reducer"])


@pytest.mark.parametrize("rates", sorted(_LAYOUT_RATES))
@pytest.mark.parametrize("communication", ["dense", "compact"])
def test_bucket_tables_follow_a_ddp_bucket_rebuild(ranks, communication, rates):
    for per_rank in ranks:
        seen = per_rank["bucket_rebuild"][communication, rates]
        # The rebuild after the first iteration brings new layouts (new tables), then none.
        assert seen["layouts"][1] > seen["layouts"][0] and seen["layouts"][-1] == seen["layouts"][1]
        assert all(seen["exact"]), seen["exact"]  # zeros exactly where the engine's mask drops
        # Registered on new parameters, the unpickled state builds new tables and masks on at its step.
        assert all(seen["exact_moved"]) and seen["step_moved"] == STEPS + 2, seen


def test_compress_and_wrapper_arguments_are_checked():
    with pytest.raises(ValueError, match="compress must be 'bf16', 'fp16', 'powersgd'"):
        compressed_hook("int8")
    with pytest.raises(TypeError, match="compress must be"):
        compressed_hook(16)
