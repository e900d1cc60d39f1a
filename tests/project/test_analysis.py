"""examples/analysis/benchmarks.py --quick writes complete figures and CSV; bad input fails in one line."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # this checkout, whichever it is
ANALYSIS = ROOT / "examples" / "analysis"
SCRIPT = ANALYSIS / "benchmarks.py"

FUNCTIONS = {"rosenbrock", "beale", "himmelblau", "valley", "rotated_valley"}
OPTIMIZERS = {"sgd", "adam", "adamw", "adagrad", "adadelta", "lion"}
REGULARIZERS = {"none", "dropgrad", "clip_norm", "sam"}
COLUMNS = ["figure", "function", "optimizer", "regularizer", "strength", "lr", "seed", "step", "x", "y", "loss",
           "diverged"]
QUICK_STEPS, QUICK_DROP_RATES, QUICK_LR_FACTORS = 30, {0.0, 0.3, 0.5}, 3
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_quick_run_writes_complete_figures_and_csv(tmp_path, monkeypatch):
    """One --quick run, checked from every side (one test, so pytest -n auto runs it only once)."""
    out = tmp_path / "out"
    started = time.perf_counter()
    done = _run("--output_dir", str(out), "--quick", cwd=tmp_path)
    wall = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    assert "wall time" in done.stdout.splitlines()[-1]
    # The budget is 30 s on 2 idle cores; allow for a machine shared with other test workers.
    assert wall < 120, f"--quick took {wall:.0f} s"
    _check_pngs(out)
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    _check_trajectories(rows)
    _check_convergence(rows)
    _check_sensitivity(rows)
    _check_rows_agree_across_figures(rows)
    _check_figures_redraw_from_the_csv_alone(out / "results.csv", tmp_path / "redrawn", monkeypatch)


def _check_pngs(out: Path) -> None:
    for name in ("trajectories.png", "convergence.png", "sensitivity.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE, name
        assert len(data) > 20_000, f"{name} is suspiciously small ({len(data)} bytes)"
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(out / "trajectories.png").shape
    assert width > 800 and height > 600


def _check_trajectories(rows: list[dict]) -> None:
    runs = defaultdict(list)
    for r in (r for r in rows if r["figure"] == "trajectories"):
        runs[r["function"], r["optimizer"], r["regularizer"]].append(r)
    assert set(runs) == {(f, o, g) for f in FUNCTIONS for o in OPTIMIZERS for g in REGULARIZERS}
    for key, run in runs.items():
        steps = [int(r["step"]) for r in run]
        assert steps == list(range(len(steps))), key
        if run[-1]["diverged"] == "0":
            assert len(steps) == QUICK_STEPS + 1, key
        assert all(r["x"] != "" and r["y"] != "" for r in run), key
        assert {r["seed"] for r in run} == ({"0"} if key[2] == "dropgrad" else {""}), key  # the rest: deterministic


def _check_convergence(rows: list[dict]) -> None:
    seeds = defaultdict(lambda: defaultdict(list))
    for r in (r for r in rows if r["figure"] == "convergence"):
        seeds[r["function"], r["optimizer"], r["regularizer"]][r["seed"]].append(int(r["step"]))
    assert set(seeds) == {(f, o, g) for f in FUNCTIONS for o in OPTIMIZERS for g in REGULARIZERS}
    for (function, optimizer, regularizer), runs in seeds.items():
        if regularizer != "dropgrad":  # deterministic: one run, no seed
            assert set(runs) == {""}
        else:
            assert len(runs) >= 10 and "" not in runs, (function, optimizer)
        recorded = {tuple(steps) for steps in runs.values()}
        assert len(recorded) == 1 and recorded.pop()[-1] == QUICK_STEPS


def _check_sensitivity(rows: list[dict]) -> None:
    sensitivity = [r for r in rows if r["figure"] == "sensitivity"]
    assert len({r["function"] for r in sensitivity}) == 1
    cells = defaultdict(set)
    for r in sensitivity:
        assert r["regularizer"] == "dropgrad" and int(r["step"]) == QUICK_STEPS
        cells[r["optimizer"]].add((float(r["strength"]), float(r["lr"])))
    assert set(cells) == OPTIMIZERS
    for optimizer, grid in cells.items():
        rates, lrs = {p for p, _ in grid}, {lr for _, lr in grid}
        assert rates == QUICK_DROP_RATES and len(lrs) == QUICK_LR_FACTORS, optimizer
        assert grid == {(p, lr) for p in rates for lr in lrs}, optimizer


def _check_rows_agree_across_figures(rows: list[dict]) -> None:
    """Drop rate 0 is DropGrad's exact no-op, and a trajectory is its convergence run's first seed."""
    final = {(r["function"], r["optimizer"], r["regularizer"], r["seed"]): r["loss"]
             for r in rows if r["figure"] == "convergence" and int(r["step"]) == QUICK_STEPS}
    grid = [r for r in rows if r["figure"] == "sensitivity" and float(r["strength"]) == 0.0]
    function = grid[0]["function"]
    for optimizer in OPTIMIZERS:
        base_lr = next(float(r["lr"]) for r in rows
                       if r["figure"] == "convergence" and r["function"] == function and r["optimizer"] == optimizer)
        (cell,) = [r for r in grid if r["optimizer"] == optimizer and float(r["lr"]) == base_lr]
        assert cell["loss"] == final[function, optimizer, "none", ""], optimizer
    for r in rows:
        if r["figure"] == "trajectories" and int(r["step"]) == QUICK_STEPS:
            assert r["loss"] == final[r["function"], r["optimizer"], r["regularizer"], r["seed"]]


def _check_figures_redraw_from_the_csv_alone(csv_path: Path, out: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(ANALYSIS))
    import plots

    out.mkdir()
    written = plots.plot_all(csv_path, out)
    assert sorted(p.name for p in written) == ["convergence.png", "sensitivity.png", "trajectories.png"]
    assert all(p.read_bytes()[:8] == PNG_SIGNATURE for p in written)


@pytest.fixture
def benchmarks(monkeypatch):
    """The script as a module, with the eager mask backend as the script uses (no compile wait)."""
    monkeypatch.syspath_prepend(str(ANALYSIS))
    import benchmarks

    from dropgrad_dist import mask_backend, set_mask_backend

    previous = mask_backend()
    set_mask_backend("eager")
    yield benchmarks
    set_mask_backend(previous)


def test_hand_written_gradients_match_finite_differences(benchmarks):
    import torch

    for benchmark in benchmarks.BENCHMARKS.values():
        for point in (benchmark.start, (0.3, -0.7), (1.1, 0.4)):
            xy = torch.tensor(point, dtype=torch.float64, requires_grad=True)
            assert torch.autograd.gradcheck(lambda v: benchmarks._Objective.apply(v, benchmark.value_and_grad), (xy,))
        assert all(abs(benchmark.value_and_grad(*m)[0] - benchmark.f_min) < 1e-9 for m in benchmark.minima)


def test_dropgrad_masks_come_from_the_seed_only(benchmarks):
    import torch

    valley = benchmarks.BENCHMARKS["rotated_valley"]
    torch.manual_seed(123)
    first = benchmarks.run(valley, "sgd", "dropgrad", 1e-2, 0.5, seed=7, steps=20)
    torch.manual_seed(456)  # the global RNG plays no part
    again = benchmarks.run(valley, "sgd", "dropgrad", 1e-2, 0.5, seed=7, steps=20)
    other = benchmarks.run(valley, "sgd", "dropgrad", 1e-2, 0.5, seed=8, steps=20)
    assert first.path == again.path and first.path != other.path
    baseline = benchmarks.run(valley, "sgd", "none", 1e-2, 0.0, seed=0, steps=20)
    assert benchmarks.run(valley, "sgd", "dropgrad", 1e-2, 0.0, seed=7, steps=20).path == baseline.path


def test_a_closure_twice_regularizer_fits_the_registry(benchmarks, monkeypatch):
    """What SAM / gradient norm penalty will need: step(closure) evaluating the closure twice."""
    import torch

    class TwoEvaluations(torch.optim.Optimizer):
        def __init__(self, optimizer):
            self.optimizer, self.calls = optimizer, 0
            self.param_groups, self.state, self.defaults = optimizer.param_groups, optimizer.state, optimizer.defaults

        def step(self, closure):
            loss = closure()
            closure()  # e.g. the gradient at a perturbed point
            self.calls += 2
            self.optimizer.step()
            return loss

        def zero_grad(self, set_to_none: bool = True):
            self.optimizer.zero_grad(set_to_none=set_to_none)

    made = []

    def wrap(optimizer, model, strength, seed):
        made.append(TwoEvaluations(optimizer))
        return made[-1]

    monkeypatch.setitem(benchmarks.REGULARIZERS, "twice",
                        benchmarks.Regularizer("twice", wrap, stochastic=False, strength_name="rho"))
    result = benchmarks.run(benchmarks.BENCHMARKS["beale"], "adam", "twice", 0.1, 0.05, seed=0, steps=10)
    assert made[0].calls == 20 and len(result.losses) == 11 and result.losses[-1] < result.losses[0]


@pytest.mark.parametrize("args, message", [
    (["--sensitivity_function", "ackley"], "invalid choice: 'ackley'"),
    (["--optimizers", "sgd", "lbfgs"], "invalid choice: 'lbfgs'"),
    (["--drop_rate", "1.5"], "must be in [0, 1)"),
    (["--steps", "0"], "must be >= 1"),
    (["--output_dir", "{file}"], "cannot write to --output_dir"),
    (["--output_dir", "{file}/sub"], "cannot write to --output_dir"),
])
def test_bad_input_ends_with_one_line_error(tmp_path, args, message):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    args = [a.replace("{file}", str(blocker)) for a in args]
    if "--output_dir" not in args:
        args += ["--output_dir", str(tmp_path / "out")]
    done = _run(*args, "--quick", cwd=tmp_path, timeout=120)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("benchmarks.py: error:"), done.stderr
    assert message in lines[0]
    assert not (tmp_path / "out" / "results.csv").exists()
