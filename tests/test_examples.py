"""The single-process examples run and show DropGrad training."""

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(name: str) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=300)
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
