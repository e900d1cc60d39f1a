"""PyTorch Lightning: DropGradDDPStrategy runs the hook on CPU (2 processes), refuses SAM with accumulation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning", reason="the lightning extra is not installed (pip install .[lightning])")
from safetensors.torch import load_file  # noqa: E402

from dropgrad_dist import ClippedOptimizer, DropGrad, GradientClipper  # noqa: E402
from dropgrad_dist.testing import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
import lightning_ddp  # noqa: E402

pytestmark = pytest.mark.distributed  # every test here starts several processes


def _one_process(drop_rate: float, steps: int = 4, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """The run in plain PyTorch: DropGrad masks, then the clipper, then SGD, on the same global batches."""
    torch.manual_seed(0)
    module = lightning_ddp.ToyRegression()
    optimizer = ClippedOptimizer(torch.optim.SGD(module.parameters(), lr=0.1),
                                 GradientClipper("norm", 0.5, model=module))
    if drop_rate > 0:
        optimizer = DropGrad(optimizer, drop_rate, seed=3, model=module)
    inputs, targets = lightning_ddp.toy_data().tensors
    for step in range(steps):
        batch = slice(step * batch_size, (step + 1) * batch_size)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(module.net(inputs[batch]), targets[batch]).backward()
        optimizer.step()
    return {name: p.detach() for name, p in module.named_parameters()}


def test_strategy_hook_runs_on_cpu_matches_one_process_and_refuses_sam_with_accumulation(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(ROOT / "examples" / "lightning_ddp.py"), "--output_dir",
                           str(tmp_path), "--check_accumulation", "--check_refusal"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    got = load_file(tmp_path / "params.safetensors")

    assert result["step_index"] == 4  # Lightning's own DDPStrategy never runs a hook on CPU: 0
    assert 0.4 < result["bytes_communicated"] / result["bytes_dense_equivalent"] < 0.6  # compact, p=0.5
    want, undropped = _one_process(0.5), _one_process(0.0)
    assert want.keys() == got.keys()
    assert max((want[k] - got[k]).abs().max().item() for k in want) < 1e-6
    assert max((undropped[k] - got[k]).abs().max().item() for k in want) > 1e-3  # the masks mattered
    assert "accumulate_grad_batches=2 with GradientNormPenalty/SAM" in result["refusal"]
    # accumulate_grad_batches=2: each step averages 2 micro-batches per rank, i.e. a global batch of 16.
    assert result["accumulated_step_index"] == 4
    accumulated, want16 = load_file(tmp_path / "accumulated.safetensors"), _one_process(0.5, batch_size=16)
    assert max((want16[k] - accumulated[k]).abs().max().item() for k in want16) < 1e-6


def test_strategy_refuses_other_hooks_and_bad_communication():
    from lightning.pytorch.strategies import DDPStrategy

    from dropgrad_dist.integrations.lightning import DropGradDDPStrategy

    assert isinstance(DropGradDDPStrategy(drop_rate=0.1), DDPStrategy)
    with pytest.raises(ValueError, match="registers its own communication hook"):
        DropGradDDPStrategy(drop_rate=0.1, ddp_comm_hook=lambda state, bucket: None)
    with pytest.raises(ValueError, match="communication must be 'dense' or 'compact'"):
        DropGradDDPStrategy(drop_rate=0.1, communication="sparse")
