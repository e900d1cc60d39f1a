"""Draw trajectories.png, convergence.png and sensitivity.png from results.csv alone.

    python examples/analysis/plots.py outputs/analysis/results.csv              # next to the CSV
    python examples/analysis/plots.py results.csv --output_dir figures

``benchmarks.py`` calls :func:`plot_all` on the CSV it has just written, so the figures never
show a number that is not in the CSV. Only the contour backgrounds and the start/minimum
markers come from the function definitions in ``benchmarks.py``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks import BENCHMARKS, OPTIMIZER_LABELS  # noqa: E402

FLOOR = 1e-16  # f - f* below this is drawn at it: log axes cannot show 0, and float64 noise lives there
CEILING = 1e100  # f - f* above this is not drawn (a run on its way to diverge)
STYLES = {"none": {"color": "black", "linestyle": "-"}, "dropgrad": {"color": "tab:red", "linestyle": "--"}}
EXTRA_STYLES = [{"color": c, "linestyle": ":"} for c in ("tab:blue", "tab:green", "tab:purple", "tab:brown")]
LABELS = {"none": "no regularizer", "dropgrad": "DropGrad", "clip_norm": "norm clipping", "sam": "SAM"}


def _float(text: str) -> float | None:
    return float(text) if text != "" else None


def load_rows(path: Path) -> list[dict]:
    """results.csv as dicts with numbers parsed (empty cells become None)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("strength", "lr", "x", "y", "loss"):
            row[key] = _float(row[key])
        for key in ("seed", "step", "diverged"):
            row[key] = int(row[key]) if row[key] != "" else None
    return rows


def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def _style(regularizer: str, regularizers: Sequence[str]) -> dict:
    if regularizer in STYLES:
        return STYLES[regularizer]
    return EXTRA_STYLES[[r for r in regularizers if r not in STYLES].index(regularizer) % len(EXTRA_STYLES)]


def _label(row: dict) -> str:
    name = LABELS.get(row["regularizer"], row["regularizer"])
    return name if row["strength"] is None else f"{name} (p={row['strength']:g})" if row["regularizer"] == "dropgrad" \
        else f"{name} ({row['strength']:g})"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@functools.cache
def _landscape(function: str, n: int = 150) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    benchmark = BENCHMARKS[function]
    x0, x1, y0, y1 = benchmark.box
    xs, ys = np.meshgrid(np.linspace(x0, x1, n), np.linspace(y0, y1, n))
    return xs, ys, np.log10(np.maximum(benchmark.value_and_grad(xs, ys)[0] - benchmark.f_min, 1e-6))


def _contour(ax, function: str) -> None:
    benchmark = BENCHMARKS[function]
    xs, ys, gap = _landscape(function)
    # A shaded image plus a few lines: as readable as filled contours, several times cheaper.
    ax.imshow(gap, origin="lower", extent=benchmark.box, aspect="auto", cmap="Greys_r", alpha=0.35)
    ax.contour(xs, ys, gap, levels=14, colors="grey", linewidths=0.4, alpha=0.7)
    for mx, my in benchmark.minima:
        ax.plot(mx, my, marker="*", color="gold", markeredgecolor="black", markersize=11, zorder=5)
    ax.plot(*benchmark.start, marker="o", color="black", markersize=5, zorder=5)
    ax.set_xlim(*benchmark.box[:2])
    ax.set_ylim(*benchmark.box[2:])


