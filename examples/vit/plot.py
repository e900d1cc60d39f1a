"""Plot one run or a sweep: loss and accuracy curves, a summary table, the gradient-norm distribution.

    python examples/vit/plot.py outputs/demo             # one run (a folder with metrics.jsonl)
    python examples/vit/plot.py outputs/study            # every */metrics.jsonl below it
    python examples/vit/plot.py runA runB --output_dir figures

One run: ``curves.png`` shows its train loss per step (and a moving average) with the test
loss, and train and test accuracy, titled with what the run trained. Several runs: those named
``<optimizer>-<scenario>-seed<k>`` (what sweep.py writes) are grouped over seeds, other run
folders are groups of one; ``curves.png`` has one column per optimizer (train loss per step,
test loss, test accuracy) and one curve per scenario, with a ± std band where a group has
several seeds. Also writes ``grad_norms.png`` (histograms of the per-step global gradient norm,
log scale, before and after clipping), ``summary.md`` and ``summary.csv`` (final and best test
accuracy, final test loss, wall time, and the difference to the same optimizer's baseline
against the seed-to-seed spread; ``summary.md`` leaves out columns that are empty for every run
and the ± for groups of one run).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from pathlib import Path

NAME = re.compile(r"^(?P<optimizer>[a-z]+)-(?P<scenario>.+)-seed(?P<seed>\d+)$")


def find_runs(paths: list[str]) -> list[Path]:
    runs = []
    for path in map(Path, paths):
        if (path / "metrics.jsonl").is_file():
            runs.append(path)
        else:
            runs.extend(sorted(p.parent for p in path.glob("*/metrics.jsonl")))
    if not runs:
        raise FileNotFoundError(f"no metrics.jsonl in {paths} or their sub-folders")
    return runs


def read_run(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    match = NAME.match(run.name)
    optimizer, scenario = (match["optimizer"], match["scenario"]) if match else ("", run.name)
    return {"name": run.name, "optimizer": optimizer, "scenario": scenario,
            "config": next((r for r in records if r.get("type") == "config"), None),
            "evals": [r for r in records if r.get("type") == "eval"],
            "train": [r for r in records if r.get("type") == "train"],
            "final": next((r for r in reversed(records) if r.get("type") == "final"), None)}


def group_runs(runs: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(optimizer, scenario) -> its finished runs (one per seed)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        if run["final"] is not None and run["evals"]:
            groups.setdefault((run["optimizer"], run["scenario"]), []).append(run)
    return groups


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summary_rows(groups: dict[tuple[str, str], list[dict]]) -> list[dict]:
    rows = []
    for (optimizer, scenario), runs in sorted(groups.items()):
        final = [r["evals"][-1]["test_accuracy"] for r in runs]
        best = [max(e["test_accuracy"] for e in r["evals"]) for r in runs]
        loss = [r["evals"][-1]["test_loss"] for r in runs]
        wall = [r["final"].get("wall_time", math.nan) for r in runs]
        rows.append({"optimizer": optimizer, "scenario": scenario, "seeds": len(runs),
                     "steps": runs[0]["evals"][-1]["step"],
                     "final_test_accuracy_mean": _mean_std(final)[0], "final_test_accuracy_std": _mean_std(final)[1],
                     "best_test_accuracy_mean": _mean_std(best)[0], "best_test_accuracy_std": _mean_std(best)[1],
                     "final_test_loss_mean": _mean_std(loss)[0], "final_test_loss_std": _mean_std(loss)[1],
                     "wall_time_s_mean": statistics.fmean(wall)})
    by_key = {(r["optimizer"], r["scenario"]): r for r in rows}
    for row in rows:
        base = by_key.get((row["optimizer"], "baseline"))
        if base is None or row["scenario"] == "baseline":
            row["final_accuracy_vs_baseline"], row["beyond_seed_spread"] = None, None
            continue
        diff = row["final_test_accuracy_mean"] - base["final_test_accuracy_mean"]
        # The spread of a difference of two means over seeds: its standard error, from both stds.
        spread = math.sqrt(row["final_test_accuracy_std"] ** 2 / row["seeds"]
                           + base["final_test_accuracy_std"] ** 2 / base["seeds"])
        row["final_accuracy_vs_baseline"] = diff
        row["beyond_seed_spread"] = abs(diff) > 2 * spread if spread > 0 else None
    return rows


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return "" if value is None else str(value)


def write_tables(rows: list[dict], out_dir: Path) -> None:
    with open(out_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    sweep = any(r["optimizer"] for r in rows)
    header = ["optimizer", "scenario" if sweep else "run", "seeds", "final test acc", "best test acc",
              "final test loss", "wall s", "vs baseline", "beyond 2 s.e."]
    table = [[r["optimizer"], r["scenario"], str(r["seeds"]),
              _mean_pm_std(r, "final_test_accuracy"), _mean_pm_std(r, "best_test_accuracy"),
              _mean_pm_std(r, "final_test_loss"), f"{r['wall_time_s_mean']:.1f}",
              "" if r["final_accuracy_vs_baseline"] is None else f"{r['final_accuracy_vs_baseline']:+.3f}",
              {None: "", True: "yes", False: "no"}[r["beyond_seed_spread"]]] for r in rows]
    # A column empty for every run (no optimizer outside a sweep, no baseline to compare with) says nothing.
    keep = [i for i in range(len(header)) if any(line[i] for line in table)]
    lines = ["| " + " | ".join(header[i] for i in keep) + " |", "|" + "---|" * len(keep)]
    lines += ["| " + " | ".join(line[i] for i in keep) + " |" for line in table]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")


def _mean_pm_std(row: dict, key: str) -> str:
    """``mean ± std`` over seeds; a group of one run has no spread to show."""
    mean = f"{row[key + '_mean']:.3f}"
    return mean if row["seeds"] == 1 else f"{mean} ± {row[key + '_std']:.3f}"


def moving_average(values: list[float], window: int) -> list[float]:
    """At each position, the mean of the last ``window`` values (of all so far at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _window(num_steps: int) -> int:
    """Moving-average width: a fiftieth of the run, so the curve keeps its shape at any length."""
    return max(1, num_steps // 50)


def _series(run: dict, key: str) -> dict[int, float]:
    """step -> value: ``"train_loss"`` is the per-step training loss averaged over a window, else an eval field."""
    if key == "train_loss":
        pairs = [(r["step"], r["loss"]) for r in run["train"] if "loss" in r]
        smooth = moving_average([loss for _, loss in pairs], _window(len(pairs)))
        return {step: value for (step, _), value in zip(pairs, smooth)}
    return {e["step"]: e[key] for e in run["evals"] if key in e}


def _bands(ax, runs: list[dict], key: str, label: str, color) -> None:
    """The mean over a group's runs (seeds) at each step of its first run, with a ± std band over several."""
    series = [_series(run, key) for run in runs]
    steps = sorted(series[0])
    columns = [[s[step] for s in series if step in s] for step in steps]
    means = [statistics.fmean(c) for c in columns]
    # Evaluations are few (one, for a short run): markers keep a single point visible.
    marker = None if key == "train_loss" else "o"
    ax.plot(steps, means, color=color, label=label, linewidth=1.4, marker=marker, markersize=3)
    if len(runs) > 1:
        stds = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in columns]
        ax.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                        color=color, alpha=0.15, linewidth=0)


