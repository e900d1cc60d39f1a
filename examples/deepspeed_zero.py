"""DropGrad and clipping (and, with --sam RHO, SAM) under DeepSpeed ZeRO-2 through Accelerate (docs/deepspeed.md).

GPUs:  accelerate launch --config_file examples/deepspeed_zero.yaml examples/deepspeed_zero.py [--sam 0.05] [DIR]
CPU:   python examples/deepspeed_zero.py [--sam 0.05]          (spawns 2 gloo ranks itself)

Each rank trains a small regression net on its half of every batch; DeepSpeed's ZeRO-2 optimizer
holds half of the fp32 weights and gradients per rank, and prepare_regularizers masks and clips
that half inside DeepSpeed's step, exactly as one process would mask the whole gradient.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings

import torch
from torch import nn

# The DeepSpeed config: ZeRO-2, fp32, DeepSpeed's own gradient_clipping 0 (prepare_regularizers clips after
# the mask; DeepSpeed would clip first), a plain torch.optim client optimizer (zero_allow_untested_optimizer).
CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deepspeed_zero.json")
STEPS = 60


def train(checkpoint_dir: str, sam: float | None = None) -> list[float]:
    """Train (with SAM of radius ``sam`` if given), print the loss every 20 steps, save the state; returns
    the printed losses."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    from dropgrad_dist import prepare_regularizers

    on_cpu = not torch.cuda.is_available()
    # DeepSpeed's ZeRO gathers partitions with torch's deprecated all_gather_into_tensor: its warning, not ours.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    if on_cpu:
        # Told the device, DeepSpeed does not warn on every rank that it found no GPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed.ops

        # DeepSpeed would compile a shared-memory collective (a C++ extension) at first use; gloo is enough.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # accelerate launch passes the config named in deepspeed_zero.yaml; spawned here, give it directly.
    launched = "ACCELERATE_DEEPSPEED_CONFIG_FILE" in os.environ
    accelerator = Accelerator(deepspeed_plugin=None if launched else DeepSpeedPlugin(hf_ds_config=CONFIG_FILE))
    if on_cpu:
        _record_cpu_ranks()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    engine, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=0.01))
    regularizers = prepare_regularizers(accelerator, engine, optimizer,
                                        dropgrad=dict(drop_rate=0.2, seed=0),
                                        clipping=dict(method="norm", clipping_level=1.0),
                                        gnp=dict(alpha=1.0, r=sam) if sam is not None else None)
    generator = torch.Generator().manual_seed(1)
    teacher = torch.randn(8, 1, generator=generator)
    rank, world = accelerator.process_index, accelerator.num_processes
    losses = []
    for step in range(STEPS):
        x = torch.randn(16 * world, 8, generator=generator)
        y = torch.tanh(x @ teacher)
        mine = slice(16 * rank, 16 * (rank + 1))

        def closure(x=x, y=y):
            loss = nn.functional.mse_loss(engine(x[mine].to(engine.device)), y[mine].to(engine.device))
            accelerator.backward(loss)  # DeepSpeed steps here: mask, clip, update (with SAM: per pass)
            return loss

        # SAM evaluates the closure at theta and at theta + e, and DeepSpeed updates once.
        loss = regularizers.step(closure) if sam is not None else closure()
        if step % 20 == 0 or step == STEPS - 1:
            metrics = regularizers.metrics()
            losses.append(loss.item())
            accelerator.print(f"step {step:3d} loss {loss.item():.4f} grad norm {metrics['grad_norm']:.3f} "
                              f"clipped {bool(metrics['clipped'])}")
    accelerator.save_state(checkpoint_dir)  # DeepSpeed's checkpoint plus dropgrad_dist_state_0.json
    accelerator.print(f"{regularizers.describe()}; saved to {checkpoint_dir}")
    return losses


def _record_cpu_ranks() -> None:
    """Accelerate without a GPU records one process of index 0 on every rank; the gloo group knows the real ones."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, PartialState

    rank, world = dist.get_rank(), dist.get_world_size()
    ranks = dict(process_index=rank, num_processes=world, local_process_index=rank)
    PartialState._shared_state.update(ranks)
    AcceleratorState._shared_state.update(ranks)


def _rank(rank: int, world_size: int, checkpoint_dir: str, sam: float | None) -> None:
    train(checkpoint_dir, sam)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint_dir", nargs="?", default="deepspeed_zero_checkpoint")
    parser.add_argument("--sam", type=float, default=None, metavar="RHO", help="SAM with this radius")
    args = parser.parse_args()
    if "LOCAL_RANK" in os.environ:  # accelerate launch / torchrun
        train(args.checkpoint_dir, args.sam)
    else:
        from dropgrad_dist.testing import run_on_ranks

        with tempfile.TemporaryDirectory() as directory:
            run_on_ranks(_rank, 2, directory, args.sam, timeout=300)