def plot_trajectories(rows: list[dict], output: Path) -> None:
    """One panel per (function, optimizer): the path of each regularizer (DropGrad: one seed)."""
    plt = _pyplot()
    rows = [r for r in rows if r["figure"] == "trajectories"]
    functions, optimizers = _ordered(r["function"] for r in rows), _ordered(r["optimizer"] for r in rows)
    regularizers = _ordered(r["regularizer"] for r in rows)
    paths: dict[tuple, list] = defaultdict(list)
    for r in rows:
        paths[r["function"], r["optimizer"], r["regularizer"]].append(r)
    fig, axes = plt.subplots(len(functions), len(optimizers), figsize=(2.7 * len(optimizers), 2.5 * len(functions)),
                             squeeze=False)
    handles = {}
    for i, function in enumerate(functions):
        for j, optimizer in enumerate(optimizers):
            ax = axes[i, j]
            _contour(ax, function)
            for regularizer in regularizers:
                run = paths.get((function, optimizer, regularizer))
                if not run:
                    continue
                (line,) = ax.plot([r["x"] for r in run], [r["y"] for r in run], linewidth=1.2, alpha=0.9,
                                  **_style(regularizer, regularizers))
                seed = run[0]["seed"]
                handles[regularizer] = (line, _label(run[0]) + ("" if seed is None else f", seed {seed}"))
                if run[-1]["diverged"]:
                    ax.text(0.03, 0.03, f"{LABELS.get(regularizer, regularizer)} diverged", transform=ax.transAxes,
                            fontsize=7, color=_style(regularizer, regularizers)["color"])
            ax.tick_params(labelsize=7, labelleft=j == 0)
            if i == 0:
                ax.set_title(f"{OPTIMIZER_LABELS.get(optimizer, optimizer)}", fontsize=9)
            if j == 0:
                ax.set_ylabel(BENCHMARKS[function].label, fontsize=8)
            lr = next(r["lr"] for r in rows if r["function"] == function and r["optimizer"] == optimizer)
            ax.text(0.97, 0.97, f"lr {lr:g}", transform=ax.transAxes, ha="right", va="top", fontsize=7)
    steps = max(r["step"] for r in rows)
    fig.suptitle(f"{steps} steps from a fixed start (dot); stars: global minima", y=0.995, fontsize=10)
    fig.legend([h for h, _ in handles.values()], [label for _, label in handles.values()], loc="upper center",
               bbox_to_anchor=(0.5, 0.975), ncol=len(handles), fontsize=9, frameon=False)
    # Fixed margins: tight_layout measures every tick label of every panel (seconds here).
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.03, top=0.925, wspace=0.12, hspace=0.18)
    fig.savefig(output, dpi=90)
    plt.close(fig)


def _loss_array(losses: list[float]) -> np.ndarray:
    # Diverged runs carry inf: keep them in the quantiles (they are runs that failed) as a huge value.
    return np.clip(np.nan_to_num(np.asarray(losses, dtype=float), nan=1e300, posinf=1e300), FLOOR, 1e300)


def _gap(values: np.ndarray) -> np.ndarray:
    # Values far off the chart (diverging, or the stand-in for diverged runs) are not drawn: the
    # curve or band stops there, and autoscaling never sees numbers its log transform overflows on.
    return np.where(values >= CEILING, np.nan, values)


def plot_convergence(rows: list[dict], output: Path) -> None:
    """f - f* against step per (function, optimizer): a line per deterministic run, median + IQR over seeds."""
    plt = _pyplot()
    rows = [r for r in rows if r["figure"] == "convergence"]
    functions, optimizers = _ordered(r["function"] for r in rows), _ordered(r["optimizer"] for r in rows)
    regularizers = _ordered(r["regularizer"] for r in rows)
    runs: dict[tuple, dict] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        runs[r["function"], r["optimizer"], r["regularizer"]][r["seed"]].append(r)
    fig, axes = plt.subplots(len(functions), len(optimizers), figsize=(2.7 * len(optimizers), 2.2 * len(functions)),
                             squeeze=False, sharex=True, sharey="row")
    handles = {}
    for i, function in enumerate(functions):
        top, bottom = FLOOR, math.inf
        for j, optimizer in enumerate(optimizers):
            ax = axes[i, j]
            for regularizer in regularizers:
                seeds = runs.get((function, optimizer, regularizer))
                if not seeds:
                    continue
                style = _style(regularizer, regularizers)
                first = next(iter(seeds.values()))
                steps = np.array([r["step"] for r in first])
                losses = np.stack([_loss_array([r["loss"] for r in run]) for run in seeds.values()])
                top = max(top, float(losses[:, 0].max()))
                bottom = min(bottom, float(np.quantile(losses, 0.25, axis=0).min()))
                if len(seeds) == 1:
                    (line,) = ax.plot(steps, _gap(losses[0]), linewidth=1.3, **style)
                    label = _label(first[0])
                else:
                    q25, q50, q75 = map(_gap, np.quantile(losses, [0.25, 0.5, 0.75], axis=0))
                    (line,) = ax.plot(steps, q50, linewidth=1.3, **style)
                    ax.fill_between(steps, q25, q75, color=style["color"], alpha=0.2, linewidth=0)
                    label = f"{_label(first[0])}: median, IQR over {len(seeds)} seeds"
                handles[regularizer] = (line, label)
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7, labelleft=j == 0)
            if i == 0:
                ax.set_title(OPTIMIZER_LABELS.get(optimizer, optimizer), fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{BENCHMARKS[function].label}\nf - f*", fontsize=8)
            if i == len(functions) - 1:
                ax.set_xlabel("step", fontsize=8)
        # One y range per function: from the lowest curve or band to well above the start
        # (diverged runs leave it).
        axes[i, 0].set_ylim(max(FLOOR, min(bottom, top)) / 10, top * 1e3)
    fig.suptitle(f"f - f* (log scale, drawn at {FLOOR:g} when below); the seed drives only the DropGrad masks",
                 y=0.995, fontsize=10)
    fig.legend([h for h, _ in handles.values()], [label for _, label in handles.values()], loc="upper center",
               bbox_to_anchor=(0.5, 0.975), ncol=len(handles), fontsize=9, frameon=False)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.05, top=0.93, wspace=0.08, hspace=0.15)
    fig.savefig(output, dpi=90)
    plt.close(fig)


