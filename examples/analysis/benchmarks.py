"""DropGrad on 2-D benchmark functions: trajectories, convergence over mask seeds, sensitivity.

    python examples/analysis/benchmarks.py --output_dir outputs/analysis          # full run, a few minutes
    python examples/analysis/benchmarks.py --output_dir /tmp/analysis --quick     # smoke run, < 30 s

Writes ``trajectories.png``, ``convergence.png``, ``sensitivity.png`` and ``results.csv`` (every
plotted number; ``plots.py results.csv`` redraws the figures from it alone).

The "model" is one ``nn.Parameter`` of shape (2,) holding the point (x, y), and DropGrad masks
its two gradient coordinates independently with the library's seeded masks. That is a
meaningful regularizer even in 2-D: a dropped coordinate gets no new gradient in that step, so
for momentum-free rules (Adagrad, Adadelta) that axis is frozen for the step, while the kept
coordinate moves ``1/(1-p)`` times further. The rescaling keeps the *expected* gradient equal
to the true one, but the direction of each step is now random: with both coordinates kept it is
the gradient (scaled by ``1/(1-p)``), otherwise it is an axis-aligned piece of it or nothing.
In a narrow valley whose steep direction is a coordinate axis, dropping that axis skips a
zig-zag step; when the valley is rotated, an axis-aligned step mixes steep and flat directions.
Momentum rules (SGD with momentum, Adam, AdamW, Lion) do not freeze a dropped axis: it coasts on
its momentum buffer, which only misses that step's gradient.

All randomness comes from DropGrad's masks (seed ``s`` = one run); the start points are fixed
constants and no global RNG is used, so every number in ``results.csv`` is reproducible.

Regularizers live in ``REGULARIZERS`` (name -> how to wrap the base optimizer); every step calls
``optimizer.step(closure)`` with a closure that zeroes the gradient, evaluates f and calls
``backward()``, so closure-based regularizers (SAM, gradient norm penalty) fit as new entries.
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()  # the reported wall time includes the imports below

import argparse
import csv
import math
import multiprocessing
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from dropgrad_dist import SAM, ClippedOptimizer, DropGrad, GradientClipper, set_mask_backend

# ----------------------------------------------------------------------------------------
# Benchmark functions. Each is written once with + - * ** only, so the same expression
# evaluates Python floats (the optimization) and numpy grids (the contour plots), and its
# gradient is written out by hand: on two scalars, autograd's graph costs more than the math.


class Benchmark(NamedTuple):
    name: str
    value_and_grad: Callable  # (x, y) -> (f, df/dx, df/dy); x, y floats or numpy arrays
    start: tuple[float, float]
    minima: tuple[tuple[float, float], ...]  # global minima, all with f = f_min
    f_min: float
    box: tuple[float, float, float, float]  # x0, x1, y0, y1 of the contour plot
    label: str


def _rosenbrock(x, y):
    r = y - x * x
    return (1 - x) ** 2 + 100 * r * r, -2 * (1 - x) - 400 * x * r, 200 * r


def _beale(x, y):
    a, b, c = 1.5 - x + x * y, 2.25 - x + x * y**2, 2.625 - x + x * y**3
    f = a * a + b * b + c * c
    dx = 2 * a * (y - 1) + 2 * b * (y**2 - 1) + 2 * c * (y**3 - 1)
    dy = 2 * a * x + 4 * b * x * y + 6 * c * x * y**2
    return f, dx, dy


def _himmelblau(x, y):
    a, b = x * x + y - 11, x + y * y - 7
    return a * a + b * b, 4 * x * a + 2 * b, 2 * a + 4 * y * b


VALLEY_KAPPA = 50.0  # condition number of the quadratic valley
VALLEY_ANGLE = math.radians(30.0)  # rotated valley: steep direction at 30 degrees off the y axis
VALLEY_START = (-2.5, 0.5)  # in valley coordinates (u, v): far along the flat axis, off the floor


def _rotate(u: float, v: float, angle: float) -> tuple[float, float]:
    c, s = math.cos(angle), math.sin(angle)
    return c * u - s * v, s * u + c * v


def _valley(kappa: float, angle: float) -> Callable:
    """f = (u^2 + kappa v^2) / 2 with (u, v) the point (x, y) rotated by -angle."""
    c, s = math.cos(angle), math.sin(angle)

    def value_and_grad(x, y):
        u, v = c * x + s * y, -s * x + c * y
        return 0.5 * (u * u + kappa * v * v), c * u - s * kappa * v, s * u + c * kappa * v

    return value_and_grad


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("rosenbrock", _rosenbrock, (-1.5, 2.0), ((1.0, 1.0),), 0.0, (-2.0, 2.0, -1.0, 3.0),
                  "Rosenbrock"),
        Benchmark("beale", _beale, (0.7, 1.4), ((3.0, 0.5),), 0.0, (-0.5, 4.5, -1.0, 2.0), "Beale"),
        Benchmark("himmelblau", _himmelblau, (-0.3, -0.9),
                  ((3.0, 2.0), (-2.805118, 3.131312), (-3.779310, -3.283186), (3.584428, -1.848126)), 0.0,
                  (-5.0, 5.0, -5.0, 5.0), "Himmelblau"),
        Benchmark("valley", _valley(VALLEY_KAPPA, 0.0), VALLEY_START, ((0.0, 0.0),), 0.0, (-3.0, 1.0, -1.5, 1.5),
                  f"valley (kappa={VALLEY_KAPPA:g}, axis-aligned)"),
        Benchmark("rotated_valley", _valley(VALLEY_KAPPA, VALLEY_ANGLE), _rotate(*VALLEY_START, VALLEY_ANGLE),
                  ((0.0, 0.0),), 0.0, (-3.0, 1.0, -1.5, 1.5), f"valley (kappa={VALLEY_KAPPA:g}, rotated 30 deg)"),
    )
}


class _Objective(torch.autograd.Function):
    """f(point) with the benchmark's hand-written gradient as its backward."""

    @staticmethod
    def forward(ctx, point: torch.Tensor, fn: Callable) -> torch.Tensor:  # type: ignore[override]
        value, dx, dy = fn(*point.tolist())
        ctx.grad = (dx, dy)
        return point.new_tensor(value)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        return grad_output * grad_output.new_tensor(ctx.grad), None


