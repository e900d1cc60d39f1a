"""A regularizer x optimizer x seed study of the ViT: runs train.py for every combination, then plots.

    python examples/vit/sweep.py --preset cpu --output_dir outputs/study       # 2 CPU cores, <= 30 min
    python examples/vit/sweep.py --preset gpu --output_dir outputs/study_gpu   # CIFAR-10, all GPUs
    python examples/vit/sweep.py --preset gnp --output_dir outputs/gnp         # Adam / +GR / +GR zero-warmup
    python examples/vit/sweep.py --scenarios baseline dropgrad --optimizers adamw --seeds 0 1 2 -- --max_steps 100

Each run writes ``<output_dir>/<optimizer>-<scenario>-seed<k>/metrics.jsonl``. The sweep is
resumable: a run whose metrics.jsonl holds its final record is skipped. A failed run is reported
(its log is ``<run>/train.log``) and the sweep goes on; the exit code is non-zero if any failed.
Arguments after ``--`` go to every train.py run (after the preset's, so they win).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Every scenario starts from no regularization at all, then adds its own flags.
UNREGULARIZED = ["--drop_rate", "0", "--max_grad_norm", "0", "--dropout", "0"]
SCENARIOS: dict[str, list[str]] = {
    "baseline": [],
    "dropout": ["--dropout", "0.1"],
    "dropgrad": ["--drop_rate", "0.1"],
    "dropout+dropgrad": ["--dropout", "0.1", "--drop_rate", "0.1"],
    "clip_norm": ["--clipping_type", "norm", "--clipping_level", "1.0"],
    "clip_autoclip": ["--clipping_type", "auto_clip", "--p_autoclip", "0.9"],
    "gnp": ["--gnp_alpha", "0.8", "--gnp_r", "0.05"],
    "gnp_zero_warmup": ["--gnp_alpha", "0.8", "--gnp_r", "0.05", "--gnp_warmup", "zero"],
    "sam": ["--sam_rho", "0.05"],
}
OPTIMIZERS = ["adam", "adamw", "sgd", "adagrad", "adadelta", "lion"]
PRESETS: dict[str, dict] = {
    # 2 CPU cores, synthetic shapes: a small ViT (patch 8: 16 tokens, 2 blocks, width 64) and 240
    # steps of 64 images, two runs at a time on one thread each: 162 runs in about 17 minutes (986 s measured).
    "cpu": dict(scenarios=list(SCENARIOS), optimizers=OPTIMIZERS, seeds=[0, 1, 2], jobs=2, threads=1,
                launcher=None, args=["--cpu", "--dataset", "synthetic", "--train_size", "4000", "--test_size", "1000",
                                     "--batch_size", "64", "--max_steps", "240", "--eval_every", "40",
                                     "--warmup_steps", "30", "--patch_size", "8", "--num_layers", "2",
                                     "--hidden_dim", "64", "--mlp_dim", "128", "--num_heads", "4"]),
    # All GPUs of one machine, CIFAR-10 (downloaded to --data_dir), ViT patch 4, 6 blocks, width 256.
    "gpu": dict(scenarios=list(SCENARIOS), optimizers=OPTIMIZERS, seeds=[0, 1, 2], jobs=1, threads=None,
                launcher="gpus",
                args=["--dataset", "cifar10", "--batch_size", "256", "--epochs", "60", "--warmup_steps", "1000",
                      "--patch_size", "4", "--num_layers", "6", "--hidden_dim", "256", "--mlp_dim", "512",
                      "--num_heads", "8", "--eval_every", "500"]),
    # The GNP paper's comparison: Adam, Adam + gradient regularization, and with zero-warmup (GPU, CIFAR-10).
    "gnp": dict(scenarios=["baseline", "gnp", "gnp_zero_warmup"], optimizers=["adam"], seeds=[0, 1, 2], jobs=1,
                threads=None, launcher="gpus",
                args=["--dataset", "cifar10", "--batch_size", "256", "--epochs", "100", "--warmup_steps", "2000",
                      "--patch_size", "4", "--num_layers", "6", "--hidden_dim", "256", "--mlp_dim", "512",
                      "--num_heads", "8", "--eval_every", "500", "--lr", "1e-3"]),
}


def gpu_launcher() -> str:
    """``accelerate launch`` over every GPU of this machine (DDP with the DropGrad hook), bf16."""
    import torch

    gpus = torch.cuda.device_count()
    if gpus > 1:
        return f"accelerate launch --multi_gpu --num_processes {gpus} --mixed_precision bf16"
    return "accelerate launch --num_processes 1 --mixed_precision bf16"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="a documented grid (the flags below override its parts)")
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=None)
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=None, help="runs at a time (default: the preset's, else 1)")
    parser.add_argument("--output_dir", default="outputs/sweep")
    parser.add_argument("--launcher", default=None, help="command that runs train.py (default: this Python; "
                        "e.g. 'accelerate launch --num_processes 2 --cpu')")
    parser.add_argument("--no_plot", action="store_true")
    args = parser.parse_args(argv)
    preset = PRESETS.get(args.preset, dict(scenarios=["baseline", "dropgrad"], optimizers=["adamw"], seeds=[0],
                                           jobs=1, threads=None, launcher=None, args=[]))
    for name in ("scenarios", "optimizers", "seeds", "jobs", "launcher"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    if args.launcher == "gpus":
        args.launcher = gpu_launcher()
    args.threads = preset["threads"]
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    return args, preset["args"] + passthrough


def run_name(optimizer: str, scenario: str, seed: int) -> str:
    return f"{optimizer}-{scenario}-seed{seed}"


def finished(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a complete run (its final record)."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return False
    lines = [line for line in metrics.read_text().splitlines() if line.strip()]
    try:
        return bool(lines) and json.loads(lines[-1]).get("type") == "final"
    except json.JSONDecodeError:
        return False


def command(args: argparse.Namespace, optimizer: str, scenario: str, seed: int, extra: list[str]) -> list[str]:
    launcher = shlex.split(args.launcher) if args.launcher else [sys.executable]
    return [*launcher, str(HERE / "train.py"), "--optimizer", optimizer, "--seed", str(seed), *UNREGULARIZED,
            *SCENARIOS[scenario], "--output_dir", str(Path(args.output_dir) / run_name(optimizer, scenario, seed)),
            *extra]


def run_one(args: argparse.Namespace, optimizer: str, scenario: str, seed: int, extra: list[str]) -> str | None:
    """Run one training (logging to <run>/train.log); returns an error line, or None on success."""
    run_dir = Path(args.output_dir) / run_name(optimizer, scenario, seed)
    cmd = command(args, optimizer, scenario, seed, extra)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)  # parallel runs on few cores: threads only contend
    start = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - start
    if done.returncode or not finished(run_dir):
        lines = (run_dir / "train.log").read_text().strip().splitlines()
        return f"{run_dir.name}: exit code {done.returncode} after {seconds:.0f} s: {lines[-1] if lines else ''}"
    print(f"[sweep] {run_dir.name} done in {seconds:.0f} s", flush=True)
    return None


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    grid = [(o, s, k) for o in args.optimizers for s in args.scenarios for k in args.seeds]
    todo = [cell for cell in grid if not finished(Path(args.output_dir) / run_name(*cell))]
    print(f"[sweep] {len(grid)} runs, {len(grid) - len(todo)} already finished, {len(todo)} to go, "
          f"{args.jobs} at a time; output in {args.output_dir}", flush=True)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        errors = [e for e in pool.map(lambda cell: run_one(args, *cell, extra), todo) if e]
    print(f"[sweep] {len(todo) - len(errors)} runs done, {len(errors)} failed in {time.perf_counter() - start:.0f} s",
          flush=True)
    for error in errors:
        print(f"[sweep] FAILED {error}", file=sys.stderr)
    if not args.no_plot and len(errors) < len(grid):
        from plot import main as plot_main  # same folder

        plot_main([args.output_dir])
    return 1 if errors else 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
