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
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import mask as _mask
from ..core.agreement import AgreementCheck
from ..ddp.hook import DropGradHookState
from ..testing import run_on_ranks
from . import median_ratio

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
MODELS = ("mlp", "transformer", "many")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=[*MODELS, "both", "all"], default="all",
                        help="which model(s) to train (both: mlp and transformer; many: 500 x Linear(64, 64))")
    parser.add_argument("--many_layers", type=int, default=500, help="Linear(64, 64) layers of the 'many' model")
    parser.add_argument("--width", type=int, default=1024, help="MLP width (1024: ~5.2M parameters)")
    parser.add_argument("--batch", type=int, default=32, help="MLP per-rank batch size")
    parser.add_argument("--d_model", type=int, default=192, help="transformer width (192: ~5.4M parameters)")
    parser.add_argument("--layers", type=int, default=12, help="transformer blocks")
    parser.add_argument("--tokens", type=int, default=64, help="transformer tokens per rank (4 sequences)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per candidate per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--index_path", action="store_true",
                        help=f"also time '{INDEX_PATH}' (before/after figures for the pack kernels)")


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
        if model == "many":
            return nn.Sequential(*(nn.Linear(64, 64) for _ in range(args["many_layers"])))
        width = args["width"]
        return nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width), nn.GELU(),
                             nn.Linear(width, width // 2), nn.GELU(), nn.Linear(width // 2, width))
    return build


def _batch(model: str, rank: int, args: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    if model == "transformer":
        shape = (4, max(1, args["tokens"] // 4), args["d_model"])
    elif model == "many":
        shape = (args["batch"], 64)
    else:
        shape = (args["batch"], args["width"])
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(rank)),
            torch.randn(*shape, generator=torch.Generator().manual_seed(100 + rank)))


def _candidates(args: dict[str, Any]) -> dict[str, tuple[str, float] | None]:
    names = dict(CANDIDATES)
    if args["index_path"]:
        names[INDEX_PATH] = ("compact", 0.5)
    return names


def _measure_model(model: str, rank: int, args: dict[str, Any]) -> dict[str, Any]:
    build, runs = _factory(model, args), {}
    for name, spec in _candidates(args).items():
        ddp = DDP(build())
        state = None
        if spec is None:
            ddp.register_comm_hook(None, allreduce_hook)
        else:
            state = DropGradHookState(ddp, spec[1], communication=spec[0], seed=1)
            state._compact_via_index = name == INDEX_PATH
            state.register()
        runs[name] = (ddp, torch.optim.SGD(ddp.parameters(), lr=1e-4), state)
    params = list(runs["allreduce_hook"][0].parameters())
    x, target = _batch(model, rank, args)

    def train(name: str, steps: int) -> float:
        ddp, opt, _ = runs[name]
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            nn.functional.mse_loss(ddp(x), target).backward()
            opt.step()
            opt.zero_grad()
        return (time.perf_counter() - start) / steps

    for name in runs:  # warm-up: bucket rebuild, mask kernel compilation, allocator
        train(name, 3)
    before = {name: (s.bytes_communicated if s else 0) for name, (_, _, s) in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args["rounds"]):
        for name in runs:
            times[name].append(train(name, args["steps"]))
    timed_steps = args["rounds"] * args["steps"]
    numel = sum(p.numel() for p in params)
    sent = {name: ((s.bytes_communicated - before[name]) / timed_steps) if s else numel * 4.0
            for name, (_, _, s) in runs.items()}
    return {"times": times, "bytes_per_step": sent, "numel": numel, "tensors": len(params),
            "sizes": [p.numel() for p in params]}


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
    results = {model: _measure_model(model, rank, args) for model in args["models"]}
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
        if name.startswith("dropgrad compact"):
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    models = {"all": list(MODELS), "both": ["mlp", "transformer"]}.get(args.model, [args.model])
    config = {k: getattr(args, k) for k in ("width", "batch", "d_model", "layers", "tokens", "steps", "rounds",
                                            "index_path", "many_layers")}
    config["models"] = models
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
