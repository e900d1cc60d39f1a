"""CUDA paths against their CPU definitions: the Triton kernels, DropGrad under AMP, the DDP hook on
CUDA tensors, GNP/SAM and clipping.

Tests marked ``cuda`` need a CUDA GPU and are skipped, with the reason, without one
(``pytest -m cuda`` runs only them; ``launch/gpu_check.sh`` does). Where a check also means something
on the CPU (the C kernels against the eager definition, a CPU run against the CPU reference), the test
is parametrized over ``device``: its ``cpu`` case runs in the normal suite, so the test logic itself is
exercised without a GPU.
"""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dropgrad_dist import (
    CLIPPING_METHODS,
    SAM,
    DropGrad,
    DropGradHookState,
    GradientClipper,
    GradientNormPenalty,
    LinearDropRateScheduler,
    drop_,
    drop_segments_,
    drop_tensors_,
    mask_backend,
    set_mask_backend,
)
from dropgrad_dist.testing import run_on_ranks

from ..ddp.test_ddp_hook import CONFIGS, SEED, STEPS, _loss, _micro_batch, _model, _optimizer, _rates, _train_reference
from ..dropgrad.test_optim import _batch
from ..gnp.test_gnp import _data
from ..nets import seeded_net
from .test_mask import (
    CFG,
    RATES,
    STARTS,
    _bits,
    _compaction_cases,
    _index_path,
    _pack_path,
    _reference_drop,
    _tensors,
)

HAS_CUDA = torch.cuda.is_available()
NO_CUDA = "needs a CUDA GPU: torch.cuda.is_available() is False"
needs_cuda = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)]
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
KERNEL_SIZES = [1, 7, 1023, (1 << 20) + 3]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal (compared on the CPU); any NaN equals any NaN (payloads depend on the instruction)."""
    a, b = a.cpu(), b.cpu()
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan_a, nan_b = a.isnan(), b.isnan()
    return torch.equal(nan_a, nan_b) and torch.equal(_bits(a.masked_fill(nan_a, 0)), _bits(b.masked_fill(nan_b, 0)))


# ---- the kernels: bitwise the eager definition --------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_equals_the_eager_definition_bitwise(device, dtype, backend):
    gen = torch.Generator().manual_seed(11)
    for size in KERNEL_SIZES:
        values = torch.randn(size, generator=gen).to(dtype)
        for start in (0, (1 << 31) - size // 2):  # the second crosses the salt block at 2**31
            backend("eager")
            want, want_keep = values.clone(), torch.empty(size, dtype=torch.bool)
            drop_(want, start=start, extra_scale=0.5, mask_out=want_keep, **CFG)
            backend("compiled")  # the native kernel of the device (Triton on CUDA); a failure raises
            got, got_keep = values.to(device, copy=True), torch.empty(size, dtype=torch.bool, device=device)
            drop_(got, start=start, extra_scale=0.5, mask_out=got_keep, **CFG)
            assert _same_bits(got, want), f"size {size}, start {start}"
            assert torch.equal(got_keep.cpu(), want_keep), f"size {size}, start {start}"


def _thousand(dtype):
    """1000 tensors: test_mask's edge cases (empty, rates 0 and 1, starts across 2**31) a hundred times."""
    tensors = [t.clone() for t in _tensors(dtype) * 100]
    keys = [f"layers.{k}.weight" for k in range(len(tensors))]
    return tensors, keys, RATES * 100, STARTS * 100


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_table_of_1000_tensors_equals_the_eager_definition(device, dtype, backend):
    tensors, keys, rates, starts = _thousand(dtype)
    want = _reference_drop(tensors, keys, rates, starts, 1 / 3, backend)  # eager, one drop_ per tensor, CPU
    backend("compiled")
    got = [t.to(device, copy=True) for t in tensors]
    drop_tensors_(got, keys=keys, rates=rates, starts=starts, seed=9, step=4, extra_scale=1 / 3)
    for k, (g, w) in enumerate(zip(got, want)):
        assert _same_bits(g, w), f"tensor {k}"
    # The same pieces back to back in one buffer (a DDP bucket), with the keep mask.
    segments = list(zip([t.numel() for t in tensors], keys, starts, rates))
    buffer = torch.cat(tensors)
    backend("eager")
    want_buffer, want_keep = buffer.clone(), torch.empty(buffer.numel(), dtype=torch.bool)
    drop_segments_(want_buffer, segments, seed=9, step=4, extra_scale=1 / 3, mask_out=want_keep)
    assert _same_bits(want_buffer, torch.cat(want))
    backend("compiled")
    got_buffer, got_keep = buffer.to(device, copy=True), torch.empty(buffer.numel(), dtype=torch.bool, device=device)
    drop_segments_(got_buffer, segments, seed=9, step=4, extra_scale=1 / 3, mask_out=got_keep)
    assert _same_bits(got_buffer, want_buffer)
    assert torch.equal(got_keep.cpu(), want_keep)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