def plot_sensitivity(rows: list[dict], output: Path) -> None:
    """Heatmap per optimizer: log10 of the median final f - f* over drop rate x learning rate."""
    plt = _pyplot()
    rows = [r for r in rows if r["figure"] == "sensitivity"]
    optimizers = _ordered(r["optimizer"] for r in rows)
    function, steps = rows[0]["function"], rows[0]["step"]
    cells: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        cells[r["optimizer"], r["strength"], r["lr"]].append(r["loss"])
    grids = {}
    for optimizer in optimizers:
        rates = sorted({r["strength"] for r in rows if r["optimizer"] == optimizer})
        lrs = sorted({r["lr"] for r in rows if r["optimizer"] == optimizer})
        value = np.full((len(rates), len(lrs)), np.nan)
        for a, rate in enumerate(rates):
            for b, lr in enumerate(lrs):
                median = float(np.median(_loss_array(cells[optimizer, rate, lr])))
                value[a, b] = math.inf if median >= 1e300 else math.log10(max(median, FLOOR))
        grids[optimizer] = (rates, lrs, value)
    finite = np.concatenate([v[np.isfinite(v)] for _, _, v in grids.values()])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (-16.0, 1.0)
    cols = min(3, len(optimizers))
    nrows = math.ceil(len(optimizers) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat[len(optimizers):]:
        ax.set_visible(False)
    image = None
    for ax, optimizer in zip(axes.flat, optimizers):
        rates, lrs, value = grids[optimizer]
        shown = np.ma.masked_invalid(np.where(np.isinf(value), np.nan, value))
        image = ax.imshow(shown, origin="lower", aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax)
        ax.set_facecolor("lightgrey")
        for a in range(len(rates)):
            for b in range(len(lrs)):
                v = value[a, b]
                text = "div." if math.isinf(v) else f"{v:.1f}".replace("-0.0", "0.0")
                dark = math.isinf(v) or v > (vmin + vmax) / 2
                ax.text(b, a, text, ha="center", va="center", fontsize=7, color="black" if dark else "white")
        ax.set_xticks(range(len(lrs)), [f"{lr:.2g}" for lr in lrs], fontsize=7, rotation=45)
        ax.set_yticks(range(len(rates)), [f"{p:g}" for p in rates], fontsize=7)
        ax.set_xlabel("learning rate", fontsize=8)
        ax.set_ylabel("drop rate p", fontsize=8)
        ax.set_title(OPTIMIZER_LABELS.get(optimizer, optimizer), fontsize=9)
    seeds = max(len({r["seed"] for r in rows if r["optimizer"] == o and r["strength"] == p})
                for o in optimizers for p in grids[o][0])
    fig.suptitle(f"{BENCHMARKS[function].label}: log10(f - f*) after {steps} steps, median over {seeds} mask seed(s) "
                 f"(p = 0: one deterministic run; grey 'div.': diverged)", fontsize=9)
    fig.subplots_adjust(left=0.06, right=0.9, bottom=0.12, top=0.9, wspace=0.25, hspace=0.45)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.025, pad=0.02, label="log10(f - f*)")
    fig.savefig(output, dpi=90)
    plt.close(fig)


FIGURES = {"trajectories": plot_trajectories, "convergence": plot_convergence, "sensitivity": plot_sensitivity}


def plot_all(csv_path: Path, output_dir: Path) -> list[Path]:
    """Draw every figure that has rows in ``csv_path``; return the PNG paths written."""
    rows = load_rows(csv_path)
    present = {r["figure"] for r in rows}
    written = []
    for name, draw in FIGURES.items():
        if name in present:
            draw(rows, output_dir / f"{name}.png")
            written.append(output_dir / f"{name}.png")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", help="results.csv written by benchmarks.py")
    parser.add_argument("--output_dir", default=None, help="folder for the PNGs (default: the CSV's folder)")
    args = parser.parse_args(argv)
    csv_path = Path(args.csv)
    if not csv_path.is_file():
        parser.exit(2, f"error: no such file: {csv_path}\n")
    out = Path(args.output_dir) if args.output_dir else csv_path.parent
    out.mkdir(parents=True, exist_ok=True)
    for path in plot_all(csv_path, out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
