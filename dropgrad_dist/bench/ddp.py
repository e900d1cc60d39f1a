"""DDP training step on 2 CPU ranks (gloo): torch's allreduce_hook vs dropgrad_hook dense and compact.

Three models: a ~5M-parameter MLP (8 gradient tensors), a 12-block transformer encoder with its
LayerNorms and biases (~5M parameters, 150 gradient tensors) and 500 x ``Linear(64, 64)`` (1000
small gradient tensors: the hook's per-tensor Python work shows there). Targets: dense at p=0.1 at
most 5% slower than ``allreduce_hook`` on the first two, 3% on the 1000-tensor model; compact at
p=0.5 winning below a crossover link bandwidth
of at least 25 Gbit/s (see :func:`crossover_gbit_s`). Each candidate trains its own copy of the
model; the candidates take turns, one block of steps per round, so machine noise hits all alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook, bf16_compress_hook
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import compressed_hook
from .. import mask as _mask
from ..core.agreement import AgreementCheck
from ..ddp.hook import DropGradHookState, dropgrad_hook
from ..testing import run_on_ranks
from . import hook_profile, median_ratio
from . import link as _link

# name -> (communication, drop rate); None: torch's allreduce_hook
CANDIDATES: dict[str, tuple[str, float] | None] = {
    "allreduce_hook": None,
    "dropgrad dense p=0.1": ("dense", 0.1),
    "dropgrad compact p=0.5": ("compact", 0.5),
    "dropgrad compact p=0.9": ("compact", 0.9),
}
# --index-path: compact p=0.5 through a bool mask and an index array (the path before the pack kernels)
INDEX_PATH = "dropgrad compact p=0.5 (index path)"
DENSE, COMPACT = "dropgrad dense p=0.1", "dropgrad compact p=0.5"
MODELS = ("mlp", "transformer", "many", "vits")
# --link: the compression hooks users pick for slow links, side by side; name -> (kind, options).
# "no-op" returns the bucket unaveraged without communicating: the compute floor of a step.
NOOP = "no-op (no communication)"
# One 4-byte all-reduce per bucket and nothing else: what synchronizing the ranks every bucket costs
# (the slower rank's lateness, gloo's per-collective latency) without the bytes.
SYNC = "sync only (4 bytes per bucket)"
LINK_CANDIDATES: dict[str, tuple] = {
    NOOP: ("noop",),
    SYNC: ("sync",),
    "allreduce_hook": ("allreduce",),
    "bf16_compress_hook": ("bf16",),
    "PowerSGD rank 1": ("powersgd", 1),
    "PowerSGD rank 4": ("powersgd", 4),
    "dropgrad dense p=0.1": ("dropgrad", "dense", 0.1),
    "dropgrad compact p=0.5": ("dropgrad", "compact", 0.5),
    "dropgrad compact p=0.9": ("dropgrad", "compact", 0.9),
    "dropgrad p=0.1 + bf16": ("dropgrad+bf16", 0.1),
    "dropgrad p=0.1 + PowerSGD rank 4": ("dropgrad+powersgd", 0.1, 4),
}
LINK_MODELS = ("mlp", "transformer", "vits")
_ONE_BUCKET_MB = 4096  # above every model here: DDP makes one bucket (its first bucket too, when the cap is given)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=[*MODELS, "both", "all"], default="all",
                        help="which model(s) to train (both: mlp and transformer; many: 500 x Linear(64, 64); "
                             "vits: ViT-S/16 shapes; all: mlp, transformer, many, or with --link mlp, transformer, "
                             "vits)")
    parser.add_argument("--many_layers", type=int, default=500, help="Linear(64, 64) layers of the 'many' model")
    parser.add_argument("--width", type=int, default=1024, help="MLP width (1024: ~5.2M parameters)")
    parser.add_argument("--batch", type=int, default=32, help="MLP per-rank batch size")
    parser.add_argument("--d_model", type=int, default=192, help="transformer width (192: ~5.4M parameters)")
    parser.add_argument("--layers", type=int, default=12, help="transformer blocks")
    parser.add_argument("--tokens", type=int, default=64, help="transformer tokens per rank (4 sequences)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per candidate per round (5; --link: 2)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (median reported; 7, --link: 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--index_path", action="store_true",
                        help=f"also time '{INDEX_PATH}' (before/after figures for the pack kernels)")
    parser.add_argument("--link", default=None, metavar="RATE[,DELAY]",
                        help="run the ranks in a private network namespace whose loopback tc limits to RATE "
                             "(e.g. 1gbit, 10gbit,1ms; 'none': the namespace unshaped) and compare the compression "
                             "hooks (bf16, PowerSGD, DropGrad compact, a no-op floor); needs root or CAP_NET_ADMIN, "
                             "else runs unshaped and says why")
    parser.add_argument("--quick", action="store_true",
                        help="with --link: a small MLP, 3 rounds of 2 steps, PowerSGD from step 2 (CI: well under "
                             "a minute)")
    parser.add_argument("--vits_tokens", type=int, default=16,
                        help="tokens per rank of the 'vits' model (ViT-S/16 shapes: width 384, 12 blocks, 6 heads)")
    parser.add_argument("--profile", action="store_true",
                        help="with --link: also time the DropGrad hooks' parts per step (agreement, pack, mask, "
                             "unpack); adds a few microseconds per bucket to their steps")
    parser.add_argument("--candidates", default=None, metavar="NAME[,NAME...]",
                        help="time only these candidates (exact names as in the table; with --link the no-op floor "
                             "and allreduce_hook are always timed, the other columns are relative to them)")
    parser.add_argument("--powersgd_start", type=int, default=10,
                        help="PowerSGD's start_powerSGD_iter (torch recommends about 10; --quick: 2); the steps "
                             "before it are warm-up, not timed")


class _Transformer(nn.Module):
    """Input projection, ``layers`` pre-norm encoder blocks, a final LayerNorm, a linear head."""

    def __init__(self, d_model: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Linear(d_model, d_model)
        block = nn.TransformerEncoderLayer(d_model, nhead=max(1, d_model // 64), dim_feedforward=4 * d_model,
                                           dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)
        self.head = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)))


def _factory(model: str, args: dict[str, Any]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        if model == "transformer":
            return _Transformer(args["d_model"], args["layers"])
        if model == "vits":  # ViT-S/16's encoder: 12 blocks of width 384, 6 heads, MLP 1536 (~21M parameters)
            return _Transformer(384, 12)
        if model == "many":
            return nn.Sequential(*(nn.Linear(64, 64) for _ in range(args["many_layers"])))
        width = args["width"]
        return nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width), nn.GELU(),
                             nn.Linear(width, width // 2), nn.GELU(), nn.Linear(width // 2, width))
    return build


def _batch(model: str, rank: int, args: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    if model == "transformer":
        shape = (4, max(1, args["tokens"] // 4), args["d_model"])
    elif model == "vits":
        shape = (1, args["vits_tokens"], 384)
    elif model == "many":
        shape = (args["batch"], 64)
    else:
        shape = (args["batch"], args["width"])
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(rank)),
            torch.randn(*shape, generator=torch.Generator().manual_seed(100 + rank)))


def _candidates(args: dict[str, Any]) -> dict[str, tuple]:
    """name -> (kind, options) of the candidates to time (see :data:`LINK_CANDIDATES`), ``--candidates`` applied."""
    if args["link"]:
        names, always = dict(LINK_CANDIDATES), (NOOP, SYNC, "allreduce_hook")
    else:
        names = {name: ("allreduce",) if spec is None else ("dropgrad", *spec) for name, spec in CANDIDATES.items()}
        if args["index_path"]:
            names[INDEX_PATH] = ("dropgrad", "compact", 0.5)
        always = ("allreduce_hook", DENSE)  # compact's extra time is paired with dense's
    return {name: spec for name, spec in names.items() if name in _chosen(args, names, always)}


def _chosen(args: dict[str, Any], names: dict[str, tuple], always: tuple[str, ...]) -> set[str]:
    """The names ``--candidates`` asks for (every name when not given) plus the reference candidates."""
    wanted = args.get("candidates")
    if wanted is None:
        return set(names)
    chosen = {name.strip() for name in wanted.split(",") if name.strip()}
    unknown = sorted(chosen - set(names))
    if unknown:
        raise ValueError(f"--candidates: unknown {', '.join(map(repr, unknown))}; allowed: "
                         f"{', '.join(map(repr, names))}")
    return chosen | set(always)


def _noop_hook(_, bucket):  # noqa: ANN001, ANN202 (DDP checks the annotations, which are strings here)
    """The bucket as it is, without communicating: every rank keeps its own gradient (the compute floor)."""
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def _sync_hook(_, bucket):  # noqa: ANN001, ANN202 (see _noop_hook)
    """The bucket as it is, once a 4-byte all-reduce has completed on every rank (the synchronization floor)."""
    buffer = bucket.buffer()
    work = dist.all_reduce(torch.zeros(1, dtype=torch.int32), async_op=True)
    return work.get_future().then(lambda _: buffer)


def _powersgd_state(rank: int, args: dict[str, Any]) -> PowerSGDState:
    """PowerSGD with torch's recommended settings: error feedback, warm start, a delayed start."""
    return PowerSGDState(process_group=None, matrix_approximation_rank=rank,
                         start_powerSGD_iter=args["powersgd_start"], use_error_feedback=True, warm_start=True,
                         random_seed=0)


