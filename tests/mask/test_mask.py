"""The mask engine: layout invariance, compiled == eager, exact bits, statistics, no global RNG."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dropgrad_dist import mask
from dropgrad_dist.mask import MaskStream, backends, compaction, drop_, keep_mask, keep_threshold

CFG = dict(seed=7, step=3, key="blocks.0.attn.weight", rate=0.3)


def _reference_keep(index: int, *, seed: int, step: int, key: str, rate: float,
                    stream: MaskStream = MaskStream.GRAD) -> bool:
    """Pure-Python definition of the mask (unsigned 32-bit arithmetic), independent of torch."""
    block, within = divmod(index, 1 << 31)
    x = (mask._salt(seed, step, mask.key_hash(key), stream, block) + within) & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    signed = x - (1 << 32) if x >= (1 << 31) else x
    return signed < keep_threshold(rate) - (1 << 31)


def _devices():
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("backend_name", ["compiled", "eager"])
def test_engine_matches_pure_python_definition(device, backend_name, backend):
    backend(backend_name)
    starts = [0, 1000, (1 << 31) - 700]  # the last one crosses a salt block boundary
    for start in starts:
        got = keep_mask(3000, start=start, device=device, **CFG).cpu().tolist()
        want = [_reference_keep(start + i, **CFG) for i in range(3000)]
        assert got == want, f"start={start}"


@pytest.mark.parametrize("backend_name", ["compiled", "eager"])
def test_whole_equals_chunks_equals_subranges(backend_name, backend):
    backend(backend_name)
    n = 50_000
    whole = keep_mask(n, **CFG)
    gen = torch.Generator().manual_seed(0)
    cuts = sorted(set(torch.randint(1, n, (12,), generator=gen).tolist() + [1023, 1024, 1025, 2048]))
    bounds = [0, *cuts, n]
    chunks = torch.cat([keep_mask(b - a, start=a, **CFG) for a, b in zip(bounds, bounds[1:])])
    assert torch.equal(whole, chunks)
    for a, b in [(0, 1), (5, 17), (1023, 4097), (31_337, 49_999)]:
        assert torch.equal(keep_mask(b - a, start=a, **CFG), whole[a:b])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_compiled_and_eager_are_bitwise_identical(dtype, backend):
    values = torch.randn(10_000 + 77, generator=torch.Generator().manual_seed(1)).to(dtype)
    results = {}
    for name in ("compiled", "eager"):
        backend(name)
        out = values.clone()
        got_mask = torch.empty(out.numel(), dtype=torch.bool)
        drop_(out, start=12_345, extra_scale=0.5, mask_out=got_mask, **CFG)
        results[name] = (out, got_mask)
    assert torch.equal(results["compiled"][1], results["eager"][1])
    as_bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    assert torch.equal(results["compiled"][0].view(as_bits), results["eager"][0].view(as_bits))


def test_drop_scales_kept_values_and_zeroes_dropped_ones():
    values = torch.randn(5000, generator=torch.Generator().manual_seed(2))
    out = drop_(values.clone(), **CFG)
    kept = keep_mask(5000, **CFG)
    assert torch.equal(out[kept], values[kept] * torch.tensor(1 / (1 - CFG["rate"])))
    assert torch.all(out[~kept] == 0)


def test_rate_zero_is_exact_noop_and_rate_one_gives_zeros_not_nan():
    values = torch.randn(3000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(drop_(values.clone(), seed=0, step=0, key="w", rate=0.0), values)
    dropped = drop_(values.clone(), seed=0, step=0, key="w", rate=1.0)
    assert torch.equal(dropped, torch.zeros_like(values))
    assert keep_mask(100, seed=0, step=0, key="w", rate=1.0).sum() == 0
    assert keep_mask(100, seed=0, step=0, key="w", rate=0.0).all()


def test_non_finite_values_stay_non_finite_even_when_dropped():
    values = torch.full((4096,), float("inf"))
    out = drop_(values.clone(), **CFG)
    assert not torch.isfinite(out).any()  # dropped inf becomes NaN, kept stays inf


def test_kept_sets_are_nested_in_the_rate():
    low = keep_mask(20_000, seed=1, step=0, key="w", rate=0.2)
    high = keep_mask(20_000, seed=1, step=0, key="w", rate=0.7)
    assert torch.all(low | ~high)  # kept at p=0.7 implies kept at p=0.2


def test_threshold_is_exact_to_2_pow_minus_32():
    assert keep_threshold(0.5) == 1 << 31
    assert keep_threshold(0.0) == 1 << 32
    assert keep_threshold(1.0) == 0
    assert abs(mask.keep_probability(0.1) - 0.9) <= 2.0 ** -33


def test_global_rng_is_untouched():
    torch.manual_seed(1234)
    expected = torch.rand(5)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    drop_(torch.randn(10_000, generator=torch.Generator()), **CFG)
    keep_mask(10_000, **CFG)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(5), expected)


def test_key_hash_is_not_salted_per_process():
    code = "from dropgrad_dist.mask import key_hash; print(key_hash('encoder.layers.0.weight'))"
    outs = set()
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                text=True, check=True).stdout.strip())
    assert outs == {str(mask.key_hash("encoder.layers.0.weight"))}


# ---- statistics ---------------------------------------------------------------------------
N = 1 << 20  # under independence a Pearson correlation is ~N(0, 1/N): 4 sigma is 4 / 1024


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.5, 0.9])
def test_kept_fraction_within_four_sigma(rate):
    kept = keep_mask(N, seed=11, step=5, key="w", rate=rate).sum().item()
    sigma = math.sqrt(N * rate * (1 - rate))
    assert abs(kept - N * (1 - rate)) < 4 * sigma


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_masks_are_uncorrelated(rate):
    bound = 4 / math.sqrt(N)
    base = keep_mask(N + 1, seed=1, step=10, key="a.weight", rate=rate)
    pairs = {
        "consecutive steps": keep_mask(N, seed=1, step=11, key="a.weight", rate=rate),
        "two parameters": keep_mask(N, seed=1, step=10, key="b.weight", rate=rate),
        "two seeds": keep_mask(N, seed=2, step=10, key="a.weight", rate=rate),
        "two streams": keep_mask(N, seed=1, step=10, key="a.weight", rate=rate, stream=MaskStream.UPDATE),
        "neighbouring coordinates": base[1:],
    }
    for what, other in pairs.items():
        r = _corr(base[:N], other)
        assert abs(r) < bound, f"{what}: correlation {r:.2e} exceeds {bound:.2e}"


def test_pairs_of_neighbours_pass_chi_square():
    # Chi-square on (keep[i], keep[i+1]) for non-overlapping pairs, 3 dof; 99.9% quantile 16.27.
    m = keep_mask(N, seed=3, step=0, key="w", rate=0.5).view(-1, 2).long()
    counts = torch.bincount(m[:, 0] * 2 + m[:, 1], minlength=4).double()
    expected = m.shape[0] / 4
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.27


def test_bad_engine_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="rate must be a number in \\[0, 1\\]"):
        keep_mask(10, seed=0, step=0, key="w", rate=1.5)
    with pytest.raises(ValueError, match="step must be an int in \\[0, 18446744073709551616\\)"):
        keep_mask(10, seed=0, step=-1, key="w", rate=0.5)
    values = torch.ones(10)
    for kwargs, message in [
        (dict(rate=True), "rate must be a number"),
        (dict(start=True), "start must be an int"),
        (dict(extra_scale=float("nan")), "extra_scale must be a finite number"),
        (dict(extra_scale=float("inf")), "extra_scale must be a finite number"),
        (dict(seed=1 << 64), "seed must be an int in"),
        (dict(seed=-1), "seed must be an int in"),
        (dict(seed=3.0), "seed must be an int in"),
        (dict(step=1 << 64), "step must be an int in"),
        (dict(step=2.0), "step must be an int in"),
    ]:
        args = {**CFG, **kwargs}
        with pytest.raises(ValueError, match=message):
            drop_(values, **args)
    for dtype in (torch.int64, torch.int32, torch.uint8, torch.bool):
        with pytest.raises(ValueError, match="tensor must be floating point or complex"):
            drop_(torch.ones(10, dtype=dtype), **CFG)
    with pytest.raises(ValueError, match="sparse gradients"):
        drop_(torch.ones(4, 4).to_sparse(), **CFG)
    with pytest.raises(TypeError, match="key must be a str"):
        keep_mask(10, seed=0, step=0, key=3, rate=0.5)
    with pytest.raises(ValueError, match="backend must be one of"):
        mask.set_mask_backend("fast")


def test_many_variants_stay_on_the_compiled_path(backend, recwarn):
    backend("auto")
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for numel in (1, 2, 1000, 1024, 1025, 5000, 12_289):
            values = torch.ones(numel, dtype=dtype)
            drop_(values, **CFG)
            drop_(values, mask_out=torch.empty(numel, dtype=torch.bool), **CFG)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in recwarn]
    assert "cpu" not in mask._compile_failed


def test_largest_seed_and_step_are_distinct_from_small_ones():
    # Seeds and steps are 64-bit words of the salt: every accepted value gives its own masks.
    top = keep_mask(4096, seed=(1 << 64) - 1, step=(1 << 64) - 1, key="w", rate=0.5)
    assert not torch.equal(top, keep_mask(4096, seed=0, step=(1 << 64) - 1, key="w", rate=0.5))
    assert not torch.equal(top, keep_mask(4096, seed=(1 << 64) - 1, step=0, key="w", rate=0.5))


@pytest.mark.parametrize("backend_name", ["compiled", "eager"])
def test_a_complex_number_is_one_coordinate(backend_name, backend):
    backend(backend_name)
    values = torch.randn(3000, dtype=torch.complex64, generator=torch.Generator().manual_seed(2))
    keep = keep_mask(3000, **CFG)
    got_mask = torch.empty(3000, dtype=torch.bool)
    masked = drop_(values.clone(), mask_out=got_mask, **CFG)
    assert torch.equal(got_mask, keep)
    scale = 1.0 / (1.0 - CFG["rate"])
    assert torch.equal(masked, values * torch.where(keep, torch.tensor(scale), torch.tensor(0.0)))
    assert bool((masked[~keep] == 0).all()) and bool((masked[keep] != 0).all())


def test_unknown_backend_in_the_environment_is_refused():
    done = subprocess.run([sys.executable, "-c", "import dropgrad_dist"], capture_output=True, text=True,
                          env={**os.environ, "DROPGRAD_MASK_BACKEND": "bogus"})
    assert done.returncode != 0
    assert "$DROPGRAD_MASK_BACKEND must be one of 'auto', 'compiled', 'eager', got 'bogus'" in done.stderr


# ---- many tensors in one call: drop_tensors_ and drop_segments_ ---------------------------
BLOCK_EDGE = (1 << 31) - 700  # a start whose coordinates cross the salt-block boundary at 2**31
SIZES = [0, 1, 7, 1023, 1024, 1025, 2048, 3000, 0, 4097]
STARTS = [0, 5, (1 << 31) - 3, 0, 1 << 31, 1000, BLOCK_EDGE - 300, 3, 0, (3 << 31) - 2000]
RATES = [0.3, 0.0, 0.5, 1.0, 0.1, 1e-12, 1 - 1e-12, 0.9, 0.3, 0.25]  # 1e-12: all kept, scale != 1


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.int64}[t.element_size()]) \
        if not t.is_complex() else torch.view_as_real(t).view(torch.int32 if t.element_size() == 8 else torch.int64)


def _tensors(dtype, generator_seed=5):
    gen = torch.Generator().manual_seed(generator_seed)
    return [torch.randn(n, generator=gen).to(dtype) for n in SIZES]


def _reference_drop(tensors, keys, rates, starts, extra_scale, backend):
    backend("eager")
    out = [t.clone() for t in tensors]
    for t, key, rate, start in zip(out, keys, rates, starts):
        drop_(t, seed=9, step=4, key=key, rate=rate, start=start, extra_scale=extra_scale)
    return out


@pytest.mark.parametrize("backend_name", ["compiled", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_drop_tensors_equals_drop_per_tensor(dtype, backend_name, backend):
    tensors = _tensors(dtype)
    keys = [f"layer.{k}.weight" for k in range(len(tensors))]
    for extra_scale in (1.0, 1 / 3):
        want = _reference_drop(tensors, keys, RATES, STARTS, extra_scale, backend)
        backend(backend_name)
        got = [t.clone() for t in tensors]
        mask.drop_tensors_(got, keys=keys, rates=RATES, starts=STARTS, seed=9, step=4, extra_scale=extra_scale)
        for k, (g, w) in enumerate(zip(got, want)):
            assert torch.equal(_bits(g), _bits(w)), f"tensor {k} (n={SIZES[k]}, start={STARTS[k]}, rate={RATES[k]})"


def test_drop_tensors_mixes_dtypes_shapes_and_complex(backend):
    gen = torch.Generator().manual_seed(6)
    tensors = [torch.randn(33, 65, generator=gen), torch.randn(2, 3, 4, generator=gen).double(),
               torch.randn(1500, generator=gen).bfloat16(), torch.randn(700, dtype=torch.complex64, generator=gen),
               torch.randn(64, 64, generator=gen)]
    keys = ["a", "b", "c", "d", "e"]
    want = _reference_drop(tensors, keys, [0.4] * 5, [0, 7, 0, 100, 0], 1.0, backend)
    backend("auto")
    got = [t.clone() for t in tensors]
    mask.drop_tensors_(got, keys=keys, rates=0.4, starts=[0, 7, 0, 100, 0], seed=9, step=4)
    for g, w in zip(got, want):
        assert torch.equal(_bits(g), _bits(w))


def _bucket(dtype=torch.float32):
    gen = torch.Generator().manual_seed(8)
    segments = [mask.Segment(n, f"p.{k}", start, None if k == 3 else rate)
                for k, (n, start, rate) in enumerate(zip(SIZES, STARTS, RATES))]
    return torch.randn(sum(SIZES), generator=gen).to(dtype), segments


@pytest.mark.parametrize("backend_name", ["compiled", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drop_segments_equals_drop_on_views(dtype, backend_name, backend):
    buffer, segments = _bucket(dtype)
    extra_scale = 0.5
    backend("eager")
    want, want_mask, offset = buffer.clone(), torch.empty(buffer.numel(), dtype=torch.bool), 0
    for numel, key, start, rate in segments:
        view, keep_view = want[offset:offset + numel], want_mask[offset:offset + numel]
        drop_(view, seed=9, step=4, key=key, rate=0.0 if rate is None else rate, start=start,
              extra_scale=extra_scale, mask_out=keep_view)
        offset += numel
    backend(backend_name)
    got, got_mask = buffer.clone(), torch.zeros(buffer.numel(), dtype=torch.bool)
    assert mask.drop_segments_(got, segments, seed=9, step=4, extra_scale=extra_scale, mask_out=got_mask) is got
    assert torch.equal(_bits(got), _bits(want))
    assert torch.equal(got_mask, want_mask)
    unmasked = slice(sum(SIZES[:3]), sum(SIZES[:4]))
    assert got_mask[unmasked].all()  # rate None: kept, only scaled


def test_drop_segments_on_a_2d_buffer_and_without_mask(backend):
    backend("auto")
    buffer = torch.randn(4, 1000, generator=torch.Generator().manual_seed(3))
    got = buffer.clone()
    mask.drop_segments_(got, [(1500, "w", 0, 0.5), (2500, "b", 10, 0.2)], seed=9, step=4)
    want = buffer.clone().view(-1)
    drop_(want[:1500], seed=9, step=4, key="w", rate=0.5)
    drop_(want[1500:], seed=9, step=4, key="b", rate=0.2, start=10)
    assert torch.equal(got.view(-1), want)


def test_native_kernel_is_one_call_and_bumps_versions(backend, monkeypatch):
    backend("compiled")
    tensors = _tensors(torch.float32)
    calls = []
    kernel = mask._native_kernel(tensors[1])
    monkeypatch.setattr(type(kernel), "many", lambda self, table, device: calls.append(table.shape[0]))
    versions = [t._version for t in tensors]
    mask.drop_tensors_(tensors, keys=[str(k) for k in range(10)], rates=RATES, starts=STARTS, seed=1, step=2)
    # One call; empty tensors are left out, the three that cross a salt-block boundary are split in two.
    crossing = sum(n > 0 and start % (1 << 31) + n > 1 << 31 for n, start in zip(SIZES, STARTS))
    assert crossing == 3 and calls == [sum(n > 0 for n in SIZES) + crossing]
    assert all(t._version > v for t, v in zip(tensors, versions))


def test_torch_compile_path_equals_eager(backend, monkeypatch):
    # Devices without a native kernel (or tensor subclasses) compile the torch ops piece by piece.
    monkeypatch.setattr(backends, "_native_kernel", lambda tensor: None)
    tensors = _tensors(torch.float32)[:6]
    keys = [f"k{k}" for k in range(6)]
    want = _reference_drop(tensors, keys, RATES[:6], STARTS[:6], 0.5, backend)
    backend("compiled")
    got = [t.clone() for t in tensors]
    mask.drop_tensors_(got, keys=keys, rates=RATES[:6], starts=STARTS[:6], seed=9, step=4, extra_scale=0.5)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_a_native_kernel_that_disagrees_with_the_definition_is_refused(backend, monkeypatch):
    class Broken:
        def many(self, table, device):
            pass

        def one(self, *args):
            pass

    monkeypatch.setattr(backends, "_NATIVE_BUILDERS", {"cpu": lambda dtype, *constants: Broken()})
    monkeypatch.setattr(backends, "_native", {})
    monkeypatch.setattr(backends, "_native_failed", set())
    backend("compiled")
    with pytest.raises(RuntimeError, match="disagrees with the eager definition"):
        drop_(torch.ones(100), **CFG)
    backend("auto")
    with pytest.warns(RuntimeWarning, match="native mask kernel failed on cpu"):
        out = drop_(torch.ones(5000), **CFG)
    assert torch.equal(out != 0, keep_mask(5000, **CFG))


def test_multi_tensor_calls_leave_the_global_rng_alone(backend):
    backend("auto")
    tensors = _tensors(torch.float32)
    buffer, segments = _bucket()
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    mask.drop_tensors_(tensors, keys=[str(k) for k in range(10)], rates=RATES, starts=STARTS, seed=1, step=2)
    mask.drop_segments_(buffer, segments, seed=1, step=2, mask_out=torch.empty(buffer.numel(), dtype=torch.bool))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_bad_multi_tensor_arguments_raise_clear_errors():
    ok = dict(seed=0, step=0)
    t = [torch.ones(10), torch.ones(5)]
    for kwargs, message in [
        (dict(keys=["a"], rates=0.1), r"keys must have one entry per tensor \(2\), got 1"),
        (dict(keys="ab", rates=0.1), "keys must be a sequence"),
        (dict(keys=["a", "b"], rates=[0.1]), r"rates must have one entry per tensor"),
        (dict(keys=["a", "b"], rates=[0.1, 1.5]), r"rates\[1\] must be a number in \[0, 1\]"),
        (dict(keys=["a", "b"], rates=True), r"rates must be a sequence"),
        (dict(keys=["a", "b"], rates=float("nan")), r"rates must be a number in \[0, 1\]"),
        (dict(keys=["a", "b"], rates=0.1, starts=[0, -1]), r"starts\[1\] must be an int >= 0"),
        (dict(keys=["a", "b"], rates=0.1, starts=[True, 0]), r"starts\[0\] must be an int >= 0"),
        (dict(keys=["a", "b"], rates=0.1, starts=[0]), "starts must have one entry per tensor"),
        (dict(keys=["a", "b"], rates=0.1, seed=-1), "seed must be an int in"),
        (dict(keys=["a", "b"], rates=0.1, step=1 << 64), "step must be an int in"),
        (dict(keys=["a", "b"], rates=0.1, extra_scale=float("inf")), "extra_scale must be a finite number"),
    ]:
        with pytest.raises(ValueError, match=message):
            mask.drop_tensors_(t, **{**ok, **kwargs})
    with pytest.raises(TypeError, match=r"keys\[1\] must be a str"):
        mask.drop_tensors_(t, keys=["a", 3], rates=0.1, **ok)
    for bad, message in [(torch.ones(4, 4).t(), r"tensors\[1\] must be contiguous"),
                         (torch.ones(4, dtype=torch.int64), r"tensors\[1\] must be floating point or complex"),
                         (torch.ones(4, 4).to_sparse(), r"tensors\[1\] must be dense"),
                         (torch.ones(4, 4).to_sparse_csr(), r"tensors\[1\] must be dense")]:
        with pytest.raises(ValueError, match=message):
            mask.drop_tensors_([t[0], bad], keys=["a", "b"], rates=0.1, **ok)
    with pytest.raises(ValueError, match="tensors must be a sequence of tensors"):
        mask.drop_tensors_(torch.ones(3), keys=["a"], rates=0.1, **ok)
    base = torch.ones(100)
    with pytest.raises(ValueError, match="tensors overlap in memory"):
        mask.drop_tensors_([base[:60], base[50:]], keys=["a", "b"], rates=0.1, **ok)
    assert torch.equal(base, torch.ones(100))  # refused before anything was masked


def test_bad_segment_arguments_raise_clear_errors():
    buffer = torch.ones(30)
    ok = dict(seed=0, step=0)
    for segments, kwargs, message in [
        ([(10, "a", 0, 0.1), (10, "b", 0, 0.1)], {}, "segments must cover the buffer exactly: they hold 20"),
        ([(10, "a", 0, 0.1), (25, "b", 0, 0.1)], {}, "they hold 35 elements, the buffer 30"),
        ([(30, "a", 0, 2.0)], {}, r"segments\[0\].rate must be a number in \[0, 1\]"),
        ([(30, "a", -5, 0.1)], {}, r"segments\[0\].start must be an int >= 0"),
        ([(-1, "a", 0, 0.1), (31, "b", 0, 0.1)], {}, r"segments\[0\].numel must be an int >= 0"),
        ([(30, "a", 0)], {}, r"segments\[0\] must be a \(numel, key, start, rate\) tuple"),
        ("abc", {}, "segments must be a sequence"),
        ([(30, "a", 0, 0.1)], dict(mask_out=torch.empty(29, dtype=torch.bool)), "mask_out must be a bool tensor"),
        ([(30, "a", 0, 0.1)], dict(mask_out=torch.empty(30)), "mask_out must be a bool tensor"),
        ([(30, "a", 0, 0.1)], dict(mask_out=torch.empty(60, dtype=torch.bool)[::2]), "mask_out must be contiguous"),
        ([(30, "a", 0, 0.1)], dict(extra_scale=float("nan")), "extra_scale must be a finite number"),
    ]:
        with pytest.raises(ValueError, match=message):
            mask.drop_segments_(buffer, segments, **{**ok, **kwargs})
    with pytest.raises(TypeError, match=r"segments\[0\].key must be a str"):
        mask.drop_segments_(buffer, [(30, None, 0, 0.1)], **ok)
    with pytest.raises(ValueError, match="buffer must be floating point"):
        mask.drop_segments_(torch.ones(30, dtype=torch.int32), [(30, "a", 0, 0.1)], **ok)
    assert torch.equal(buffer, torch.ones(30))


TRITON_CHECK = """
import torch
from dropgrad_dist import mask
from dropgrad_dist.mask.kernels import cuda as _mask_kernels
for dtype in (torch.float32, torch.float16, torch.float64):  # the interpreter truncates to bfloat16
    kernel = _mask_kernels.CudaKernel(dtype, mask._HASH_MULTIPLIERS, mask._HASH_SHIFTS)
    mask._self_check(kernel, torch.device("cpu"), dtype)
    mask._check_packer(kernel, torch.device("cpu"), dtype)  # count, pack and unpack (finite, then inf/NaN)
