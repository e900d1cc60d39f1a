"""The DDP communication hook: 2 real gloo ranks against a 1-process DropGrad on the same global batch.

Each spawn costs a few seconds, so one spawned run trains every configuration (module-scoped
fixture) and the parametrized tests read its results. Ranks use the eager mask backend: it is
bitwise identical to the compiled one (tested with the engine) and needs no compilation; the
``*-native`` compact runs use the native pack/unpack kernels and must match their eager twin bitwise.
"""

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from dropgrad_dist import (
    DropGrad,
    DropGradHookState,
    LinearDropRateScheduler,
    dropgrad_hook,
    dropgrad_wrapper,
    keep_mask,
    mask_backend,
    set_mask_backend,
)
from dropgrad_dist.testing import run_on_ranks

STEPS = 20
SEED = 7
ROOT = Path(__file__).resolve().parents[2]

# name -> settings; every one is trained on 2 DDP ranks and by a 1-process DropGrad
CONFIGS = {
    "dense-sgd-schedule": dict(comm="dense", opt="sgd", schedule=True),
    "dense-adam": dict(comm="dense", opt="adam"),
    "compact-sgd": dict(comm="compact", opt="sgd"),
    "compact-adam-schedule": dict(comm="compact", opt="adam", schedule=True),
    "dense-sgd-no_sync": dict(comm="dense", opt="sgd", micro=3),
    "compact-adam-no_sync": dict(comm="compact", opt="adam", micro=2),
    "dense-adam-static_graph": dict(comm="dense", opt="adam", ddp=dict(static_graph=True)),
    "compact-sgd-static_graph-bucket_view": dict(comm="compact", opt="sgd",
                                                 ddp=dict(static_graph=True, gradient_as_bucket_view=True)),
    "compact-adam-find_unused": dict(comm="compact", opt="adam", unused=True,
                                     ddp=dict(find_unused_parameters=True)),
    "wrapper-bf16_compress_hook": dict(comm="dense", opt="sgd", wrap_bf16=True),
    "compact-bf16-grads": dict(comm="compact", opt="sgd", dtype=torch.bfloat16),
    "dense-fp16-grads": dict(comm="dense", opt="sgd", dtype=torch.float16),
    "compact-fp16-grads": dict(comm="compact", opt="sgd", dtype=torch.float16),
    "compact-fp64-grads": dict(comm="compact", opt="adam", dtype=torch.float64),
}
# Compact runs again with the native pack/unpack kernels ("compiled": a kernel failure raises): bitwise the
# eager (torch-op) run.
NATIVE = {f"{name}-native": name for name, cfg in CONFIGS.items() if cfg["comm"] == "compact"}
CONFIGS.update({native: dict(CONFIGS[eager], backend="compiled") for native, eager in NATIVE.items()})


class Net(nn.Module):
    def __init__(self, unused: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3))
        self.unused = nn.Linear(3, 3) if unused else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _model(cfg: dict) -> nn.Module:
    torch.manual_seed(0)
    return Net(cfg.get("unused", False)).to(cfg.get("dtype", torch.float32))


def _rates(cfg: dict) -> dict:
    if cfg.get("schedule"):
        return dict(params={"body.0.bias": 0.0, "body.2.*": 0.8},
                    drop_rate_scheduler=LinearDropRateScheduler(0.2, 0.6, 10))
    return dict(drop_rate=0.5)


def _optimizer(cfg: dict, params) -> torch.optim.Optimizer:
    if cfg["opt"] == "sgd":
        return torch.optim.SGD(params, lr=0.05)
    return torch.optim.Adam(params, lr=1e-2)


def _micro_batch(step: int, micro: int, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 * step + 100 * micro + rank)
    return torch.randn(4, 6, generator=g).to(dtype), torch.randn(4, 3, generator=g).to(dtype)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, micro: int) -> torch.Tensor:
    return nn.functional.mse_loss(model(x).float(), y.float()) / micro


def _numpy(model: nn.Module) -> list[np.ndarray]:
    return [p.detach().float().numpy().copy() for p in model.parameters()]