def _register(name: str, spec: tuple, ddp: DDP, args: dict[str, Any],
              parts: Any = None) -> tuple[DropGradHookState | None, int]:
    """Register the candidate's hook on ``ddp``; its DropGrad state (None: none) and its warm-up steps.

    Warm-up: 3 steps (bucket rebuild, kernel compilation, allocator), and PowerSGD's uncompressed
    steps before ``start_powerSGD_iter`` on top.
    """
    kind, state, warmup = spec[0], None, 3
    if kind == "noop":
        ddp.register_comm_hook(None, _noop_hook)
    elif kind == "sync":
        ddp.register_comm_hook(None, _sync_hook)
    elif kind == "allreduce":
        ddp.register_comm_hook(None, allreduce_hook)
    elif kind == "bf16":
        ddp.register_comm_hook(None, bf16_compress_hook)
    elif kind == "powersgd":
        ddp.register_comm_hook(_powersgd_state(spec[1], args), powerSGD_hook)
        warmup += args["powersgd_start"]
    elif kind == "dropgrad":
        state = DropGradHookState(ddp, spec[2], communication=spec[1], seed=1)
        state._compact_via_index = name == INDEX_PATH
        state.register(ddp, None if parts is None else parts.timed("hook (backward thread)", dropgrad_hook))
    elif kind == "dropgrad+bf16":
        state = DropGradHookState(ddp, spec[1], seed=1)
        state.register(ddp, compressed_hook("bf16"))
    elif kind == "dropgrad+powersgd":
        state = DropGradHookState(ddp, spec[1], seed=1)
        state.register(ddp, compressed_hook(_powersgd_state(spec[2], args)))
        warmup += args["powersgd_start"]
    else:
        raise ValueError(f"unknown candidate kind {kind!r}")
    return state, warmup


