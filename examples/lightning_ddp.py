"""DropGrad in PyTorch Lightning's DDP on CPU: the communication hook runs on every device.

    torchrun --nproc_per_node 2 examples/lightning_ddp.py --output_dir /tmp/pl_ddp
    python examples/lightning_ddp.py --devices 2 --output_dir /tmp/pl_ddp   # Lightning starts the processes

``DropGradDDPStrategy`` registers DropGrad's hook (Lightning's ``DDPStrategy(ddp_comm_hook=...)``
does so on CUDA only); clipping is a ``ClippedOptimizer`` returned by ``configure_optimizers``.
Each process takes ``--batch_size / devices`` samples per step (rank r: samples r, r + devices, ...),
so the run steps on the same global batches as one process with ``--batch_size``. Writes
``params.safetensors`` and ``result.json`` into ``--output_dir``; ``--check_accumulation`` also fits
with ``accumulate_grad_batches=2`` (``accumulated.safetensors``), and ``--check_refusal`` with SAM and
``accumulate_grad_batches=2``, recording the strategy's refusal.
"""

import argparse
import json
import os

import lightning.pytorch as pl
import torch
from safetensors.torch import save_file
from torch import nn

from dropgrad_dist import SAM, ClippedOptimizer, GradientClipper
from dropgrad_dist.integrations.lightning import DropGradDDPStrategy


class ToyRegression(pl.LightningModule):
    """A 2-layer MLP fitting a fixed random linear target with the mean squared error."""

    def __init__(self, clip_level: float = 0.0, sam_rho: float = 0.0, lr: float = 0.1, batch_size: int = 8) -> None:
        super().__init__()
        self.global_batch_size = batch_size  # the global batch
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.clip_level, self.sam_rho, self.lr = clip_level, sam_rho, lr

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> torch.Tensor:
        inputs, targets = batch
        return nn.functional.mse_loss(self.net(inputs), targets)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        # Rank r takes samples r, r + world, ... in order (Lightning's own distributed sampler shuffles
        # here), so a step's global batch is the one a single process with --batch_size takes.
        world, batch_size = self.trainer.world_size, self.global_batch_size
        sampler = torch.utils.data.DistributedSampler(toy_data(), num_replicas=world, rank=self.global_rank,
                                                      shuffle=False)
        return torch.utils.data.DataLoader(toy_data(), batch_size=batch_size // world, sampler=sampler)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.clip_level > 0:
            optimizer = ClippedOptimizer(optimizer, GradientClipper("norm", self.clip_level, model=self))
        if self.sam_rho > 0:
            optimizer = SAM(optimizer, rho=self.sam_rho, model=self)
        return optimizer


def toy_data(size: int = 64) -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(1234)
    inputs = torch.randn(size, 8, generator=generator)
    return torch.utils.data.TensorDataset(inputs, inputs @ torch.randn(8, 1, generator=generator))


def fit(module: pl.LightningModule, strategy: DropGradDDPStrategy, devices: int, steps: int,
        accumulate: int = 1) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps,
                         accumulate_grad_batches=accumulate, use_distributed_sampler=False, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--devices", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=8, help="global batch")
    parser.add_argument("--drop_rate", type=float, default=0.5)
    parser.add_argument("--communication", choices=["dense", "compact"], default="compact")
    parser.add_argument("--clip_level", type=float, default=0.5)
    parser.add_argument("--check_accumulation", action="store_true", help="also fit with accumulate_grad_batches=2")
    parser.add_argument("--check_refusal", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    module = ToyRegression(clip_level=args.clip_level, batch_size=args.batch_size)
    strategy = DropGradDDPStrategy(drop_rate=args.drop_rate, seed=3, communication=args.communication,
                                   process_group_backend="gloo")
    trainer = fit(module, strategy, args.devices, args.steps)
    result = {"step_index": strategy.dropgrad_state.step_index,
              "bytes_communicated": strategy.dropgrad_state.bytes_communicated,
              "bytes_dense_equivalent": strategy.dropgrad_state.bytes_dense_equivalent}
    if args.check_accumulation:  # 2 micro-batches per step: the hook masks the step's gradient once
        torch.manual_seed(0)
        accumulated = ToyRegression(clip_level=args.clip_level, batch_size=args.batch_size)
        again = DropGradDDPStrategy(drop_rate=args.drop_rate, seed=3, communication=args.communication,
                                    process_group_backend="gloo")
        fit(accumulated, again, args.devices, args.steps, accumulate=2)
        result["accumulated_step_index"] = again.dropgrad_state.step_index
    if args.check_refusal:
        try:
            fit(ToyRegression(sam_rho=0.05, batch_size=args.batch_size),
                DropGradDDPStrategy(drop_rate=args.drop_rate, process_group_backend="gloo"), args.devices, args.steps,
                accumulate=2)
        except ValueError as error:
            result["refusal"] = str(error)
    if trainer.is_global_zero:
        os.makedirs(args.output_dir, exist_ok=True)
        params = {name: p.detach().contiguous() for name, p in module.named_parameters()}
        save_file(params, os.path.join(args.output_dir, "params.safetensors"))
        if args.check_accumulation:
            save_file({name: p.detach().contiguous() for name, p in accumulated.named_parameters()},
                      os.path.join(args.output_dir, "accumulated.safetensors"))
        with open(os.path.join(args.output_dir, "result.json"), "w") as file:
            json.dump(result, file)
        print(json.dumps(result))


if __name__ == "__main__":
    main()