def _masks_match(state: DropGradHookState) -> bool:
    """Synchronized gradients are exactly zero where the engine drops, non-zero where it keeps.

    In half precision a kept average can cancel to exactly zero (g0/2 + g1/2 rounded to 8 or
    11 bits), so 1 + 2% of kept coordinates may be zero there; dropped ones never may be non-zero.
    """
    for entry in state.plan.entries:
        grad = entry.param.grad
        if grad is None:
            continue
        keep = keep_mask(grad.numel(), seed=state.seed, step=state.step_index, key=entry.key,
                         rate=state.plan.rate_of(entry))
        nonzero = grad.reshape(-1) != 0
        zero_kept = int((keep & ~nonzero).sum())
        allowed = 0 if grad.dtype == torch.float32 else 1 + int(keep.sum()) // 50
        if bool((nonzero & ~keep).any()) or zero_kept > allowed:
            return False
    return True


def _train_ddp(rank: int, world_size: int, cfg: dict) -> dict:
    set_mask_backend(cfg.get("backend", "eager"))
    try:
        return _train_ddp_steps(rank, cfg)
    finally:
        set_mask_backend("eager")


def _train_ddp_steps(rank: int, cfg: dict) -> dict:
    model = _model(cfg)
    ddp = DDP(model, bucket_cap_mb=0.001, **cfg.get("ddp", {}))  # several buckets
    state = DropGradHookState(ddp, seed=SEED, communication=cfg["comm"], **_rates(cfg))
    state.register(hook=dropgrad_wrapper(bf16_compress_hook) if cfg.get("wrap_bf16") else None)
    opt = _optimizer(cfg, ddp.parameters())
    micro = cfg.get("micro", 1)
    dtype = cfg.get("dtype", torch.float32)
    masks_ok = True
    for step in range(STEPS):
        for m in range(micro):
            x, y = _micro_batch(step, m, rank, dtype)
            if m < micro - 1:
                with ddp.no_sync():
                    _loss(ddp, x, y, micro).backward()
            else:
                _loss(ddp, x, y, micro).backward()
        masks_ok &= _masks_match(state)
        opt.step()
        opt.zero_grad()
    return dict(params=_numpy(model), masks_ok=masks_ok, step_index=state.step_index,
                bytes=(state.bytes_communicated, state.bytes_dense_equivalent),
                unused_grad_is_none=None if model.unused is None else model.unused.weight.grad is None)


def _train_reference(cfg: dict, world_size: int = 2) -> list[np.ndarray]:
    model = _model(cfg)
    opt = DropGrad(_optimizer(cfg, model.parameters()), seed=SEED, model=model, **_rates(cfg))
    micro = cfg.get("micro", 1)
    for step in range(STEPS):
        for m in range(micro):
            xs, ys = zip(*(_micro_batch(step, m, r, cfg.get("dtype", torch.float32)) for r in range(world_size)))
            _loss(model, torch.cat(xs), torch.cat(ys), micro).backward()
        opt.step()
        opt.zero_grad()
    return _numpy(model)


def _train_all(rank: int, world_size: int) -> dict:
    set_mask_backend("eager")
    return {name: _train_ddp(rank, world_size, cfg) for name, cfg in CONFIGS.items()}


@pytest.fixture(scope="module")
def trained() -> list[dict]:
    return run_on_ranks(_train_all, 2)


@pytest.fixture(scope="module", autouse=True)
def eager_masks():
    previous = mask_backend()
    set_mask_backend("eager")
    yield
    set_mask_backend(previous)


def _tolerance(name: str) -> float:
    cfg = CONFIGS[name]
    if cfg.get("wrap_bf16"):
        # bf16 all-reduce rounds each averaged gradient to 8 significant bits (relative error
        # <= 2**-8); over 20 SGD steps of lr 0.05 with |g| < 1 that is < 20 * 0.05 * 2**-8 ~ 4e-3,
        # while a wrong mask moves a coordinate by lr * |g| ~ 1e-2 in a single step.
        return 5e-3
    if cfg.get("dtype") in (torch.bfloat16, torch.float16):
        # The parameters themselves are half precision: one ulp of bf16 at |w| ~ 0.5 is 2**-9.
        return 2e-2 if cfg["dtype"] == torch.bfloat16 else 2e-3
    return 1e-6


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.distributed
def test_ddp_hook_matches_single_process_dropgrad(trained, name):
    rank0, rank1 = trained[0][name], trained[1][name]
    assert rank0["masks_ok"] and rank1["masks_ok"], "synchronized gradients do not follow the engine's masks"
    assert rank0["step_index"] == STEPS
    for a, b in zip(rank0["params"], rank1["params"]):
        np.testing.assert_array_equal(a, b)  # ranks hold identical parameters
    for ddp_param, ref_param in zip(rank0["params"], _train_reference(CONFIGS[name])):
        np.testing.assert_allclose(ddp_param, ref_param, rtol=0, atol=_tolerance(name))
    if rank0["unused_grad_is_none"] is not None:
        assert rank0["unused_grad_is_none"]


