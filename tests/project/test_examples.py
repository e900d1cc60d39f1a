"""The single-process examples run and show DropGrad training."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run(name: str) -> str:
    # The eager mask backend gives the compiled one's bits (tested with the engine) without compiling.
    env = {**os.environ, "DROPGRAD_MASK_BACKEND": "eager", "OMP_NUM_THREADS": "1"}  # tiny models: threads only contend
    done = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_basic_usage_learns():
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", _run("basic_usage.py"))]
    assert losses[-1] < 0.25 * losses[0]


def test_lr_scheduler_integration_anneals_lr_and_drop_rate():
    out = _run("lr_scheduler_integration.py")
    accuracy, final_rate = map(float, re.search(r"final accuracy (\S+), final drop rate (\S+)", out).groups())
    assert accuracy > 0.9 and final_rate == 0.0


def test_full_update_drop_example_trains_both_modes():
    out = _run("full_update_drop.py")
    for mode in ("gradient drop", "full update drop"):
        assert float(re.search(rf"{mode}:\s+final loss (\S+)", out).group(1)) < 0.1


def test_clipping_example_clips_heavy_tails_better_than_no_clipping():
    out = _run("clipping.py")
    losses = {m: float(v) for m, v in re.findall(r"^(\w+)\s+(\d+\.\d+)\s+\d+ / 300", out, flags=re.M)}
    assert set(losses) == {"no_clip", "norm", "layer_wise", "coordinate_wise", "auto_clip", "linear_rand_norm",
                           "quadratic_rand_autoclip"}
    assert losses["norm"] < losses["no_clip"] and losses["layer_wise"] < losses["no_clip"]
    assert int(re.search(r"restarts: (\d+)", out).group(1)) >= 3
    assert "DropGrad + auto_clip Adam" in out


def test_gnp_sam_example_runs_every_variant():
    out = _run("gnp_sam.py")
    rows = re.findall(r"^(.+?)\s+test loss (\d+\.\d+)\s+accuracy (\d+\.\d+)$", out, flags=re.M)
    assert [name.strip() for name, _, _ in rows] == [
        "Adam", "Adam + GNP (alpha 0.8, r 0.05)", "Adam + GNP + zero-warmup (30)", "SGD + SAM (rho 0.05)",
        "SGD + ASAM (rho 0.5)", "SGD + SAM every 2nd step", "Adam + GNP + DropGrad (p 0.1)"]
    assert all(float(accuracy) > 0.4 for _, _, accuracy in rows)  # 5 classes: 0.2 is chance


def test_hf_trainer_example_runs_without_flags_as_its_docs_show_it():
    """``python examples/hf_trainer.py`` (docs/transformers.md): no required flag, results in outputs/hf_trainer."""
    pytest.importorskip("transformers", reason="the transformers extra is not installed (pip install .[transformers])")
    spec = importlib.util.spec_from_file_location("hf_trainer_example", EXAMPLES / "hf_trainer.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = example.parse_args([])
    assert args.output_dir == "outputs/hf_trainer" and not args.fsdp2
