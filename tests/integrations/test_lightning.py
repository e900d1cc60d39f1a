"""Lightning on 2 CPU processes: the DDP and FSDP2 strategies equal one process, resume exactly, SAM accumulates."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning", reason="the lightning extra is not installed (pip install .[lightning])")
from safetensors.torch import load_file  # noqa: E402

from dropgrad_dist import SAM, ClippedOptimizer, DropGrad, GradientClipper  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
import lightning_ddp  # noqa: E402


def _one_process(drop_rate: float, steps: int = 4, batch_size: int = 8,
                 sam_rho: float = 0.0) -> dict[str, torch.Tensor]:
    """The run in plain PyTorch: (SAM computes the gradient,) DropGrad masks, the clipper clips, SGD steps."""
    torch.manual_seed(0)
    module = lightning_ddp.ToyRegression()
    optimizer = ClippedOptimizer(torch.optim.SGD(module.parameters(), lr=0.1),
                                 GradientClipper("norm", 0.5, model=module))
    if drop_rate > 0:
        optimizer = DropGrad(optimizer, drop_rate, seed=3, model=module)
    if sam_rho > 0:
        optimizer = SAM(optimizer, rho=sam_rho, model=module)
    inputs, targets = lightning_ddp.toy_data().tensors
    for step in range(steps):
        batch = slice(step * batch_size, (step + 1) * batch_size)

        def closure() -> torch.Tensor:
            loss = torch.nn.functional.mse_loss(module.net(inputs[batch]), targets[batch])
            loss.backward()
            return loss

        optimizer.zero_grad()
        optimizer.step(closure) if sam_rho > 0 else (closure(), optimizer.step())
    return {name: p.detach() for name, p in module.named_parameters()}


def _max_difference(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> float:
    assert want.keys() == got.keys()
    return max((want[k] - got[k]).abs().max().item() for k in want)


@pytest.mark.distributed
def test_strategies_match_one_process_accumulate_sam_and_resume_from_model_checkpoint(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "examples" / "lightning_ddp.py"), "--output_dir",
                           str(tmp_path), "--check_accumulation", "--check_sam_accumulation", "--check_resume"],
                          env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    tensors = {path.stem: load_file(path) for path in tmp_path.glob("*.safetensors")}

    # The DDP hook runs on CPU (Lightning's own DDPStrategy never runs a hook there: step_index 0).
    assert result["step_index"] == 4
    assert 0.4 < result["bytes_communicated"] / result["bytes_dense_equivalent"] < 0.6  # compact, p=0.5
    want, undropped = _one_process(0.5), _one_process(0.0)
    assert _max_difference(want, tensors["params"]) < 1e-6
    assert _max_difference(undropped, tensors["params"]) > 1e-3  # the masks mattered
    # accumulate_grad_batches=2: each step averages 2 micro-batches per rank, i.e. a global batch of 16.
    assert result["accumulated_step_index"] == 4
    assert _max_difference(_one_process(0.5, batch_size=16), tensors["accumulated"]) < 1e-6

    # SAM with accumulate_grad_batches=2, DDP hook and FSDP2 wrapper: the one-process SAM on the batch of 16.
    sam16 = _one_process(0.5, batch_size=16, sam_rho=0.05)
    for tag in ("ddp", "fsdp"):
        assert result[f"sam_{tag}_step_index"] == 4
        assert _max_difference(sam16, tensors[f"sam_{tag}"]) < 1e-6, tag
    assert _max_difference(sam16, tensors["accumulated"]) > 1e-4  # SAM mattered

    # 6 steps against 3 saved by ModelCheckpoint + fit(ckpt_path=...) + 3, with AutoClip and GNP every 2 steps.
    for tag in ("ddp", "fsdp"):
        assert result[f"resume_{tag}_step_index"] == 6, tag
        whole, resumed = result[f"resume_{tag}_masks_whole"], result[f"resume_{tag}_masks_resumed"]
        assert len(whole) == 6 and all(whole) and whole[3] != whole[0]  # masks dropped coordinates, per step
        assert resumed == whole, tag
        for name, param in tensors[f"resume_{tag}_whole"].items():
            assert torch.equal(param, tensors[f"resume_{tag}_resumed"][name]), (tag, name)
    # The checkpoint holds our state as plain data beside a bare optimizer state.
    saved = torch.load(next((tmp_path / "checkpoints_ddp").glob("*.ckpt")), weights_only=True)
    regularizers = json.loads(json.dumps(saved["dropgrad_dist"]))["regularizers"]
    assert [sorted(state) for state in regularizers] == [["clipping", "dropgrad", "gnp", "mode"]]
    assert regularizers[0]["dropgrad"]["step_index"] == 3 and regularizers[0]["gnp"]["step_index"] == 3
    assert not {"clipping", "gnp", "dropgrad"} & set(saved["optimizer_states"][0])


def test_strategy_refuses_other_hooks_bad_communication_and_checkpoints_without_our_state():
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from dropgrad_dist.integrations.lightning import DropGradDDPStrategy, DropGradFSDPStrategy

    assert isinstance(DropGradDDPStrategy(drop_rate=0.1), DDPStrategy)
    assert isinstance(DropGradFSDPStrategy(drop_rate=0.1), ModelParallelStrategy)
    with pytest.raises(ValueError, match="registers its own communication hook"):
        DropGradDDPStrategy(drop_rate=0.1, ddp_comm_hook=lambda state, bucket: None)
    with pytest.raises(ValueError, match="communication must be 'dense' or 'compact'"):
        DropGradDDPStrategy(drop_rate=0.1, communication="sparse")
    for strategy in (DropGradDDPStrategy(drop_rate=0.1), DropGradFSDPStrategy(drop_rate=0.1)):
        with pytest.raises(ValueError, match="has no 'dropgrad_dist' entry .* restart from step 0"):
            strategy._prepare_regularizer_state({"state_dict": {}, "optimizer_states": [{}]})


def test_strategy_refuses_gnp_with_the_first_pass_given():
    """Lightning's backward is GNP/SAM's first pass: davda54's SAM form (first_pass="given") is refused at setup."""
    import lightning.pytorch as pl

    from dropgrad_dist.integrations.lightning import DropGradFSDPStrategy

    module, strategy = lightning_ddp.ToyRegression(), DropGradFSDPStrategy()
    strategy.connect(module)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    strategy.optimizers = [SAM(module.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)]
    with pytest.raises(ValueError, match=r"first_pass='given' does not fit .* use first_pass='closure'"):
        strategy._setup_regularized(trainer)
    strategy.optimizers = [SAM(module.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, first_pass="closure")]
    strategy._setup_regularized(trainer)


def test_strategies_refuse_restarts_their_checkpoints_cannot_carry():
    """Restart sums are per-rank tensors outside Lightning's checkpoint entry: refused, not silently lost."""
    import lightning.pytorch as pl

    from dropgrad_dist import Restarter, RestartingOptimizer
    from dropgrad_dist.integrations.lightning import DropGradDDPStrategy, DropGradFSDPStrategy

    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    for strategy in (DropGradDDPStrategy(drop_rate=0.1), DropGradFSDPStrategy(drop_rate=0.1)):
        module = lightning_ddp.ToyRegression()
        strategy.connect(module)
        strategy.optimizers = [RestartingOptimizer(torch.optim.SGD(module.parameters(), lr=0.1), Restarter(2),
                                                   module)]
        with pytest.raises(ValueError, match="RestartingOptimizer under the Lightning strategies"):
            strategy._setup_regularized(trainer)