@pytest.mark.parametrize("name", list(NATIVE))
@pytest.mark.distributed
def test_native_compact_is_bitwise_the_torch_op_compact(trained, name):
    for rank in (0, 1):
        native, eager = trained[rank][name], trained[rank][NATIVE[name]]
        assert native["bytes"] == eager["bytes"]
        for a, b in zip(native["params"], eager["params"]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.distributed
def test_dense_sends_whole_buckets_and_the_wrapper_counts_nothing(trained):
    sent, dense = trained[0]["dense-adam"]["bytes"]
    assert sent == dense == STEPS * 4 * sum(p.numel() for p in _model({}).parameters())
    assert trained[0]["wrapper-bf16_compress_hook"]["bytes"] == (0, 0)


# -- behaviours: GradScaler, accumulation error, agreement, registration, resume -------------------

def _fresh(comm: str = "dense", seed: int = SEED, **kwargs) -> tuple[nn.Module, DDP, DropGradHookState]:
    model = _model({})
    ddp = DDP(model, bucket_cap_mb=0.001)
    state = DropGradHookState(ddp, seed=seed, communication=comm, **(kwargs or dict(drop_rate=0.5)))
    return model, ddp, state


def _scaler_skip(rank: int, comm: str, set_to_none: bool, backend: str = "eager") -> dict:
    set_mask_backend(backend)
    try:
        return _scaler_steps(rank, comm, set_to_none)
    finally:
        set_mask_backend("eager")


def _scaler_steps(rank: int, comm: str, set_to_none: bool) -> dict:
    model, ddp, state = _fresh(comm)
    state.register()
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    weight = model.body[0].weight
    poison = {}
    if rank == 1:  # a non-finite value on a coordinate dropped at the poisoned step, on one rank only
        def inject(grad: torch.Tensor) -> torch.Tensor:
            if not poison.get("armed"):
                return grad
            keep = keep_mask(grad.numel(), seed=SEED, step=state.step_index, key="body.0.weight", rate=0.5)
            grad = grad.clone()
            grad.view(-1)[int((~keep).nonzero()[0])] = float("inf")
            return grad
        weight.register_hook(inject)
    skipped, steps = [], []
    for step in range(5):
        poison["armed"] = step == 2
        before = weight.detach().clone()
        x, y = _micro_batch(step, 0, rank, torch.float32)
        scaler.scale(_loss(ddp, x, y, 1)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=set_to_none)
        skipped.append(bool(torch.equal(before, weight.detach())))
        steps.append(state.step_index)
    return dict(skipped=skipped, steps=steps, scale=scaler.get_scale(), params=_numpy(model))


def _accumulate_with_sync(rank: int) -> str:
    _, ddp, state = _fresh()
    state.register()
    for m in range(2):
        x, y = _micro_batch(0, m, rank, torch.float32)
        try:
            _loss(ddp, x, y, 2).backward()
        except RuntimeError as err:
            return f"micro-batch {m}: {err}"
    return "no error"


def _disagree(rank: int, comm: str = "dense") -> str:
    _, ddp, state = _fresh(comm, seed=SEED + rank)
    state.register()
    x, y = _micro_batch(0, 0, rank, torch.float32)
    try:
        _loss(ddp, x, y, 1).backward()
    except ValueError as err:
        return str(err)
    return "no error"


def _register_twice(rank: int) -> tuple[str, str]:
    model, ddp, state = _fresh()
    state.register()
    with pytest.raises(RuntimeError) as twice:
        state.register()
    other = _model({})
    with pytest.raises(ValueError) as foreign:
        state.register(DDP(other))
    return str(twice.value), str(foreign.value)


def _run_steps(ddp: DDP, opt: torch.optim.Optimizer, rank: int, steps: range) -> None:
    for step in steps:
        x, y = _micro_batch(step, 0, rank, torch.float32)
        _loss(ddp, x, y, 1).backward()
        opt.step()
        opt.zero_grad()


def _resume(rank: int) -> dict:
    def build():
        model, ddp, state = _fresh("compact", params={"body.2.weight": 0.9},
                                   drop_rate_scheduler=LinearDropRateScheduler(0.1, 0.7, 6))
        return model, ddp, state, torch.optim.Adam(ddp.parameters(), lr=1e-2)

    model, ddp, state, opt = build()
    state.register()
    _run_steps(ddp, opt, rank, range(6))
    uninterrupted = _numpy(model)

    model, ddp, state, opt = build()
    state.register()
    _run_steps(ddp, opt, rank, range(3))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "hook": state.state_dict()}, buffer)
    pickled = pickle.dumps(state)
    assert "process_group" not in state.__getstate__()
    results = {}
    for how in ("state_dict", "pickle"):
        buffer.seek(0)
        checkpoint = torch.load(buffer, weights_only=True)
        model, ddp, state, opt = build()
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["opt"])
        if how == "state_dict":
            state.load_state_dict(checkpoint["hook"])
        else:
            state = pickle.loads(pickled)
            assert state.plan is None and state.step_index == 3
        state.register(ddp)
        _run_steps(ddp, opt, rank, range(3, 6))
        results[how] = _numpy(model)
        results[how + "_step"] = (state.step_index, state.plan.scheduler.step_count)
    return dict(uninterrupted=uninterrupted, **results)