def test_a_bf16_tensor_past_2_pow_31_elements_is_masked_across_the_boundary(backend):
    free = torch.cuda.mem_get_info()[0]
    if free < 12 * 2 ** 30:
        pytest.skip(f"needs ~12 GB of free GPU memory for a 4.3 GB bf16 tensor; {free / 2 ** 30:.1f} GB free")
    n = (1 << 31) + (1 << 20) + 3
    big = torch.randn(n, dtype=torch.bfloat16, device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    windows = [(0, 5000), ((1 << 31) - 4099, (1 << 31) + 4101), (n - 5000, n)]
    before = [big[a:b].cpu() for a, b in windows]
    backend("compiled")
    drop_(big, **CFG)  # start 0: the table splits the tensor at the salt block 2**31
    torch.cuda.synchronize()
    backend("eager")
    for (a, b), values in zip(windows, before):
        want = drop_(values.clone(), start=a, **CFG)
        assert _same_bits(big[a:b], want), f"coordinates [{a}, {b})"
    del big
    torch.cuda.empty_cache()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_unpack_round_trip_equals_the_cpu_index_path(device, dtype, backend):
    for case, buffer, segments in _compaction_cases(dtype):
        extra_scale = 1.0 if case == "huge" else 0.5
        received_of = (lambda send: send.clone()) if case == "huge" else (lambda send: send * 3)
        backend("eager")
        want_send, want = _index_path(buffer, segments, received_of, extra_scale)
        backend("compiled")
        got_send, got = _pack_path(buffer.to(device), segments, received_of, extra_scale)
        assert _same_bits(got_send, want_send), case
        assert _same_bits(got, want), case


# ---- the DropGrad wrapper: steps, fp16 GradScaler, bf16 autocast ----------------------------------

def _eager_mask(raw: torch.Tensor, key: str, rate: float, step: int, seed: int) -> torch.Tensor:
    """What the engine's eager definition makes of a gradient, on the CPU."""
    previous = mask_backend()
    set_mask_backend("eager")
    try:
        return drop_(raw.cpu().clone(), seed=seed, step=step, key=key, rate=rate)
    finally:
        set_mask_backend(previous)


def _masked_run(device: str) -> list[torch.Tensor]:
    """4 steps of DropGrad (scheduled and per-parameter rates), checking every mask; the final parameters."""
    model = seeded_net().to(device)
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), seed=5, model=model,
                   params={"*.bias": 0.0}, drop_rate_scheduler=LinearDropRateScheduler(0.6, 0.2, 3))
    for step in range(4):
        x, y = (t.to(device) for t in _batch(step))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        raw = {entry.key: entry.param.grad.detach().clone() for entry in opt.plan.entries}
        opt.mask_gradients_()
        for entry in opt.plan.entries:
            rate = opt.plan.rate_of(entry)
            want = _eager_mask(raw[entry.key], entry.key, rate, step, 5) if rate > 0 else raw[entry.key].cpu()
            assert _same_bits(entry.param.grad, want), (step, entry.key)
        opt.step()
    assert opt.step_index == 4
    return [p.detach().cpu() for p in model.parameters()]


@pytest.mark.parametrize("device", DEVICES)
def test_dropgrad_steps_apply_the_cpu_masks(device):
    for got, want in zip(_masked_run(device), _masked_run("cpu")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_grad_scaler_overflow_still_skips_the_step(device):
    model = seeded_net().to(device)
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), model=model,
                   drop_rate_scheduler=LinearDropRateScheduler(0.5, 0.0, 10))
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 10)

    def scaled_backward(step: int) -> None:
        x, y = (t.to(device) for t in _batch(step))
        with torch.autocast(device, dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()

    for step in range(2):
        scaled_backward(step)
        scaler.step(opt)
        scaler.update()
    assert opt.step_index == 2
    rate, before = opt.drop_rate, [p.detach().clone() for p in model.parameters()]
    scaled_backward(9)
    model.encoder.weight.grad[0, 0] = float("inf")  # overflow on a coordinate the mask may drop
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.step_index == 2 and opt.drop_rate_scheduler.step_count == 2 and opt.drop_rate == rate
    assert scaler.get_scale() == 2.0 ** 9
    scaled_backward(10)  # the next finite step runs
    scaler.step(opt)
    scaler.update()
    assert opt.step_index == 3 and not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_step_masks_and_steps_by_the_cpu_definition(device):
    model = seeded_net().to(device)
    before = {name: p.detach().cpu().clone() for name, p in model.named_parameters()}
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=1.0), drop_rate=0.4, seed=3, model=model)
    x, y = (t.to(device) for t in _batch(0))
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    raw = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    opt.step()
    for name, param in model.named_parameters():
        masked = _eager_mask(raw[name], name, 0.4, 0, 3)
        assert torch.equal(param.detach().cpu(), before[name] - masked), name  # SGD, lr 1: exact
        assert torch.equal(param.detach().cpu()[masked == 0], before[name][masked == 0])
    assert opt.step_index == 1