class Point(nn.Module):
    """The whole "model": one 2-vector parameter, so DropGrad masks coordinates x and y."""

    def __init__(self, start: Sequence[float]) -> None:
        super().__init__()
        self.xy = nn.Parameter(torch.tensor(start, dtype=torch.float64))

    def forward(self, fn: Callable) -> torch.Tensor:
        return _Objective.apply(self.xy, fn)


# ----------------------------------------------------------------------------------------
# Optimizers and their learning rates (chosen so the baseline visibly converges in 500 steps
# from the start point; see README.md for the table and how they were picked).


def _lion(params, lr: float) -> torch.optim.Optimizer:
    try:
        from lion_pytorch import Lion
    except ImportError as err:  # an optional dependency of the library ([vit] extra)
        raise RuntimeError("optimizer 'lion' needs lion-pytorch: pip install lion-pytorch") from err
    return Lion(params, lr=lr)


# foreach=False: the multi-tensor kernels only pay off with many parameters; here there is one.
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, foreach=False),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr, foreach=False),
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.01, foreach=False),
    "adagrad": lambda params, lr: torch.optim.Adagrad(params, lr=lr, foreach=False),
    "adadelta": lambda params, lr: torch.optim.Adadelta(params, lr=lr, foreach=False),
    "lion": _lion,
}
OPTIMIZER_LABELS = {"sgd": "SGD (momentum 0.9)", "adam": "Adam", "adamw": "AdamW (wd 0.01)",
                    "adagrad": "Adagrad", "adadelta": "Adadelta", "lion": "Lion"}

LEARNING_RATES: dict[str, dict[str, float]] = {
    "rosenbrock": {"sgd": 1e-3, "adam": 0.1, "adamw": 0.1, "adagrad": 1.5, "adadelta": 5.0, "lion": 1e-2},
    "beale": {"sgd": 1e-3, "adam": 0.1, "adamw": 0.1, "adagrad": 0.5, "adadelta": 2.0, "lion": 1e-2},
    "himmelblau": {"sgd": 1e-3, "adam": 0.03, "adamw": 0.03, "adagrad": 0.3, "adadelta": 1.0, "lion": 0.03},
    "valley": {"sgd": 1e-2, "adam": 0.03, "adamw": 0.03, "adagrad": 0.3, "adadelta": 2.0, "lion": 1e-2},
    "rotated_valley": {"sgd": 1e-2, "adam": 0.03, "adamw": 0.03, "adagrad": 0.3, "adadelta": 2.0, "lion": 1e-2},
}