def _bytes_ratio(rank: int, rate: float) -> float:
    """bytes_communicated / bytes_dense_equivalent over 3 steps of a 200k-parameter model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.Tanh(), nn.Linear(512, 128))
    ddp = DDP(model, bucket_cap_mb=0.25)  # a few buckets, one flag element each
    state = DropGradHookState(ddp, rate, communication="compact")
    state.register()
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    for _ in range(3):
        ddp(torch.randn(8, 256)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return state.bytes_communicated / state.bytes_dense_equivalent


def _two_optimizers(rank: int) -> int:
    """Two optimizers over parts of one model step the same gradients: one step of the masks each time."""
    model, ddp, state = _fresh()
    state.register()
    weights = torch.optim.SGD([p for n, p in model.named_parameters() if n.endswith("weight")], lr=0.05)
    biases = torch.optim.Adam([p for n, p in model.named_parameters() if n.endswith("bias")], lr=1e-2)
    for step in range(3):
        x, y = _micro_batch(step, 0, rank, torch.float32)
        _loss(ddp, x, y, 1).backward()
        weights.step()
        biases.step()
        weights.zero_grad()
        biases.zero_grad()
    return state.step_index


def _behaviours(rank: int, world_size: int) -> dict:
    set_mask_backend("eager")
    return dict(
        scaler_dense=_scaler_skip(rank, "dense", set_to_none=False),
        scaler_compact=_scaler_skip(rank, "compact", set_to_none=True),
        scaler_compact_native=_scaler_skip(rank, "compact", set_to_none=True, backend="compiled"),
        accumulate=_accumulate_with_sync(rank),
        disagree=_disagree(rank),
        # compact: the kept counts differ with the seed, so the check must settle before anything is sent
        disagree_compact=_disagree(rank, "compact"),
        register=_register_twice(rank),
        resume=_resume(rank),
        ratios={rate: _bytes_ratio(rank, rate) for rate in (0.5, 0.9)},
        two_optimizers=_two_optimizers(rank),
    )


@pytest.fixture(scope="module")
def behaviours() -> list[dict]:
    return run_on_ranks(_behaviours, 2)


@pytest.mark.parametrize("rate", [0.5, 0.9])
@pytest.mark.distributed
def test_compact_sends_only_kept_coordinates(behaviours, rate):
    ratio = behaviours[0]["ratios"][rate]
    assert ratio == behaviours[1]["ratios"][rate]
    assert abs(ratio - (1 - rate)) < 0.01 * (1 - rate), ratio


@pytest.mark.parametrize("comm", ["dense", "compact", "compact_native"])
@pytest.mark.distributed
def test_non_finite_gradient_on_one_rank_skips_the_step_on_every_rank(behaviours, comm):
    runs = [behaviours[rank][f"scaler_{comm}"] for rank in (0, 1)]
    for run in runs:
        assert run["skipped"] == [False, False, True, False, False]
        assert run["steps"] == [1, 2, 2, 3, 4]  # a skipped step does not advance the masks
        assert run["scale"] == 2.0 ** 7
    for a, b in zip(runs[0]["params"], runs[1]["params"]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.distributed
def test_several_optimizers_on_one_model_advance_the_masks_once_per_step(behaviours):
    assert behaviours[0]["two_optimizers"] == behaviours[1]["two_optimizers"] == 3


@pytest.mark.distributed
def test_accumulating_across_synchronized_micro_batches_raises(behaviours):
    for rank in (0, 1):
        message = behaviours[rank]["accumulate"]
        assert message.startswith("micro-batch 1:") and "no_sync()" in message and "compound" in message


@pytest.mark.distributed
def test_ranks_disagreeing_on_the_seed_raise_naming_field_and_ranks(behaviours):
    for rank in (0, 1):
        for which in ("disagree", "disagree_compact"):
            message = behaviours[rank][which]
            assert "ranks disagree on 'seed' (ranks [0] vs [1])" in message, which
            assert f"seed={SEED + rank}" in message


@pytest.mark.distributed
def test_registering_twice_or_on_another_model_points_to_the_cause(behaviours):
    twice, foreign = behaviours[0]["register"]
    assert "already has a communication hook" in twice and "dropgrad_wrapper" in twice
    assert "not built from" in foreign


@pytest.mark.distributed
def test_resume_from_state_dict_or_pickle_is_bitwise_identical(behaviours):
    for rank in (0, 1):
        run = behaviours[rank]["resume"]
        assert run["state_dict_step"] == run["pickle_step"] == (6, 6)  # schedule in lockstep
        for how in ("state_dict", "pickle"):
            for a, b in zip(run["uninterrupted"], run[how]):
                np.testing.assert_array_equal(a, b)


# -- bad input (no process group needed) ------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    model = _model({})
    with pytest.raises(TypeError, match="model must be a DistributedDataParallel model or a torch.nn.Module"):
        DropGradHookState("model", 0.1)
    with pytest.raises(ValueError, match=r"drop_rate must be a number in \[0, 1\]"):
        DropGradHookState(model, 1.5)
    with pytest.raises(ValueError, match=r"params\['body.0.bias'\] must be a number in \[0, 1\]"):
        DropGradHookState(model, params={"body.0.bias": -0.1})
    with pytest.raises(ValueError, match="'decoder.\\*' matches no parameter"):
        DropGradHookState(model, params={"decoder.*": 0.1})
    with pytest.raises(ValueError, match="communication must be 'dense' or 'compact'"):
        DropGradHookState(model, 0.1, communication="sparse")
    with pytest.raises(TypeError, match="seed must be an int"):
        DropGradHookState(model, 0.1, seed=1.5)
    state = DropGradHookState(model, 0.1)
    with pytest.raises(TypeError, match="needs a torch.nn.parallel.DistributedDataParallel model, got Net"):
        state.register()
    with pytest.raises(TypeError, match="needs a torch.nn.parallel.DistributedDataParallel model, got Net"):
        state.register(model)


def _backward_context_at_hook_collectives(rank, world_size):
    """Per hook: was backward's Python context in thread-local state when it launched collectives?"""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from ..nets import seeded_net
    launched, real_all_reduce = [], dist.all_reduce

    def recording_all_reduce(*args, **kwargs):
        launched.append(torch._C._is_key_in_tls("context"))
        return real_all_reduce(*args, **kwargs)

    dist.all_reduce = recording_all_reduce
    hooks = {"dropgrad_hook dense": ("dense", dropgrad_hook), "dropgrad_hook compact": ("compact", dropgrad_hook),
             "dropgrad_wrapper(allreduce_hook)": ("dense", dropgrad_wrapper(allreduce_hook))}
    seen = {}
    for name, (communication, hook) in hooks.items():
        model = DDP(seeded_net())
        DropGradHookState(model, drop_rate=0.5, seed=SEED, communication=communication).register(model, hook)
        in_backward = []  # the control: a tensor hook in the same backward pass sees the context
        model.module.encoder.weight.register_hook(lambda g: in_backward.append(torch._C._is_key_in_tls("context")))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        launched.clear()
        for _ in range(2):
            model(torch.randn(4, 6)).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        seen[name] = (list(launched), in_backward, torch._C._is_key_in_tls("context"))
    dist.all_reduce = real_all_reduce
    return seen


