"""Plot a sweep: curves with mean ± std over seeds, a summary table, and the gradient-norm distribution.

    python examples/vit/plot.py outputs/study            # every */metrics.jsonl below it
    python examples/vit/plot.py runA runB --output_dir figures

Runs named ``<optimizer>-<scenario>-seed<k>`` (what sweep.py writes) are grouped over seeds;
other run folders are groups of one. Writes ``curves.png`` (test accuracy and loss per
optimizer, one band per scenario), ``grad_norms.png`` (histograms of the per-step global
gradient norm, log scale, before and after clipping), ``summary.md`` and ``summary.csv``
(mean ± std over seeds of final and best test accuracy, final test loss, wall time, and the
difference to the same optimizer's baseline against the seed-to-seed spread).
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
    header = ["optimizer", "scenario", "seeds", "final test acc", "best test acc", "final test loss", "wall s",
              "vs baseline", "beyond 2 s.e."]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["optimizer"], r["scenario"], str(r["seeds"]),
            f"{r['final_test_accuracy_mean']:.3f} ± {r['final_test_accuracy_std']:.3f}",
            f"{r['best_test_accuracy_mean']:.3f} ± {r['best_test_accuracy_std']:.3f}",
            f"{r['final_test_loss_mean']:.3f} ± {r['final_test_loss_std']:.3f}",
            f"{r['wall_time_s_mean']:.1f}",
            "" if r["final_accuracy_vs_baseline"] is None else f"{r['final_accuracy_vs_baseline']:+.3f}",
            {None: "", True: "yes", False: "no"}[r["beyond_seed_spread"]]]) + " |")
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")


def _bands(ax, runs: list[dict], key: str, label: str, color) -> None:
    steps = [e["step"] for e in runs[0]["evals"]]
    columns = [[r["evals"][i][key] for r in runs if i < len(r["evals"])] for i in range(len(steps))]
    means = [statistics.fmean(c) for c in columns]
    stds = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in columns]
    ax.plot(steps, means, color=color, label=label, linewidth=1.4)
    ax.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                    color=color, alpha=0.15, linewidth=0)


def plot_curves(groups: dict[tuple[str, str], list[dict]], output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optimizers = sorted({o for o, _ in groups})
    scenarios = sorted({s for _, s in groups})
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(scenarios)}
    fig, axes = plt.subplots(2, len(optimizers), figsize=(4.2 * len(optimizers), 7), squeeze=False, sharex="col")
    for column, optimizer in enumerate(optimizers):
        for row, (key, title) in enumerate((("test_accuracy", "test accuracy"), ("test_loss", "test loss"))):
            ax = axes[row, column]
            for scenario in scenarios:
                if (optimizer, scenario) in groups:
                    _bands(ax, groups[(optimizer, scenario)], key, scenario, colors[scenario])
            ax.set_title(f"{optimizer or 'runs'}: {title}", fontsize=10)
            ax.grid(alpha=0.3)
        axes[1, column].set_xlabel("optimizer step")
    axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.suptitle("mean ± std over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)


def plot_grad_norms(groups: dict[tuple[str, str], list[dict]], output: Path) -> bool:
    """Histograms of log10 of the per-step global gradient norm; False when no run recorded one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, list[float]]] = {}
    for (optimizer, scenario), runs in groups.items():
        for key, suffix in (("grad_norm", "before clipping"), ("grad_norm_clipped", "after clipping")):
            values = [r[key] for run in runs for r in run["train"] if r.get(key, 0) and r[key] > 0]
            if values and (key == "grad_norm" or "clip" in scenario):
                label = f"{scenario}, {suffix}" if "clip" in scenario else scenario
                series.setdefault(optimizer, {})[label] = [math.log10(v) for v in values]
    if not series:
        return False
    optimizers = sorted(series)
    fig, axes = plt.subplots(1, len(optimizers), figsize=(4.2 * len(optimizers), 3.6), squeeze=False)
    for ax, optimizer in zip(axes[0], optimizers):
        for label, values in sorted(series[optimizer].items()):
            ax.hist(values, bins=50, histtype="step", density=True, label=label, linewidth=1.1)
        ax.set_yscale("log")
        ax.set_title(f"{optimizer or 'runs'}: global gradient norm per step", fontsize=9)
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
    plot_curves(groups, out_dir / "curves.png")
    has_norms = plot_grad_norms(groups, out_dir / "grad_norms.png")
    write_tables(summary_rows(groups), out_dir)
    print((out_dir / "summary.md").read_text(), end="")
    written = ["curves.png"] + (["grad_norms.png"] if has_norms else []) + ["summary.md", "summary.csv"]
    print(f"wrote {', '.join(str(out_dir / name) for name in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
