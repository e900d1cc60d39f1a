"""Plot train/test loss and accuracy curves per run and write a summary table (Markdown and CSV).

    python examples/vit/plot.py outputs/sweep            # every */metrics.jsonl below it
    python examples/vit/plot.py runA runB --output curves.png
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

PANELS = (("train_loss", "train loss"), ("test_loss", "test loss"),
          ("train_accuracy", "train accuracy"), ("test_accuracy", "test accuracy"))


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
    evals = [r for r in records if r.get("type") == "eval"]
    final = next((r for r in reversed(records) if r.get("type") == "final"), {})
    return {"name": run.name, "evals": evals, "final": final}


def summary_rows(runs: list[dict]) -> list[dict]:
    rows = []
    for run in runs:
        evals = run["evals"]
        rows.append({
            "run": run["name"],
            "steps": evals[-1]["step"] if evals else 0,
            "final_test_accuracy": round(evals[-1]["test_accuracy"], 4) if evals else None,
            "best_test_accuracy": round(max(e["test_accuracy"] for e in evals), 4) if evals else None,
            "final_test_loss": round(evals[-1]["test_loss"], 4) if evals else None,
            "final_train_loss": round(evals[-1]["train_loss"], 4) if evals else None,
            "wall_time_s": round(run["final"].get("wall_time", float("nan")), 1),
        })
    return rows


def write_tables(rows: list[dict], out_dir: Path) -> None:
    with open(out_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(str(v) for v in row.values()) + " |" for row in rows]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")


def plot(runs: list[dict], output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for ax, (key, title) in zip(axes.flat, PANELS):
        for run in runs:
            steps = [e["step"] for e in run["evals"]]
            ax.plot(steps, [e[key] for e in run["evals"]], marker="o", markersize=3, label=run["name"])
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run folders, or folders holding run folders")
    parser.add_argument("--output", default=None, help="PNG path (default: <first path>/curves.png)")
    args = parser.parse_args(argv)
    try:
        runs = [read_run(run) for run in find_runs(args.paths)]
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    output = Path(args.output) if args.output else Path(args.paths[0]) / "curves.png"
    output.parent.mkdir(parents=True, exist_ok=True)
    plot(runs, output)
    rows = summary_rows(runs)
    write_tables(rows, output.parent)
    print((output.parent / "summary.md").read_text(), end="")
    print(f"wrote {output}, {output.parent / 'summary.md'}, {output.parent / 'summary.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