@pytest.mark.distributed
def test_hook_collectives_do_not_capture_backward_python_context():
    # A gloo work launched with backward's contextvars.Context in thread-local state is released on
    # a gloo thread that must take the GIL; at interpreter exit that aborted about 1 run in 50 of
    # examples/ddp_comm_hook.py ("terminate called without an active exception").
    for seen in run_on_ranks(_backward_context_at_hook_collectives, 2):
        for name, (launched, in_backward, after_backward) in seen.items():
            assert in_backward and all(in_backward), f"{name}: backward no longer stashes its context (control)"
            assert len(launched) >= 4, name  # per step: the agreement check and at least one bucket
            assert not any(launched), f"{name}: collectives launched with backward's context in TLS: {launched}"
            assert not after_backward, f"{name}: the context leaked out of backward"


def test_without_backward_context_sets_the_context_aside_and_puts_it_back():
    from dropgrad_dist.core.collectives import without_backward_context
    marker = object()
    torch._C._stash_obj_in_tls("context", marker)
    try:
        with without_backward_context():
            assert not torch._C._is_key_in_tls("context")
        assert torch._C._get_obj_in_tls("context") is marker
        with pytest.raises(RuntimeError), without_backward_context():
            raise RuntimeError("put back on error too")
        assert torch._C._get_obj_in_tls("context") is marker
    finally:
        torch._C._remove_obj_from_tls("context")
    with without_backward_context():  # outside backward: nothing to set aside
        assert not torch._C._is_key_in_tls("context")
    assert not torch._C._is_key_in_tls("context")