print("ok")
"""


def test_triton_kernel_logic_under_the_triton_interpreter():
    # No GPU here: run the CUDA kernel's code on CPU pointers through Triton's interpreter.
    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, "-c", TRITON_CHECK], capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_vectorised_salts_equal_the_python_chain():
    gen = torch.Generator().manual_seed(4)
    words = [0, (1 << 64) - 1] + torch.randint(0, 1 << 62, (30,), generator=gen).tolist()
    blocks = [0, (1 << 33) + 5] + torch.randint(0, 1 << 40, (30,), generator=gen).tolist()
    for seed, step in [(0, 0), ((1 << 64) - 1, 12345)]:
        for count in (3, 32):  # one by one in Python, or vectorised in numpy
            got = mask._salts(seed, step, MaskStream.UPDATE, np.array(words[:count], dtype=np.uint64),
                              np.array(blocks[:count], dtype=np.uint64))
            want = [mask._salt(seed, step, w, MaskStream.UPDATE, b) for w, b in zip(words[:count], blocks[:count])]
            assert got.tolist() == want


@pytest.mark.parametrize("threads", [2, 3])
def test_threads_split_pieces_anywhere(threads, backend, monkeypatch):
    # A tiny grain makes the CPU kernel cut pieces (and a salt-block crossing) between threads.
    from dropgrad_dist.mask.kernels import native as _mask_kernels

    tensors = _tensors(torch.float32)
    keys = [f"t{k}" for k in range(len(tensors))]
    want = _reference_drop(tensors, keys, RATES, STARTS, 1.0, backend)
    backend("compiled")
    monkeypatch.setattr(_mask_kernels, "PARALLEL_GRAIN", 500)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    got = [t.clone() for t in tensors]
    mask.drop_tensors_(got, keys=keys, rates=RATES, starts=STARTS, seed=9, step=4)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    buffer, segments = _bucket()
    keep, want_keep = torch.empty(buffer.numel(), dtype=torch.bool), torch.empty(buffer.numel(), dtype=torch.bool)
    got = mask.drop_segments_(buffer.clone(), segments, seed=9, step=4, mask_out=keep)
    monkeypatch.setattr(_mask_kernels, "PARALLEL_GRAIN", 1 << 40)
    want = mask.drop_segments_(buffer.clone(), segments, seed=9, step=4, mask_out=want_keep)
    assert torch.equal(got, want) and torch.equal(keep, want_keep)


def test_triton_kernel_compiles_for_a_gpu():
    # No GPU here: compile the CUDA kernel for sm_90 (types, pointer casts, rounding modes).
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dropgrad_dist.mask.kernels import cuda as _mask_kernels

    kernel = _mask_kernels._triton_kernel()
    signature = {name: "*i64" if name in ("table", "blocks") else "constexpr" for name in kernel.arg_names}
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        constants = dict(_mask_kernels.CudaKernel(dtype, mask._HASH_MULTIPLIERS, mask._HASH_SHIFTS)._constants,
                         HAS_MASK=dtype == torch.bfloat16)
        ptx = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                             target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False}).asm["ptx"]
        assert "shr.u32" in ptx and "mul.lo.s32" in ptx  # logical shifts, wrapping 32-bit products
        if dtype == torch.bfloat16:
            assert "cvt.rn.bf16.f32" in ptx  # round to nearest even, as torch


def test_triton_compaction_kernels_compile_for_a_gpu():
    # No GPU here: compile the count, pack and unpack kernels for sm_90 for every dtype.
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dropgrad_dist.mask.kernels import cuda as _mask_kernels

    count, pack, unpack = _mask_kernels._triton_compaction_kernels()
    pointers = dict(table="*i64", blocks="*i64", counts="*i32", offsets="*i64", flags="*i32")
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16"),
                        (torch.float64, "fp64")):
        cuda = _mask_kernels.CudaKernel(dtype, mask._HASH_MULTIPLIERS, mask._HASH_SHIFTS)
        for kernel, extra in ((count, {}), (pack, dict(BITS=cuda._bits, **cuda._types)),
                              (unpack, cuda._types)):
            constants = {**cuda._hash, **extra}
            signature = {arg: pointers.get(arg, f"*{name}") if arg not in constants else "constexpr"
                         for arg in kernel.arg_names}
            ptx = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                                 target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False}).asm["ptx"]
            assert "shr.u32" in ptx and "mul.lo.s32" in ptx  # logical shifts, wrapping 32-bit products


@pytest.mark.parametrize("backend_name", ["compiled", "eager"])
def test_float64_values_get_a_float64_scale(backend_name, backend):
    # 1/(1-p) rounded to float32 would bias float64 gradients by ~2e-8: kept values scale exactly.
    backend(backend_name)
    values = drop_(torch.ones(4096, dtype=torch.float64), **CFG)
    assert set(values.unique().tolist()) == {0.0, 1.0 / (1.0 - CFG["rate"])}


# ---- compaction: pack_segments / unpack_segments_ (DDP's compact all-reduce) -----------------

def _index_path(buffer, segments, received_of, extra_scale):
    """The compact all-reduce before the pack kernels: bool mask, index gather, aminmax flag, index scatter."""
    values, keep = buffer.clone(), torch.empty(buffer.numel(), dtype=torch.bool)
    mask.drop_segments_(values, segments, seed=9, step=4, extra_scale=extra_scale, mask_out=keep)
    index = keep.nonzero().squeeze(1)
    low, high = torch.aminmax(values)
    send = torch.cat([values[index], (low * 0 + high * 0).reshape(1)])
    received = received_of(send)
    values.index_copy_(0, index, received[:-1])
    values[:1].add_(received[-1:])
    return send, values


def _pack_path(buffer, segments, received_of, extra_scale):
    values = buffer.clone()
    send = mask.pack_segments(values, segments, seed=9, step=4, extra_scale=extra_scale)
    assert mask._same_bits(values, buffer)  # packing reads the buffer, never writes it
    assert mask.unpack_segments_(values, segments, received_of(send), seed=9, step=4) is values
    return send, values


def _compaction_cases(dtype):
    """(name, buffer, segments): mixed segments, all-negative values, non-finite values, huge finite values."""
    buffer, segments = _bucket(dtype)
    negative = -buffer.abs() - 0.25
    poisoned = buffer.clone()
    poisoned[[5, 2000, 9000]] = torch.tensor([float("inf"), float("nan"), -float("inf")]).to(dtype)
    huge = (buffer.double().sign() * torch.finfo(dtype).max).to(dtype)  # finite: a sum of them would overflow
    return [("mixed", buffer, segments), ("negative", negative, segments), ("non-finite", poisoned, segments),
            ("huge", huge, [(buffer.numel(), None, 0, None)])]


@pytest.mark.parametrize("backend_name", ["compiled", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_pack_unpack_equal_the_index_path(dtype, backend_name, backend):
    # Unmasked segments, rates 0 and 1, empty segments, several keys, starts across 2**31; NaN == NaN.
    for case, buffer, segments in _compaction_cases(dtype):
        extra_scale = 1.0 if case == "huge" else 0.5
        received_of = (lambda send: send.clone()) if case == "huge" else (lambda send: send * 3)
        backend("eager")
        want_send, want = _index_path(buffer, segments, received_of, extra_scale)
        backend(backend_name)
        got_send, got = _pack_path(buffer, segments, received_of, extra_scale)
        assert mask._same_bits(got_send, want_send), case
        assert mask._same_bits(got, want), case


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_pack_flag_is_zero_when_finite_and_nan_otherwise(dtype, backend):
    for backend_name in ("compiled", "eager"):
        backend(backend_name)
        for case, buffer, segments in _compaction_cases(dtype):
            flag = mask.pack_segments(buffer, segments, seed=9, step=4,
                                      extra_scale=1.0 if case == "huge" else 0.5)[-1]
            if case == "non-finite":
                assert flag.isnan(), backend_name
            else:  # -0 when every value is negative (as min * 0 + max * 0), never NaN for finite values
                assert flag == 0 and bool(flag.signbit()) == (case == "negative"), (backend_name, case, flag)


@pytest.mark.parametrize("threads", [2, 3])
def test_pack_threads_split_pieces_anywhere(threads, backend, monkeypatch):
    # A tiny grain makes the kernels count, then pack or unpack, pieces cut between threads.
    from dropgrad_dist.mask.kernels import native as _mask_kernels

    backend("compiled")
    buffer, segments = _bucket()
    def received_of(send):  # a sum over three ranks holding the same values
        return send * 3

    want_send, want = _pack_path(buffer, segments, received_of, 0.5)
    monkeypatch.setattr(_mask_kernels, "PARALLEL_GRAIN", 500)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    got_send, got = _pack_path(buffer, segments, received_of, 0.5)
    assert mask._same_bits(got_send, want_send) and mask._same_bits(got, want)
    with pytest.raises(ValueError, match="received must hold the kept coordinates plus one flag element"):
        mask.unpack_segments_(buffer.clone(), segments, got_send[:-1], seed=9, step=4)


@pytest.mark.parametrize("backend_name", ["compiled", "eager"])
def test_bad_pack_arguments_raise_clear_errors(backend_name, backend):
    backend(backend_name)
    buffer, segments, ok = torch.ones(30), [(30, "a", 0, 0.5)], dict(seed=0, step=0)
    for args, kwargs, message in [
        ((buffer, [(20, "a", 0, 0.5)]), {}, "segments must cover the buffer exactly"),
        ((buffer, [(30, "a", 0, 2.0)]), {}, r"segments\[0\].rate must be a number in \[0, 1\]"),
        ((buffer, [(30, "a", -1, 0.5)]), {}, r"segments\[0\].start must be an int >= 0"),
        ((buffer, "abc"), {}, "segments must be a sequence"),
        ((buffer, segments), dict(extra_scale=float("inf")), "extra_scale must be a finite number"),
        ((buffer, segments), dict(seed=-1), "seed must be"),
        ((torch.ones(30, dtype=torch.complex64), segments), {}, "buffer must be real floating point"),
        ((torch.ones(30, dtype=torch.int32), segments), {}, "buffer must be floating point"),
    ]:
        with pytest.raises(ValueError, match=message):
            mask.pack_segments(*args, **{**ok, **kwargs})
    send = mask.pack_segments(buffer, segments, **ok)
    for received, message in [
        (send[:-1], "received must hold the kept coordinates plus one flag element"),
        (torch.cat([send, send]), "received must hold the kept coordinates plus one flag element"),
        (send.double(), "received must be a contiguous tensor of the buffer's dtype"),
        (torch.stack([send, send], 1)[:, 0], "received must be a contiguous tensor"),
    ]:
        with pytest.raises(ValueError, match=message):
            mask.unpack_segments_(buffer.clone(), segments, received, **ok)
    with pytest.raises(ValueError, match="segments must cover the buffer exactly"):
        mask.unpack_segments_(buffer.clone(), [(29, "a", 0, 0.5)], send, **ok)
    assert torch.equal(buffer, torch.ones(30))


def test_a_pack_kernel_that_disagrees_with_the_torch_ops_is_refused(backend, monkeypatch):
    backend("auto")
    kernel = mask._native_kernel(torch.ones(1))

    class Broken:
        def __getattr__(self, name):  # masks as the real kernel; packs one value wrong
            return getattr(kernel, name)

        def pack(self, table, buffer):
            send = kernel.pack(table, buffer)
            send[0] += 1
            return send

    monkeypatch.setattr(backends, "_native_kernel", lambda tensor: Broken())
    monkeypatch.setattr(compaction, "_packers", {})
    buffer, segments = _bucket()
    with pytest.warns(RuntimeWarning, match="the native pack/unpack kernel failed"):
        got = mask.pack_segments(buffer, segments, seed=9, step=4)
    assert compaction._packers[("cpu", torch.float32)] is None
    assert mask._same_bits(got, mask._pack_torch(buffer, segments, 9, 4, MaskStream.GRAD, 1.0))
    monkeypatch.setattr(compaction, "_packers", {})
    backend("compiled")
    with pytest.raises(RuntimeError, match="pack/unpack kernel for torch.float32 disagrees"):
        mask.pack_segments(buffer, segments, seed=9, step=4)
