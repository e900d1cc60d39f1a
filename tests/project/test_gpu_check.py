"""launch/gpu_check.sh: refuses without a CUDA device; its CPU smoke run writes the summary table."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "gpu_check.sh"
ROWS = ["cuda tests (pytest -m cuda)", "memory bandwidth (copy 16 MiB)", "mask kernel, 500 x Linear(64,64)",
        "ViT fp16, no DropGrad", "ViT fp16, DropGrad p=0.1", "ViT bf16, no DropGrad", "ViT bf16, DropGrad p=0.1"]


def _run(tmp_path, **env):
    return subprocess.run(["bash", str(SCRIPT), "--output_dir", str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=400, env={**os.environ, "PYTHONPATH": str(ROOT), **env})


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the check would run")
def test_refuses_without_a_cuda_device(tmp_path):
    done = _run(tmp_path)
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr and "GPU_CHECK_DEVICE=cpu" in done.stderr
    assert not (tmp_path / "out").exists()


def test_cpu_smoke_run_writes_the_summary_table(tmp_path):
    done = _run(tmp_path, GPU_CHECK_DEVICE="cpu")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert summary.startswith("# GPU check: CPU smoke run") and "torch " + torch.__version__ in summary
    lines = [line for line in summary.splitlines() if line.startswith("| ") and "---" not in line]
    assert lines[0] == "| check | measured | target | status |"
    checks = [line.split(" | ")[0][2:] for line in lines[1:]]
    assert len(checks) == len(ROWS) and all(check.startswith(row) for check, row in zip(checks, ROWS)), checks
    assert "FAIL" not in summary and "images/s" in summary and "x _foreach_mul_" in summary
    assert summary in done.stdout  # printed as well as written
