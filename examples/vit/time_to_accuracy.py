"""Test accuracy against training time over a bandwidth-limited link: compression hooks vs DropGrad compact.

    python examples/vit/time_to_accuracy.py --output_dir outputs/link_tta --seeds 0 1 2   # run, then report
    python examples/vit/time_to_accuracy.py --output_dir outputs/link_tta --report_only   # report only

Each candidate trains ``train.py`` on 2 CPU processes through ``launch/slow_link.sh`` (a private
network namespace whose loopback ``tc`` limits to ``--link``), one run at a time, to the same step
budget; finished runs are skipped. The report: per candidate the final test accuracy, the training
time (the sum of the logged step times, evaluations excluded) until the test accuracy first reaches
95% of the dense all-reduce run's final accuracy (the mean over its seeds), and the bytes the
loopback carried per rank (``link.json``: every rank's traffic, over the whole run). Writes
``summary.md`` in ``--output_dir`` and the plot (test accuracy vs training time) to ``--plot``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plot import read_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# name -> train.py flags; the dense all-reduce run comes first (the reference accuracy)
CANDIDATES = {
    "allreduce": ["--drop_rate", "0"],
    "bf16": ["--drop_rate", "0", "--comm_hook", "bf16"],
    "powersgd4": ["--drop_rate", "0", "--comm_hook", "powersgd", "--powersgd_rank", "4"],
    "compact05": ["--drop_rate", "0.5", "--communication", "compact"],
    "compact09": ["--drop_rate", "0.9", "--communication", "compact"],
}
REFERENCE = "allreduce"
TARGET = 0.95  # of the reference's final accuracy
COMMON = ["--optimizer", "adamw", "--max_steps", "150", "--batch_size", "64", "--train_size", "8000",
          "--test_size", "1000", "--eval_every", "15", "--warmup_steps", "15"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/link_tta")
    parser.add_argument("--link", default="1gbit", help="RATE[,DELAY] of the loopback (launch/slow_link.sh's LINK)")
    parser.add_argument("--candidates", nargs="+", choices=list(CANDIDATES), default=list(CANDIDATES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--report_only", action="store_true", help="only summarize the runs already there")
    parser.add_argument("--plot", default=None, help="where the figure goes (default: OUTPUT_DIR/time_to_accuracy.png)")
    args, extra = parser.parse_known_args(argv)
    args.extra = extra  # further train.py flags, for every run
    return args


def run_name(candidate: str, seed: int) -> str:
    return f"adamw-{candidate}-seed{seed}"  # sweep.py's naming, so plot.py groups the runs too


def train(args: argparse.Namespace, out: Path) -> None:
    env = {**os.environ, "LINK": args.link}
    for seed in args.seeds:
        for candidate in args.candidates:
            run_dir = out / run_name(candidate, seed)
            if (run_dir / "link.json").is_file() and read_run(run_dir)["final"] is not None:
                continue
            cmd = ["bash", str(ROOT / "launch" / "slow_link.sh"), *COMMON, *CANDIDATES[candidate], "--seed",
                   str(seed), "--output_dir", str(run_dir), *args.extra]
            print(f"[time_to_accuracy] {' '.join(cmd)}", flush=True)
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / "train.log", "w") as log:
                code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
            print(f"[time_to_accuracy] {run_dir.name}: exit {code}", flush=True)


def curve(run: dict) -> list[tuple[float, float]]:
    """(training seconds, test accuracy) at each evaluation: seconds = the sum of step times up to it."""
    elapsed, step_seconds, points = 0.0, {}, []
    for record in run["train"]:
        elapsed += record["step_time"]
        step_seconds[record["step"]] = elapsed
    for record in run["evals"]:
        points.append((step_seconds[record["step"]], record["test_accuracy"]))
    return points


def load(out: Path, candidates: list[str], seeds: list[int]) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for candidate in candidates:
        for seed in seeds:
            run_dir = out / run_name(candidate, seed)
            if not (run_dir / "metrics.jsonl").is_file():
                continue
            run = read_run(run_dir)
            if run["final"] is None or not (run_dir / "link.json").is_file():
                continue
            link = json.loads((run_dir / "link.json").read_text())
            run["bytes_per_rank"] = link["lo_tx_bytes"] / link["processes"]
            run["curve"] = curve(run)
            runs.setdefault(candidate, []).append(run)
    return runs


def summary(runs: dict[str, list[dict]]) -> tuple[list[dict], float]:
    reference = statistics.fmean(r["curve"][-1][1] for r in runs[REFERENCE])
    threshold = TARGET * reference
    rows = []
    for candidate, group in runs.items():
        reached = [next((t for t, acc in r["curve"] if acc >= threshold), None) for r in group]
        hit = [t for t in reached if t is not None]
        finals = [r["curve"][-1][1] for r in group]
        rows.append({
            "candidate": candidate, "seeds": len(group),
            "final_accuracy": statistics.fmean(finals),
            "final_accuracy_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "train_seconds": statistics.fmean(r["curve"][-1][0] for r in group),
            "seconds_to_target": statistics.fmean(hit) if hit else None,
            "reached": f"{len(hit)}/{len(group)}",
            "MB_per_rank": statistics.fmean(r["bytes_per_rank"] for r in group) / 1e6,
        })
    return rows, threshold


def markdown(rows: list[dict], threshold: float, link: str) -> str:
    lines = [f"Link {link}; target: test accuracy {threshold:.3f} ({TARGET:.0%} of the {REFERENCE} run's final).", "",
             "| candidate | seeds | final test accuracy | training s | s to target (runs reaching it) | MB per rank |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        to_target = "not reached" if row["seconds_to_target"] is None else f"{row['seconds_to_target']:.1f}"
        lines.append(f"| {row['candidate']} | {row['seeds']} | {row['final_accuracy']:.3f} ± "
                     f"{row['final_accuracy_std']:.3f} | {row['train_seconds']:.1f} | {to_target} ({row['reached']}) | "
                     f"{row['MB_per_rank']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, list[dict]], threshold: float, link: str, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for candidate, group in runs.items():
        for k, run in enumerate(group):
            times, accs = zip(*run["curve"])
            ax.plot(times, accs, marker="o", markersize=3, color=f"C{list(runs).index(candidate)}",
                    alpha=0.9 if k == 0 else 0.45, label=candidate if k == 0 else None)
    ax.axhline(threshold, color="grey", linestyle="--", linewidth=1, label=f"{TARGET:.0%} of {REFERENCE}'s final")
    ax.set_xlabel("training time, s (sum of step times; evaluations excluded)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"ViT example, 2 CPU ranks, loopback limited to {link}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.output_dir)
    if not args.report_only:
        train(args, out)
    runs = load(out, args.candidates, args.seeds)
    if REFERENCE not in runs:
        print(f"error: no finished {REFERENCE} run in {out}", file=sys.stderr)
        return 1
    rows, threshold = summary(runs)
    text = markdown(rows, threshold, args.link)
    (out / "summary.md").write_text(text)
    plot(runs, threshold, args.link, Path(args.plot) if args.plot else out / "time_to_accuracy.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
