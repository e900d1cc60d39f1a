"""Launches where Accelerate and torch.distributed disagree, and the device of small collectives.

``accelerate launch --multi_gpu`` on a machine without a usable GPU (a CUDA build of torch, no
driver) starts a process group whose backend is "undefined" (gloo for CPU tensors, NCCL for
CUDA ones) while Accelerate falls back to ``DistributedType.NO`` in every rank.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dropgrad_dist.core.agreement import AgreementCheck, RankDisagreement, collective_device
from dropgrad_dist.testing import free_port, run_on_ranks

pytestmark = pytest.mark.distributed  # every test here starts several processes

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--num_layers", "1", "--hidden_dim", "32", "--mlp_dim", "64", "--num_heads", "2", "--patch_size", "8",
        "--batch_size", "32", "--train_size", "32", "--test_size", "32", "--max_steps", "1"]


def _agree_on_default_backend(rank: int, world_size: int) -> tuple[str, str]:
    device = collective_device()
    AgreementCheck("probe").check({"value": 1})  # runs the collective on that device
    try:
        AgreementCheck("probe").check({"value": rank})
    except RankDisagreement:
        return str(device), "disagreement detected"
    return str(device), "missed"


def test_collectives_of_a_default_backend_group_run_where_a_device_exists():
    """torch's default backend (None: gloo for CPU, NCCL for CUDA) on a machine with or without a GPU."""
    results = run_on_ranks(_agree_on_default_backend, 2, backend=None, pg_timeout=20, timeout=120)
    want = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert results == [(want, "disagreement detected")] * 2


def _gloo_device(rank: int, world_size: int) -> str:
    return str(collective_device())


def test_gloo_collectives_run_on_cpu():
    assert run_on_ranks(_gloo_device, 2, pg_timeout=20, timeout=120) == ["cpu", "cpu"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where Accelerate cannot use a GPU")
def test_multi_gpu_launch_without_a_gpu_says_how_to_launch_instead(tmp_path):
    """Accelerate falls back to one process per rank: the ViT example stops before training, naming --cpu."""
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         str(ROOT / "examples" / "vit" / "train.py"), *TINY, "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert done.returncode != 0
    # Both ranks print the one-line error; their lines may interleave.
    assert "error: Accelerate runs this process alone" in done.stderr, done.stderr[-3000:]
    assert "the 2 ranks would train as separate runs" in done.stderr and "add --cpu" in done.stderr
    assert "Found no NVIDIA driver" not in done.stderr
    assert 'train.py", line' not in done.stderr  # no traceback from the script (the launcher prints its own)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # nothing trained, nothing logged
