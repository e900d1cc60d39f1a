"""Run a grid of ViT scenarios (Baseline, Dropout, DropGrad, Dropout+DropGrad) x optimizers, then plot.

    python examples/vit/sweep.py --optimizers adamw sgd --max_steps 300
    python examples/vit/sweep.py --launcher "accelerate launch --num_processes 2 --cpu" -- --batch_size 64

Each run writes ``<output_dir>/<optimizer>-<scenario>/metrics.jsonl``; the plot and summary
tables land in ``<output_dir>`` (see plot.py). Arguments after ``--`` go to every train.py run.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCENARIOS = {  # name -> (dropout, use DropGrad)
    "baseline": (False, False),
    "dropout": (True, False),
    "dropgrad": (False, True),
    "dropout+dropgrad": (True, True),
}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--optimizers", nargs="+", default=["adamw"],
                        choices=["adam", "adamw", "sgd", "adagrad", "adadelta", "lion"])
    parser.add_argument("--drop_rate", type=float, default=0.1)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="outputs/sweep")
    parser.add_argument("--launcher", default=sys.executable, help="command that runs train.py "
                        "(default: this Python; e.g. 'accelerate launch --num_processes 2 --cpu')")
    parser.add_argument("--no_plot", action="store_true")
    return parser.parse_args(argv), passthrough


def run_command(args: argparse.Namespace, optimizer: str, scenario: str, extra: list[str]) -> list[str]:
    use_dropout, use_dropgrad = SCENARIOS[scenario]
    return [*shlex.split(args.launcher), str(HERE / "train.py"),
            "--optimizer", optimizer, "--seed", str(args.seed), "--max_steps", str(args.max_steps),
            "--dropout", str(args.dropout if use_dropout else 0.0),
            "--drop_rate", str(args.drop_rate if use_dropgrad else 0.0),
            "--output_dir", str(Path(args.output_dir) / f"{optimizer}-{scenario}"), *extra]


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    for optimizer in args.optimizers:
        for scenario in args.scenarios:
            command = run_command(args, optimizer, scenario, extra)
            print("[sweep] " + shlex.join(command), flush=True)
            done = subprocess.run(command)
            if done.returncode:
                print(f"[sweep] {optimizer}-{scenario} failed with exit code {done.returncode}", file=sys.stderr)
                return done.returncode
    if not args.no_plot:
        from plot import main as plot_main  # same folder

        return plot_main([args.output_dir])
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