CURVES = (("train_loss", "train loss (moving average)"), ("test_loss", "test loss"),
          ("test_accuracy", "test accuracy"))


def curves_figure(groups: dict[tuple[str, str], list[dict]]):
    """Several runs: one column per optimizer, one curve per scenario (the seed mean, ± std band).

    Rows: the train loss per step (moving average) where runs logged it, test loss, test accuracy.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optimizers = sorted({o for o, _ in groups})
    scenarios = sorted({s for _, s in groups})
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(scenarios)}
    curves = [(key, label) for key, label in CURVES
              if any(_series(run, key) for runs in groups.values() for run in runs)]
    fig, axes = plt.subplots(len(curves), len(optimizers), figsize=(4.2 * len(optimizers), 3.2 * len(curves)),
                             squeeze=False, sharex="col")
    for column, optimizer in enumerate(optimizers):
        for row, (key, label) in enumerate(curves):
            ax = axes[row, column]
            for scenario in scenarios:
                if (optimizer, scenario) in groups:
                    _bands(ax, groups[(optimizer, scenario)], key, scenario, colors[scenario])
            if row == 0:
                ax.set_title(optimizer or "runs", fontsize=10)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[-1, column].set_xlabel("optimizer step")
    axes[-1, 0].legend(fontsize=7, loc="lower right")
    seeds = sorted({len(runs) for runs in groups.values()})
    spread = "one run per curve" if seeds == [1] else \
        f"mean ± std over seeds ({'-'.join(map(str, sorted({seeds[0], seeds[-1]})))} per curve)"
    fig.suptitle(f"{len(groups)} configurations, {spread}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_curves(groups: dict[tuple[str, str], list[dict]], output: Path) -> None:
    import matplotlib.pyplot as plt

    fig = curves_figure(groups)
    fig.savefig(output, dpi=100)
    plt.close(fig)


def describe_run(run: dict) -> str:
    """A title for one run: what it trained (from its config record) and where it ended."""
    config = run["config"] or {}
    regularizers = []
    if config.get("drop_rate"):
        regularizers.append(f"DropGrad p={config['drop_rate']:g}")
    if config.get("dropout"):
        regularizers.append(f"dropout {config['dropout']:g}")
    if config.get("clipping_type"):
        regularizers.append(f"{config['clipping_type']} clipping")
    if config.get("sam_rho"):
        regularizers.append(f"SAM rho={config['sam_rho']:g}")
    elif config.get("gnp_alpha"):
        regularizers.append(f"GNP alpha={config['gnp_alpha']:g} r={config.get('gnp_r', 0):g}")
    processes = config.get("processes", 0)
    parts = [f"ViT on {config['dataset']}" if config.get("dataset") else "", config.get("optimizer", ""),
             " + ".join(regularizers) if config else "",
             f"{processes} process{'es' if processes > 1 else ''}" if processes else ""]
    last = run["evals"][-1]
    wall = run["final"].get("wall_time") if run["final"] else None
    result = f"test accuracy {last['test_accuracy']:.3f} after {last['step']} steps" + \
        (f" in {wall:.0f} s" if wall else "")
    return f"{run['name']}: {', '.join(p for p in parts if p)}\n{result}"


def run_figure(run: dict):
    """One run: train loss per step (and its moving average) with the test loss; train and test accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, accuracy_ax) = plt.subplots(1, 2, figsize=(11, 4.4))
    pairs = [(r["step"], r["loss"]) for r in run["train"] if "loss" in r]
    if pairs:
        steps, losses = zip(*pairs)
        window = _window(len(losses))
        loss_ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.7, label="train loss per step")
        loss_ax.plot(steps, moving_average(list(losses), window), color="tab:blue", linewidth=1.4,
                     label=f"train loss, mean of {window} steps")
    eval_steps = [e["step"] for e in run["evals"]]
    loss_ax.plot(eval_steps, [e["test_loss"] for e in run["evals"]], "o-", color="tab:orange", label="test loss")
    accuracy_ax.plot(eval_steps, [e["test_accuracy"] for e in run["evals"]], "o-", color="tab:orange",
                     label="test accuracy")
    if all("train_accuracy" in e for e in run["evals"]):
        accuracy_ax.plot(eval_steps, [e["train_accuracy"] for e in run["evals"]], "s--", color="tab:blue",
                         label="train accuracy (batches since the previous evaluation)")
    loss_ax.set_ylabel("cross-entropy loss")
    accuracy_ax.set_ylabel("accuracy")
    for ax in (loss_ax, accuracy_ax):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(describe_run(run), fontsize=10)
    fig.tight_layout()
    return fig