# ----------------------------------------------------------------------------------------
# Regularizers: name -> how to turn the base optimizer into the one whose step(closure) runs.


class Regularizer(NamedTuple):
    name: str
    wrap: Callable[[torch.optim.Optimizer, nn.Module, float, int], torch.optim.Optimizer]
    stochastic: bool  # False: one run per configuration (the seed is not used)
    strength_name: str  # what the ``strength`` column means for it
    strength: float | None = None  # its value in the trajectory and convergence runs (DropGrad: --drop_rate)


def _dropgrad(optimizer: torch.optim.Optimizer, model: nn.Module, strength: float, seed: int) -> torch.optim.Optimizer:
    return DropGrad(optimizer, drop_rate=strength, seed=seed, model=model)


def _clip_norm(optimizer: torch.optim.Optimizer, model: nn.Module, level: float, seed: int) -> torch.optim.Optimizer:
    # On 2 coordinates norm clipping caps the step length far from the minimum (Rosenbrock's walls).
    return ClippedOptimizer(optimizer, GradientClipper("norm", clipping_level=level, seed=seed, model=model))


def _sam(optimizer: torch.optim.Optimizer, model: nn.Module, rho: float, seed: int) -> torch.optim.Optimizer:
    return SAM(optimizer, rho=rho, model=model)  # evaluates the closure at x and at x + rho g/|g|


# A new entry needs only a wrap function, e.g. "sam": lambda opt, model, rho, seed: SAM(opt, rho=rho),
# and its step(closure) may call the closure as often as it needs.
REGULARIZERS: dict[str, Regularizer] = {
    r.name: r
    for r in (
        Regularizer("none", lambda optimizer, model, strength, seed: optimizer, False, ""),
        Regularizer("dropgrad", _dropgrad, True, "drop_rate"),
        Regularizer("clip_norm", _clip_norm, False, "clipping_level", 1.0),
        Regularizer("sam", _sam, False, "rho", 0.05),
    )
}


# ----------------------------------------------------------------------------------------
# One optimization run.

DIVERGED_RADIUS = 1e3  # a run whose point leaves this box (or becomes non-finite) has diverged


@dataclass
class Run:
    path: list[list[float]]  # x_t for t = 0 .. last recorded step
    losses: list[float]  # f(x_t) - f_min, same steps; inf from the step a run diverged
    diverged: bool


def run(benchmark: Benchmark, optimizer_name: str, regularizer: str, lr: float, strength: float, seed: int,
        steps: int) -> Run:
    """Optimize ``benchmark`` for ``steps`` steps from its start point; record every x_t and f(x_t)."""
    model = Point(benchmark.start)
    optimizer = REGULARIZERS[regularizer].wrap(OPTIMIZERS[optimizer_name](model.parameters(), lr), model,
                                               strength, seed)
    fn = benchmark.value_and_grad

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = model(fn)
        loss.backward()
        return loss

    path, losses = [], []
    for _ in range(steps):
        point = model.xy.tolist()
        loss = optimizer.step(closure).item()  # f at the point before the step
        path.append(point)
        losses.append(loss - benchmark.f_min)
        if not (math.isfinite(loss) and abs(point[0]) < DIVERGED_RADIUS and abs(point[1]) < DIVERGED_RADIUS):
            losses[-1] = math.inf
            return Run(path, losses + [math.inf] * (steps - len(losses) + 1), True)
    point = model.xy.tolist()
    path.append(point)
    losses.append(fn(*point)[0] - benchmark.f_min)
    diverged = not (math.isfinite(losses[-1]) and max(map(abs, point)) < DIVERGED_RADIUS)
    if diverged:
        losses[-1] = math.inf
    return Run(path, losses, diverged)


# ----------------------------------------------------------------------------------------
# The experiments. Every row of results.csv is one plotted number (see README.md for the schema).

FIELDS = ("figure", "function", "optimizer", "regularizer", "strength", "lr", "seed", "step", "x", "y", "loss",
          "diverged")