def test_sent_tensors_hold_a_cpp_reference_until_released():
    # The gloo worker must never drop the last C++ reference of a tensor created in Python.
    from dropgrad_dist.core.collectives import SentTensors
    sent, tensor = SentTensors(), torch.zeros(4)
    before = tensor._use_count()
    sent.hold(tensor, torch.zeros(2, device="meta"))  # only CPU tensors are held
    assert tensor._use_count() == before + 1 and len(sent._views) == 1
    sent.release()
    assert tensor._use_count() == before


def test_exit_skipping_finalization_flushes_and_exits_with_the_code():
    script = ("import atexit, sys; from dropgrad_dist.core.collectives import exit_skipping_finalization; "
              "atexit.register(lambda: print('finalized')); print('written', end=''); "
              "print('err', end='', file=sys.stderr); exit_skipping_finalization(3)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert (done.returncode, done.stdout, done.stderr) == (3, "written", "err")


def test_hooks_are_valid_ddp_comm_hooks():
    # DDP inspects annotations at registration: they must be real classes, not strings.
    import inspect
    for hook in (dropgrad_hook, dropgrad_wrapper(bf16_compress_hook)):
        sig = inspect.signature(hook)
        assert sig.parameters["bucket"].annotation is dist.GradBucket
        assert sig.return_annotation == torch.futures.Future[torch.Tensor]


@pytest.mark.distributed
def test_example_script_runs_under_torchrun():
    env = dict(os.environ, PYTHONPATH=str(ROOT), DROPGRAD_MASK_BACKEND="eager", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "examples" / "ddp_comm_hook.py"), "--steps", "4",
         "--communication", "compact"],
        capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    causes = [line for line in result.stderr.splitlines() if any(w in line for w in ("rror", "terminate", "what()"))]
    assert result.returncode == 0, "\n".join(causes[:30]) + result.stderr[-3000:]
    assert "bytes communicated / dense all-reduce: 0." in result.stdout


def test_bench_crossover_follows_the_ring_all_reduce_model():
    from dropgrad_dist.bench.ddp import crossover_gbit_s

    # 2 ranks move B per rank (2(N-1)/N = 1): 5 MB saved at 1 ms extra is 40 Gbit/s; 4 ranks move 1.5 B.
    assert crossover_gbit_s(10e6, 5e6, 1e-3, 2) == pytest.approx(40.0)
    assert crossover_gbit_s(10e6, 5e6, 1e-3, 4) == pytest.approx(60.0)
    assert crossover_gbit_s(10e6, 5e6, -1e-3, 2) == float("inf")  # compact not slower: it wins at any bandwidth