def plot_run(run: dict, output: Path) -> None:
    import matplotlib.pyplot as plt

    fig = run_figure(run)
    fig.savefig(output, dpi=100)
    plt.close(fig)


def _clips(run: dict) -> bool:
    """Whether the run's config clipped its gradients (a clipping method or ``--max_grad_norm``)."""
    config = run["config"] or {}
    return bool(config.get("clipping_type") or config.get("max_grad_norm"))


def _single_name(groups: dict[tuple[str, str], list[dict]]) -> str:
    """The run's name when there is one run, else "runs"."""
    runs = [run for group in groups.values() for run in group]
    return runs[0]["name"] if len(runs) == 1 else "runs"


def plot_grad_norms(groups: dict[tuple[str, str], list[dict]], output: Path) -> bool:
    """Histograms of log10 of the per-step global gradient norm; False when no run recorded one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, list[float]]] = {}
    for (optimizer, scenario), runs in groups.items():
        clipped = "clip" in scenario or any(_clips(run) for run in runs)
        for key, suffix in (("grad_norm", "before clipping"), ("grad_norm_clipped", "after clipping")):
            values = [r[key] for run in runs for r in run["train"] if r.get(key, 0) and r[key] > 0]
            if values and (key == "grad_norm" or clipped):
                label = f"{scenario}, {suffix}" if clipped else scenario
                series.setdefault(optimizer, {})[label] = [math.log10(v) for v in values]
    if not series:
        return False
    optimizers = sorted(series)
    fig, axes = plt.subplots(1, len(optimizers), figsize=(4.2 * len(optimizers), 3.6), squeeze=False)
    for ax, optimizer in zip(axes[0], optimizers):
        for label, values in sorted(series[optimizer].items()):
            ax.hist(values, bins=50, histtype="step", density=True, label=label, linewidth=1.1)
        ax.set_yscale("log")
        ax.set_title(f"{optimizer or _single_name(groups)}: global gradient norm per step", fontsize=9)
        ax.set_xlabel("log10 ||g||")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("density (log)")
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run folders, or folders holding run folders")
    parser.add_argument("--output_dir", default=None, help="where figures and tables go (default: the first path)")
    args = parser.parse_args(argv)
    try:
        groups = group_runs([read_run(run) for run in find_runs(args.paths)])
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not groups:
        print(f"error: no finished run (with evaluations) in {args.paths}", file=sys.stderr)
        return 2
    out_dir = Path(args.output_dir or args.paths[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [run for group in groups.values() for run in group]
    if len(runs) == 1:
        plot_run(runs[0], out_dir / "curves.png")
    else:
        plot_curves(groups, out_dir / "curves.png")
    has_norms = plot_grad_norms(groups, out_dir / "grad_norms.png")
    write_tables(summary_rows(groups), out_dir)
    print((out_dir / "summary.md").read_text(), end="")
    written = ["curves.png"] + (["grad_norms.png"] if has_norms else []) + ["summary.md", "summary.csv"]
    print(f"wrote {', '.join(str(out_dir / name) for name in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