def recorded_steps(steps: int, points: int = 100) -> list[int]:
    """About ``points`` evenly spaced steps in [0, steps], always with 0 and ``steps``."""
    stride = max(1, steps // points)
    return sorted(set(range(0, steps + 1, stride)) | {steps})


class Spec(NamedTuple):
    """One run: everything :func:`run` needs, hashable and picklable (for the worker pool)."""

    function: str
    optimizer: str
    regularizer: str
    lr: float
    strength: float | None  # None: the regularizer has no strength (``none``)
    seed: int | None  # None: a deterministic regularizer (the seed is not used)
    steps: int


def _execute(spec: Spec) -> Run:
    return run(BENCHMARKS[spec.function], spec.optimizer, spec.regularizer, spec.lr, spec.strength or 0.0,
               spec.seed or 0, spec.steps)


def execute(specs: Sequence[Spec], workers: int) -> list[Run]:
    """Run every spec, in ``workers`` processes when more than one (results in spec order)."""
    if workers <= 1 or len(specs) < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return [_execute(spec) for spec in specs]
    # fork: the children inherit the imported torch and the mask backend choice; runs are
    # independent and deterministic, so the results do not depend on the number of workers.
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.map(_execute, specs, chunksize=max(1, len(specs) // (8 * workers)))


def convergence_specs(functions: Sequence[str], optimizers: Sequence[str], regularizers: Sequence[str],
                      drop_rate: float, seeds: int, steps: int) -> list[Spec]:
    """The runs of trajectories.png (the first seed) and convergence.png (all seeds)."""
    specs = []
    for function in functions:
        for optimizer in optimizers:
            lr = LEARNING_RATES[function][optimizer]
            for name in regularizers:
                regularizer = REGULARIZERS[name]
                strength = drop_rate if name == "dropgrad" else regularizer.strength
                for seed in range(seeds) if regularizer.stochastic else [None]:
                    specs.append(Spec(function, optimizer, name, lr, strength, seed, steps))
    return specs


def sensitivity_specs(function: str, optimizers: Sequence[str], drop_rates: Sequence[float],
                      lr_factors: Sequence[float], seeds: int, steps: int, regularizer: str = "dropgrad") -> list[Spec]:
    """The runs of sensitivity.png: ``regularizer`` over strength x (base learning rate x factor) x seed."""
    specs = []
    for optimizer in optimizers:
        for factor in lr_factors:
            lr = LEARNING_RATES[function][optimizer] * factor
            for rate in drop_rates:
                # drop rate 0 is the library's exact no-op: one deterministic run is enough.
                for seed in range(seeds) if rate > 0 else [0]:
                    specs.append(Spec(function, optimizer, regularizer, lr, rate, seed, steps))
    return specs


def _blank(value: float | int | None) -> float | int | str:
    return "" if value is None else value


def rows_of(figure: str, spec: Spec, result: Run) -> Iterator[dict]:
    """The CSV rows one run contributes to ``figure``."""
    common = {"figure": figure, "function": spec.function, "optimizer": spec.optimizer,
              "regularizer": spec.regularizer, "strength": _blank(spec.strength), "lr": spec.lr,
              "seed": _blank(spec.seed), "diverged": int(result.diverged)}
    if figure == "trajectories":  # every step, with the point
        for t, ((x, y), loss) in enumerate(zip(result.path, result.losses)):
            yield {**common, "step": t, "x": x, "y": y, "loss": loss}
    elif figure == "convergence":  # ~100 steps per run are plenty for a log-scale curve
        for t in recorded_steps(spec.steps):
            yield {**common, "step": t, "x": "", "y": "", "loss": result.losses[t]}
    else:  # sensitivity: the final point and loss
        x, y = result.path[-1]
        yield {**common, "step": spec.steps, "x": x, "y": y, "loss": result.losses[-1]}


def write_csv(rows: Sequence[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


# ----------------------------------------------------------------------------------------
# Command line.

FULL = {"steps": 500, "seeds": 20, "sensitivity_seeds": 3, "lr_factors": (0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
        "drop_rates": (0.0, 0.1, 0.3, 0.5, 0.75)}
QUICK = {"steps": 30, "seeds": 10, "sensitivity_seeds": 1, "lr_factors": (0.25, 1.0, 4.0),
         "drop_rates": (0.0, 0.3, 0.5)}


PROG = "benchmarks.py"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, help="folder for the figures and results.csv")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK['steps']} steps, {QUICK['seeds']} seeds, a 3x3 sensitivity grid")
    parser.add_argument("--steps", type=_positive_int, default=None,
                        help=f"optimizer steps per run (default {FULL['steps']}, quick {QUICK['steps']})")
    parser.add_argument("--seeds", type=_positive_int, default=None,
                        help=f"DropGrad mask seeds per configuration (default {FULL['seeds']}, "
                        f"quick {QUICK['seeds']})")
    parser.add_argument("--sensitivity_seeds", type=_positive_int, default=None,
                        help=f"seeds per sensitivity cell (default {FULL['sensitivity_seeds']}, quick 1)")
    parser.add_argument("--drop_rate", type=_rate, default=0.3, help="DropGrad rate of the trajectory and "
                        "convergence runs (default 0.3)")
    parser.add_argument("--sensitivity_function", choices=sorted(BENCHMARKS), default="valley",
                        help="function of the drop rate x learning rate grid (default valley: the zig-zag case)")
    parser.add_argument("--drop_rates", nargs="+", type=_rate, default=None,
                        help="sensitivity rows (default: " + " ".join(map(str, FULL["drop_rates"])) + ")")
    parser.add_argument("--lr_factors", nargs="+", type=_positive_float, default=None,
                        help="sensitivity columns, times each optimizer's learning rate (default: "
                        + " ".join(map(str, FULL["lr_factors"])) + ")")
    parser.add_argument("--workers", type=_positive_int, default=min(2, os.cpu_count() or 1),
                        help="processes for the runs (default: min(2, CPUs)); the results do not depend on it")
    parser.add_argument("--functions", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS),
                        help="functions of the trajectory and convergence figures (default: all)")
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=list(OPTIMIZERS),
                        help="default: all")
    parser.add_argument("--regularizers", nargs="+", choices=list(REGULARIZERS), default=list(REGULARIZERS),
                        help="default: all (the sensitivity grid needs dropgrad)")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for name in ("steps", "seeds", "sensitivity_seeds", "drop_rates", "lr_factors"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    args.drop_rates, args.lr_factors = sorted(set(args.drop_rates)), sorted(set(args.lr_factors))
    return args


def prepare_output_dir(path: str) -> Path:
    """Create ``path`` and check that it is writable, before any minute is spent computing."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise SystemExit(f"{PROG}: error: cannot write to --output_dir {path!r}: {err.strerror or err}") from None
    return out


def planned_specs(args: argparse.Namespace) -> tuple[list[Spec], list[Spec]]:
    """The runs the command line asks for: the trajectory/convergence runs, then the sensitivity grid's."""
    curve_specs = convergence_specs(args.functions, args.optimizers, args.regularizers, args.drop_rate, args.seeds,
                                    args.steps)
    grid_specs = []
    if "dropgrad" in args.regularizers:
        grid_specs = sensitivity_specs(args.sensitivity_function, args.optimizers, args.drop_rates, args.lr_factors,
                                       args.sensitivity_seeds, args.steps)
    return curve_specs, grid_specs


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = prepare_output_dir(args.output_dir)
    torch.set_num_threads(1)  # 2-element tensors: threads only add synchronization
    # The compiled mask kernel takes seconds to build and gains nothing on 2 coordinates; the
    # eager path draws bitwise the same masks.
    set_mask_backend("eager")

    curve_specs, grid_specs = planned_specs(args)
    specs = curve_specs + grid_specs
    print(f"{len(specs)} runs, {sum(spec.steps for spec in specs)} optimizer steps, {args.workers} worker(s)",
          flush=True)
    start = time.perf_counter()
    try:
        results = execute(specs, args.workers)
    except (ValueError, RuntimeError) as err:  # e.g. the library refusing an argument; say it in one line
        raise SystemExit(f"{PROG}: error: {type(err).__name__}: {err}") from None
    rows = []
    for spec, result in zip(curve_specs, results):
        if spec.seed in (None, 0):  # the trajectory of DropGrad is its first seed's
            rows += rows_of("trajectories", spec, result)
        rows += rows_of("convergence", spec, result)
    for spec, result in zip(grid_specs, results[len(curve_specs):]):
        rows += rows_of("sensitivity", spec, result)
    csv_path = out / "results.csv"
    write_csv(rows, csv_path)
    compute_s = time.perf_counter() - start

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import plots  # noqa: E402  (next to this file; imports matplotlib only when plotting)

    written = plots.plot_all(csv_path, out)
    for path in [csv_path, *written]:
        print(f"wrote {path}")
    print(f"{len(rows)} rows; runs {compute_s:.1f} s; wall time {time.perf_counter() - _STARTED:.1f} s "
          f"(with imports and plots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
