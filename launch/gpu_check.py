"""The GPU check behind launch/gpu_check.sh: CUDA tests, mask kernel throughput, the ViT job; one summary table.

    python launch/gpu_check.py                 # one CUDA GPU, at most ~8 minutes
    python launch/gpu_check.py --device cpu    # smoke run of the same path on the CPU (tiny sizes, no figures)

Steps (each a subprocess with a time limit): ``pytest -m cuda tests/mask/test_cuda.py``; ``python -m
dropgrad_dist bench mask --cases throughput``; ``examples/vit/train.py`` for ``--steps`` steps with fp16
and bf16, each with and without DropGrad (images/s from the median logged step time after the first
10%, loss over the first vs the last 10% of steps). Writes OUTPUT_DIR/summary.md (and the steps'
outputs beside it); exits 1 if a step failed or a test failed, 2 without a CUDA device.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp16", "bf16")
DROP_RATE = 0.1
KERNEL_TARGET = 0.8  # mask kernel throughput over _foreach_mul_'s
OVERHEAD_TARGET = 3.0  # DropGrad's share of the ViT step time, percent
# The CPU smoke run: a tiny ViT and data set, a small copy; the same commands otherwise.
SMOKE_VIT = ["--cpu", "--train_size", "128", "--test_size", "32", "--batch_size", "32", "--num_layers", "1",
             "--num_heads", "2", "--hidden_dim", "32", "--mlp_dim", "64", "--warmup_steps", "1"]
SMOKE_BENCH = ["--copy_mib", "16", "--throughput_sets", "small", "--rounds", "2"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda (the check) or cpu (a smoke run with tiny sizes)")
    parser.add_argument("--steps", type=int, default=None, help="ViT steps per run (default 200; cpu: 3)")
    parser.add_argument("--output_dir", default=str(ROOT / "outputs" / "gpu_check"))
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 200 if args.device == "cuda" else 3
    if args.steps < 1:
        parser.error(f"--steps must be positive, got {args.steps}")
    return args


def _command(args: argparse.Namespace, out: Path) -> dict[str, tuple[list[str], int]]:
    """Step name -> (command, time limit in seconds)."""
    python = sys.executable
    smoke = args.device == "cpu"
    steps = {
        "tests": ([python, "-m", "pytest", str(ROOT / "tests" / "mask" / "test_cuda.py"), "-m", "cuda", "-q",
                   "-p", "no:xdist", "-p", "no:cacheprovider", f"--junitxml={out / 'tests.xml'}"], 300),
        "bench": ([python, "-m", "dropgrad_dist", "bench", "mask", "--device", args.device, "--cases", "throughput",
                   "--json", *(SMOKE_BENCH if smoke else [])], 180),
    }
    for precision in PRECISIONS:
        for rate in (0.0, DROP_RATE):
            run = f"vit_{precision}_p{rate:g}"
            steps[run] = ([python, str(ROOT / "examples" / "vit" / "train.py"), "--mixed_precision", precision,
                           "--drop_rate", str(rate), "--max_steps", str(args.steps), "--output_dir", str(out / run),
                           *(SMOKE_VIT if smoke else [])], 240)
    return steps


def run_steps(args: argparse.Namespace, out: Path) -> dict[str, int | str]:
    """Run every step (one after another on the GPU; at once in the CPU smoke run); name -> exit code."""
    steps = _command(args, out)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if args.device == "cpu":  # the smoke run's processes share the cores: one thread each
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    codes: dict[str, int | str] = {}
    running = []
    for name, (cmd, limit) in steps.items():
        print(f"[gpu_check] {name}: {' '.join(cmd)}", flush=True)
        log = open(out / f"{name}.log", "w")
        running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env),
                        time.monotonic() + limit, log))
        if args.device == "cuda":  # timings must not overlap
            codes.update(_wait([running.pop()]))
    codes.update(_wait(running))
    return codes


def _wait(running: list) -> dict[str, int | str]:
    codes: dict[str, int | str] = {}
    for name, proc, deadline, log in running:
        try:
            codes[name] = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            codes[name] = "timed out"
        log.close()
        print(f"[gpu_check] {name}: exit {codes[name]}", flush=True)
    return codes


def test_counts(path: Path) -> dict[str, int] | None:
    """passed/failed/skipped of the junit XML that pytest wrote, or None."""
    try:
        suite = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failed = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    return {"passed": total - failed - skipped, "failed": failed, "skipped": skipped}


def bench_rows(path: Path) -> list[dict]:
    text = "\n" + (path.read_text() if path.exists() else "")
    start = text.find("\n{")  # the JSON report starts a line; warnings may come before it
    try:
        return json.loads(text[start:])["rows"] if start >= 0 else []
    except (json.JSONDecodeError, KeyError):
        return []


def vit_figures(run_dir: Path, batch_size: int) -> dict | None:
    """images/s (median step time after the first 10% of steps) and the loss at the start and the end."""
    try:
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    except (OSError, json.JSONDecodeError):
        return None
    train = [r for r in records if r.get("type") == "train"]
    if not train:
        return None
    tenth = max(1, len(train) // 10)
    timed = train[tenth:] or train
    step_time = statistics.median(r["step_time"] for r in timed)
    first = statistics.fmean(r["loss"] for r in train[:tenth])
    last = statistics.fmean(r["loss"] for r in train[-tenth:])
    return {"images_per_s": batch_size / step_time, "step_ms": step_time * 1e3, "loss_first": first,
            "loss_last": last, "steps": len(train)}


def summary_rows(args: argparse.Namespace, out: Path, codes: dict) -> list[tuple[str, str, str, str]]:
    """(check, measured, target, status) rows of the summary table."""
    rows = []
    counts = test_counts(out / "tests.xml")
    tests_ok = codes["tests"] == 0 and counts is not None
    measured = ("no result" if counts is None else
                f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
    rows.append(("cuda tests (pytest -m cuda)", measured, "all pass, none skipped",
                 "ok" if tests_ok and counts["skipped"] == 0 else "FAIL" if not tests_ok else "skipped"))
    rows += _bench_summary(bench_rows(out / "bench.log"), codes["bench"])
    batch_size = 32 if args.device == "cpu" else 128
    figures = {(p, r): vit_figures(out / f"vit_{p}_p{r:g}", batch_size) for p in PRECISIONS for r in (0.0, DROP_RATE)}
    for precision in PRECISIONS:
        base = figures[(precision, 0.0)]
        for rate in (0.0, DROP_RATE):
            run = figures[(precision, rate)]
            name = f"ViT {precision}, " + (f"DropGrad p={rate:g}" if rate else "no DropGrad")
            if run is None or codes[f"vit_{precision}_p{rate:g}"] != 0:
                rows.append((name, f"failed (exit {codes[f'vit_{precision}_p{rate:g}']})", "", "FAIL"))
                continue
            down = run["loss_last"] < run["loss_first"]
            measured = (f"{run['images_per_s']:.0f} images/s ({run['step_ms']:.2f} ms/step), loss "
                        f"{run['loss_first']:.3f} -> {run['loss_last']:.3f} over {run['steps']} steps")
            target, status = "loss goes down", "ok" if down else "loss not down"
            if rate and base is not None:
                overhead = 100 * (run["step_ms"] / base["step_ms"] - 1)
                measured += f"; step time {overhead:+.1f}% vs no DropGrad"
                target = f"loss goes down; overhead <= {OVERHEAD_TARGET:g}%"
                status = status if overhead <= OVERHEAD_TARGET else f"{status}; overhead over target"
            rows.append((name, measured, target, status))
    return rows


def _bench_summary(rows: list[dict], code) -> list[tuple[str, str, str, str]]:
    if code != 0 or not rows:
        return [("bench mask throughput", f"failed (exit {code})", "", "FAIL")]
    summary = []
    for row in rows:
        if row["candidate"].startswith("copy_"):
            summary.append((f"memory bandwidth ({row['case']})",
                            f"{row['device_GB_per_s'] or row['call_GB_per_s']:.1f} GB/s", "", "measured"))
        elif row["candidate"] == "drop_tensors_":
            per = "device" if row["device_GB_per_s"] else "call"
            measured = (f"{row[f'{per}_GB_per_s']:.1f} GB/s ({per} time), {row['vs_foreach']:.2f} x _foreach_mul_, "
                        f"{row['pct_copy_bw']:.0f}% of the copy; per call with host work {row['call_ms']:.3f} ms")
            ok = row["vs_foreach"] >= KERNEL_TARGET
            summary.append((f"mask kernel, {row['case']}", measured, f">= {KERNEL_TARGET:g} x _foreach_mul_",
                            "ok" if ok else "below target"))
    return summary


def write_summary(args: argparse.Namespace, out: Path, rows: list, elapsed: float) -> str:
    import torch

    if args.device == "cuda":
        device = torch.cuda.get_device_name(0)
    else:
        device = "CPU smoke run (GPU_CHECK_DEVICE=cpu: tiny sizes, the figures mean nothing)"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines = [f"# GPU check: {device}", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_version}",
             f"- ViT steps per run: {args.steps}; whole check: {elapsed:.0f} s", "",
             "| check | measured | target | status |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); this check needs one GPU. "
              "GPU_CHECK_DEVICE=cpu runs a smoke test of the same path on the CPU.", file=sys.stderr)
        return 2
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    codes = run_steps(args, out)
    rows = summary_rows(args, out, codes)
    print(write_summary(args, out, rows, time.monotonic() - start))
    print(f"[gpu_check] summary written to {out / 'summary.md'}")
    failed = any(code != 0 for code in codes.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