# ---- the DDP hook: 2 ranks on one device over gloo --------------------------------------------------

DDP_RUNS = ["dense-sgd-schedule", "dense-adam", "compact-sgd", "compact-adam-schedule"]


def _ddp_on(rank: int, world_size: int, device: str) -> dict:
    if device == "cuda":
        torch.cuda.set_device(0)  # both ranks share the one GPU (NCCL would need one GPU per rank)
    set_mask_backend("compiled")  # the native kernels (Triton on CUDA); a failure raises
    results = {}
    for name in DDP_RUNS:
        cfg = CONFIGS[name]
        model = _model(cfg).to(device)
        ddp = DDP(model, bucket_cap_mb=0.001)  # several buckets
        state = DropGradHookState(ddp, seed=SEED, communication=cfg["comm"], **_rates(cfg))
        state.register()
        opt = _optimizer(cfg, ddp.parameters())
        for step in range(STEPS):
            x, y = (t.to(device) for t in _micro_batch(step, 0, rank, torch.float32))
            _loss(ddp, x, y, 1).backward()
            opt.step()
            opt.zero_grad()
        results[name] = dict(params=[p.detach().cpu().numpy() for p in model.parameters()],
                             step_index=state.step_index, on=str(next(model.parameters()).device))
    return results


@pytest.mark.cuda
@pytest.mark.distributed
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)
def test_ddp_hook_dense_and_compact_on_two_ranks_equal_one_process():
    # CUDA only: the CPU case (about 20 s of spawned ranks) is what test_ddp_hook covers.
    device = "cuda"
    ranks = run_on_ranks(_ddp_on, 2, device, timeout=300)
    tolerance = 1e-5  # CUDA matmuls sum in another order than the CPU reference
    for name in DDP_RUNS:
        rank0, rank1 = ranks[0][name], ranks[1][name]
        assert rank0["step_index"] == STEPS and rank0["on"].startswith(device)
        for a, b in zip(rank0["params"], rank1["params"]):
            np.testing.assert_array_equal(a, b)  # ranks hold identical parameters
        for got, want in zip(rank0["params"], _train_reference(CONFIGS[name])):
            np.testing.assert_allclose(got, want, rtol=0, atol=tolerance, err_msg=name)


# ---- GNP/SAM and clipping: one step on the device equals the CPU --------------------------------

PENALTIES = {
    "gnp": lambda m: GradientNormPenalty(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), alpha=0.5, r=0.1,
                                         model=m),
    "sam": lambda m: SAM(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), rho=0.05, model=m),
}


def _penalty_step(device: str, kind: str) -> list[torch.Tensor]:
    model = seeded_net().to(device)
    opt = PENALTIES[kind](model)
    x, y = (t.to(device) for t in _data(0))

    def closure():
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert opt.step_index == 1
    return [loss.detach().cpu()] + [t.detach().cpu() for p in model.parameters() for t in (p, p.grad)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(PENALTIES))
def test_gnp_and_sam_step_equals_the_cpu_within_float_noise(device, kind):
    for got, want in zip(_penalty_step(device, kind), _penalty_step("cpu", kind)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _clip_step(device: str, method: str) -> tuple[dict, list[torch.Tensor]]:
    model = seeded_net().to(device)
    clipper = GradientClipper(method, clipping_level=0.05, beta=0.6 if "rand" in method else None,
                              p_autoclip=0.6, seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = (t.to(device) for t in _data(1))
    nn.functional.mse_loss(model(x), y).backward()
    stats = clipper.clip_(model.parameters())
    opt.step()
    return stats, [t.detach().cpu() for p in model.parameters() for t in (p, p.grad)]


@pytest.mark.parametrize("device", DEVICES)
def test_clipping_step_equals_the_cpu_within_float_noise(device):
    for method in CLIPPING_METHODS:
        (stats, got), (want_stats, want) = _clip_step(device, method), _clip_step("cpu", method)
        assert stats["clipped"] == want_stats["clipped"], method
        assert stats["norm"] == pytest.approx(want_stats["norm"], rel=1e-5), method
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=method)