def _measure_model(model: str, rank: int, args: dict[str, Any]) -> dict[str, Any]:
    if not args.get("profile"):
        return _measure(model, rank, args, None)
    with hook_profile.timed_parts() as parts:
        return _measure(model, rank, args, parts)


def _measure(model: str, rank: int, args: dict[str, Any], parts: hook_profile.Parts | None) -> dict[str, Any]:
    build, runs, warmups = _factory(model, args), {}, {}
    candidates = _candidates(args)
    for name, spec in candidates.items():
        # PowerSGD issues its second all-reduce from the first one's completion callback; on gloo that
        # races the next bucket's first all-reduce and ranks can disagree on the order (a size mismatch
        # or a hang): one bucket holding every gradient keeps its collectives in order.
        ddp = DDP(build(), bucket_cap_mb=_ONE_BUCKET_MB) if "powersgd" in spec[0] else DDP(build())
        state, warmups[name] = _register(name, spec, ddp, args, parts)
        runs[name] = (ddp, torch.optim.SGD(ddp.parameters(), lr=1e-4), state)
    params = list(next(iter(runs.values()))[0].parameters())
    x, target = _batch(model, rank, args)
    wire = args["link"] is not None and _link.private_namespace()  # the loopback carries nothing else

    def train(name: str, steps: int) -> tuple[float, int]:
        """Mean seconds per step, and the bytes the loopback carried meanwhile (all ranks; 0 unmeasured)."""
        ddp, opt, _ = runs[name]
        dist.barrier()
        sent = _link.lo_tx_bytes() if wire else 0
        start = time.perf_counter()
        for _ in range(steps):
            nn.functional.mse_loss(ddp(x), target).backward()
            opt.step()
            opt.zero_grad()
        seconds = (time.perf_counter() - start) / steps
        if wire:
            dist.barrier()  # both ranks' traffic of these steps is on the wire
            sent = _link.lo_tx_bytes() - sent
        return seconds, sent

    for name in runs:  # warm-up: bucket rebuild, mask kernel compilation, allocator, PowerSGD's start
        train(name, warmups[name])
    before = {name: (s.bytes_communicated if s else 0) for name, (_, _, s) in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    wire_bytes = dict.fromkeys(runs, 0)
    profile: dict[str, dict[str, float]] = {name: {} for name in runs}
    for _ in range(args["rounds"]):
        for name in runs:
            if parts is not None:
                parts.reset()
            seconds, sent = train(name, args["steps"])
            times[name].append(seconds)
            wire_bytes[name] += sent
            for part, spent in (parts.seconds.items() if parts is not None else ()):
                profile[name][part] = profile[name].get(part, 0.0) + spent
    timed_steps = args["rounds"] * args["steps"]
    numel = sum(p.numel() for p in params)
    sent = {name: ((s.bytes_communicated - before[name]) / timed_steps) if s else numel * 4.0
            for name, (_, _, s) in runs.items()}
    counted = {name: (sent[name] if candidates[name][0] == "dropgrad" else None) for name in runs}
    return {"times": times, "bytes_per_step": sent, "hook_bytes_per_step": counted, "numel": numel,
            "tensors": len(params), "sizes": [p.numel() for p in params],
            "wire_bytes_per_step": {name: b / timed_steps for name, b in wire_bytes.items()} if wire else None,
            "profile": {name: {part: spent / timed_steps for part, spent in p.items()} for name, p in profile.items()
                        if p}}


def _link_check(world_size: int, args: dict[str, Any]) -> dict[str, Any]:
    """A plain gloo all-reduce of a known size: bytes the loopback carried per second vs the set rate.

    A ring all-reduce of B bytes moves ``2 (N-1)/N * B`` per rank; every rank's traffic crosses the
    one loopback, so the wire carries N times that.
    """
    rate = args["link_rate_bytes_s"]
    size = int(min(64e6, max(4e6, (rate or 256e6) * 0.1)))  # about 0.2 s on the wire at the rate
    tensor = torch.ones(size // 4)
    dist.all_reduce(tensor)  # connections up, buffers allocated
    wire = _link.private_namespace()
    times, carried = [], []
    for _ in range(3):
        dist.barrier()
        before = _link.lo_tx_bytes() if wire else 0
        start = time.perf_counter()
        dist.all_reduce(tensor)
        dist.barrier()
        times.append(time.perf_counter() - start)
        carried.append((_link.lo_tx_bytes() - before) if wire else 0)
    median = statistics.median(times)
    on_wire = statistics.median(carried) if wire else None
    return {"size_bytes": size, "seconds": median, "ring_bytes_per_rank": 2 * (world_size - 1) / world_size * size,
            "wire_bytes_per_rank": None if on_wire is None else on_wire / world_size,
            "achieved_bytes_s": None if on_wire is None else on_wire / median}


def _agreement_seconds(repeats: int = 50) -> float:
    """Median time of one agreement check waited at once (the hook starts it asynchronously instead)."""
    check, fields, times = AgreementCheck("bench"), {"seed": 1, "step_index": 0}, []
    for _ in range(repeats):
        dist.barrier()  # time the collective, not the other rank's lateness
        start = time.perf_counter()
        pending = check.start(fields, torch.device("cpu"))
        if pending is not None:
            pending.wait()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _kernel_seconds(sizes: list[int], rate: float, repeats: int = 9) -> dict[str, float]:
    """Median seconds of pack + unpack and of the dense mask over one buffer holding every gradient."""
    buffer = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(0))
    segments = [(n, f"p{k}", 0, rate) for k, n in enumerate(sizes)]
    send = _mask.pack_segments(buffer, segments, seed=1, step=1, extra_scale=0.5)
    runs = {"pack_unpack": lambda: _mask.unpack_segments_(buffer, segments, _mask.pack_segments(
                buffer, segments, seed=1, step=1, extra_scale=0.5), seed=1, step=1),
            "mask": lambda: _mask.drop_segments_(buffer, segments, seed=1, step=1, extra_scale=0.5)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            buffer.normal_(generator=torch.Generator().manual_seed(0))
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    del send
    return {name: statistics.median(t) for name, t in times.items()}


def _rank(rank: int, world_size: int, args: dict[str, Any]) -> dict[str, Any]:
    check = _link_check(world_size, args) if args["link"] else None
    results = {model: _measure_model(model, rank, args) for model in args["models"]}
    if args["link"]:
        return {"models": results, "link_check": check}
    kernels = {}
    for model in args["models"]:  # rank 0 alone, the other waiting: the kernels' own cost
        dist.barrier()
        if rank == 0:
            kernels[model] = _kernel_seconds(results[model]["sizes"], 0.5)
        dist.barrier()
    return {"models": results, "kernels": kernels, "agreement_s": _agreement_seconds()}


def crossover_gbit_s(bytes_dense: float, bytes_compact: float, extra_seconds: float, ranks: int) -> float:
    """Link bandwidth (Gbit/s) below which compact beats dense, in a ring all-reduce model.

    A ring all-reduce of ``B`` bytes moves ``2 (N-1)/N * B`` bytes per rank, so compact saves
    ``2 (N-1)/N * (B_dense - B_compact)`` per rank per step at ``extra_seconds`` more compute
    (measured on loopback): it wins where ``saved / bandwidth > extra_seconds``. Infinite when
    compact is not slower.
    """
    saved_bits = 2.0 * (ranks - 1) / ranks * (bytes_dense - bytes_compact) * 8.0
    return float("inf") if extra_seconds <= 0 else saved_bits / extra_seconds / 1e9


def _rows(model: str, results: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    # A step ends with both ranks done: take the slower rank per round.
    times = {name: [max(a, b) for a, b in zip(results[0]["models"][model]["times"][name],
                                               results[1]["models"][model]["times"][name])] for name in names}
    sent = results[0]["models"][model]["bytes_per_step"]
    rows = []
    for name in names:
        row = {"model": model, "candidate": name, "median_ms": statistics.median(times[name]) * 1e3,
               "x_allreduce": median_ratio(times[name], times["allreduce_hook"]), "MB_per_step": sent[name] / 1e6,
               "bytes_ratio": sent[name] / sent["allreduce_hook"], "extra_ms_vs_dense": None,
               "crossover_Gbit_s": None, "crossover_kernels_Gbit_s": None}
        if name.startswith("dropgrad compact") and DENSE in times:
            # Paired per round: the difference of two noisy medians would be noisier.
            extra = statistics.median(c - d for c, d in zip(times[name], times[DENSE]))
            row["extra_ms_vs_dense"] = extra * 1e3
            row["crossover_Gbit_s"] = _shown(crossover_gbit_s(sent[DENSE], sent[name], extra, 2))
        if name == COMPACT:
            kernels = results[0]["kernels"][model]
            row["crossover_kernels_Gbit_s"] = _shown(crossover_gbit_s(
                sent[DENSE], sent[name], kernels["pack_unpack"] - kernels["mask"], 2))
        rows.append(row)
    return rows


def _shown(gbit_s: float) -> float | str:
    return "any" if gbit_s == float("inf") else gbit_s


def _config(args: argparse.Namespace, models: list[str]) -> dict[str, Any]:
    config = {k: getattr(args, k) for k in ("width", "batch", "d_model", "layers", "tokens", "steps", "rounds",
                                            "index_path", "many_layers", "vits_tokens", "powersgd_start",
                                            "profile", "candidates")}
    config.update(models=models, link=None, link_rate_bytes_s=None)
    return config


def _run_link(args: argparse.Namespace) -> dict[str, Any]:
    """The compression hooks side by side on a shaped loopback (see :mod:`dropgrad_dist.bench.link`)."""
    wanted = _link.parse_link(args.link)
    if args.quick:
        models = ["mlp"]
        args.width, args.rounds, args.steps, args.powersgd_start = 512, 3, 2, 2
    else:
        models = {"all": list(LINK_MODELS), "both": ["mlp", "transformer"]}.get(args.model, [args.model])
        args.steps, args.rounds = args.steps or 2, args.rounds or 5
    link, reason = _link.enter(wanted)
    if reason is not None:
        print(f"[bench ddp --link {args.link}] {reason}; running "
              f"{'unshaped' if link is None or link.rate_bit_s is None else 'without the delay'}", file=sys.stderr)
    config = _config(args, models)
    config.update(link=args.link, link_rate_bytes_s=None if link is None else link.rate_bytes_s)
    start = time.perf_counter()
    results = run_on_ranks(_rank, 2, config, threads_per_rank=args.threads, timeout=1800)
    elapsed = time.perf_counter() - start
    names = list(_candidates(config))
    rate = config["link_rate_bytes_s"]
    rows = [_check_row(link, results[0]["link_check"], rate)]
    rows += [row for model in models for row in _link_rows(model, results, names, rate)]
    rows += _profile_rows(models, results)
    sizes = ", ".join(f"{model}: {results[0]['models'][model]['numel']:,} parameters in "
                      f"{results[0]['models'][model]['tensors']} tensors" for model in models)
    shown = "no private namespace (machine loopback, unshaped)" if link is None else (
        "private namespace, loopback unshaped" if link.rate_bit_s is None else
        f"private namespace, loopback tbf {link.rate_bit_s / 1e9:g} Gbit/s shared by the ranks"
        + (f", netem delay {link.delay_s * 1e3:g} ms" if link.delay_s else ""))
    return {
        "name": "ddp",
        "device": (f"cpu, 2 ranks x {args.threads} thread(s), gloo, {shown} ({sizes}; MLP batch {args.batch}/rank, "
                   f"transformer {args.tokens} tokens/rank, vits {args.vits_tokens} tokens/rank); "
                   f"{args.rounds} rounds x {args.steps} steps, {elapsed:.0f} s; load {_load()}"),
        "rows": rows,
        "notes": [
            *([f"link: {reason}"] if reason else []),
            "link check: a plain gloo all-reduce of size_MB; wire bytes from the namespace's loopback counter "
            "(/proc/net/dev), all ranks' traffic; ring model: 2(N-1)/N * size per rank",
            "median_ms, range_ms: over rounds of the mean step time (forward, backward with the hook, SGD step), "
            "the slower rank per round",
            "wire_MB_per_rank: loopback bytes per step / ranks, measured; hook_MB_per_rank: dropgrad_hook's own "
            "counter (what it all-reduced; the wrapped hooks' traffic is not counted there)",
            f"comm_ms: median per-round step time minus the '{NOOP}' floor (gradients not averaged: no traffic)",
            "limit_ms: floor + wire bytes of all ranks / link rate (one loopback carries every rank's traffic); "
            "x_limit: median per-round step / limit. Unshaped: limit = floor",
            f"x_sync_limit: the same with the '{SYNC}' step as the floor: ranks synchronized every bucket, as "
            "any all-reduce synchronizes them, but no bytes moved",
            f"PowerSGD: error feedback, warm start, start_powerSGD_iter={config['powersgd_start']} (steps before it "
            "are warm-up, untimed); dropgrad + hooks: dropgrad_dist.compressed_hook (mask, then compress)",
        ],
    }


def _load() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def _check_row(link: _link.Link | None, check: dict[str, Any], rate: float | None) -> dict[str, Any]:
    achieved = check["achieved_bytes_s"]
    return {"link": "machine loopback" if link is None else link.spec, "size_MB": check["size_bytes"] / 1e6,
            "seconds": check["seconds"], "set_MB_s": None if rate is None else rate / 1e6,
            "achieved_MB_s": None if achieved is None else achieved / 1e6,
            "achieved_vs_set": None if achieved is None or rate is None else achieved / rate,
            "ring_MB_per_rank": check["ring_bytes_per_rank"] / 1e6,
            "wire_MB_per_rank": None if check["wire_bytes_per_rank"] is None else check["wire_bytes_per_rank"] / 1e6}


def _profile_rows(models: list[str], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ms per step in each timed part of the DropGrad hooks (--profile), per rank."""
    found = [(model, rank, name, profile) for model in models for rank, result in enumerate(results)
             for name, profile in result["models"][model].get("profile", {}).items()]
    parts = sorted({part for *_, profile in found for part in profile})
    return [{"model": model, "candidate": name, "rank": rank,
             **{f"{part} ms": profile[part] * 1e3 if part in profile else None for part in parts}}
            for model, rank, name, profile in found]


def _link_rows(model: str, results: list[dict[str, Any]], names: list[str], rate: float | None) -> list[dict]:
    # A step ends with both ranks done: take the slower rank per round.
    per_rank = [r["models"][model] for r in results]
    times = {name: [max(ts) for ts in zip(*(m["times"][name] for m in per_rank))] for name in names}
    wire = per_rank[0]["wire_bytes_per_step"]  # all ranks' bytes per step, or None
    ranks = len(results)
    floor, synced = times[NOOP], times[SYNC]
    rows = []
    for name in names:
        on_wire = 0.0 if wire is None or rate is None else wire[name] / rate
        limits = [f + on_wire for f in floor]
        sync_limits = [f + on_wire for f in synced]
        hook = per_rank[0]["hook_bytes_per_step"][name]
        rows.append({
            "model": model, "candidate": name, "median_ms": statistics.median(times[name]) * 1e3,
            "range_ms": f"{min(times[name]) * 1e3:.4g}-{max(times[name]) * 1e3:.4g}",
            "x_allreduce": median_ratio(times[name], times["allreduce_hook"]),
            "wire_MB_per_rank": None if wire is None else wire[name] / ranks / 1e6,
            "hook_MB_per_rank": None if hook is None else hook / 1e6,
            "comm_ms": statistics.median(t - f for t, f in zip(times[name], floor)) * 1e3,
            "limit_ms": statistics.median(limits) * 1e3,
            "x_limit": median_ratio(times[name], limits),
            "x_sync_limit": median_ratio(times[name], sync_limits)})
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.link is not None:
        return _run_link(args)
    args.steps, args.rounds = args.steps or 5, args.rounds or 7
    models = {"all": ["mlp", "transformer", "many"], "both": ["mlp", "transformer"]}.get(args.model, [args.model])
    config = _config(args, models)
    results = run_on_ranks(_rank, 2, config, threads_per_rank=args.threads, timeout=1800)
    names = list(_candidates(config))
    rows = [row for model in models for row in _rows(model, results, names)]
    sizes = ", ".join(f"{model}: {results[0]['models'][model]['numel']:,} parameters in "
                      f"{results[0]['models'][model]['tensors']} tensors" for model in models)
    agreement_us = max(r["agreement_s"] for r in results) * 1e6
    step_ms = {row["model"]: row["median_ms"] for row in rows if row["candidate"] == "allreduce_hook"}
    return {
        "name": "ddp",
        "device": (f"cpu, 2 ranks x {args.threads} thread(s), gloo ({sizes}; MLP batch {args.batch}/rank, "
                   f"transformer {args.tokens} tokens/rank)"),
        "rows": rows,
        "notes": [
            "median_ms: median over rounds of the mean step time (forward, backward with the hook, SGD step)",
            "x_allreduce: median of per-round ratios to allreduce_hook; target: dense p=0.1 <= 1.05 on the MLP and "
            "the transformer, <= 1.03 on the 1000-tensor model",
            "bytes_ratio: bytes all-reduced per step / dense bucket bytes (compact adds one element per bucket)",
            "extra_ms_vs_dense: median per-round step time of the compact candidate minus dense p=0.1, measured "
            "on loopback, where moving bytes is nearly free: the compute compact adds (packing, unpacking) net of "
            "the loopback copies it saves",
            "crossover_Gbit_s: link bandwidth below which the compact candidate beats dense, in a ring all-reduce "
            "model: each rank moves 2(N-1)/N * B bytes for a B-byte bucket, so compact saves "
            "2(N-1)/N * (B_dense - B_compact) per rank per step (N=2 here) and wins when saved / bandwidth > "
            "extra_ms_vs_dense. Assumes bandwidth-bound all-reduces (no latency term), the extra compute not "
            "hidden behind communication, and loopback transfer costs negligible next to the link's; "
            "'any': compact is not slower even on loopback. Target: >= 25 Gbit/s for compact p=0.5",
            "crossover_kernels_Gbit_s: the same model with the extra compute taken from the kernels alone "
            "(pack_segments + unpack_segments_ - drop_segments_ over one buffer of the model's gradients, p=0.5, "
            "rank 0 alone): no loopback savings netted out, so a conservative figure",
            f"agreement check: every round each dropgrad_hook candidate runs one asynchronous 192-byte all-reduce "
            f"(rank agreement), included in its times; waited at once it takes {agreement_us:.0f} us here "
            f"(allreduce_hook step: {', '.join(f'{m} {ms:.1f} ms' for m, ms in step_ms.items())})",
        ],
    }
