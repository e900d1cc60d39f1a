"""DropGrad, clipping and SAM in PyTorch Lightning on CPU: DDP (the hook) and FSDP2 (the wrapper), resumable.

    torchrun --nproc_per_node 2 examples/lightning_ddp.py --output_dir /tmp/pl_ddp
    python examples/lightning_ddp.py --devices 2 --output_dir /tmp/pl_ddp   # Lightning starts the processes

``DropGradDDPStrategy`` registers DropGrad's hook (Lightning's ``DDPStrategy(ddp_comm_hook=...)``
does so on CUDA only); clipping is a ``ClippedOptimizer`` returned by ``configure_optimizers``.
Each process takes ``--batch_size / devices`` samples per step (rank r: samples r, r + devices, ...),
so the run steps on the same global batches as one process with ``--batch_size``. Writes
``params.safetensors`` and ``result.json`` into ``--output_dir``. Further fits, each on the same
toy problem:

- ``--check_accumulation``: ``accumulate_grad_batches=2`` (``accumulated.safetensors``);
- ``--check_sam_accumulation``: SAM with ``accumulate_grad_batches=2`` under the DDP hook
  (``sam_ddp.safetensors``) and under ``DropGradFSDPStrategy`` (FSDP2, ``sam_fsdp.safetensors``);
- ``--check_resume``: 6 steps, then 3 steps saved by ``ModelCheckpoint`` and resumed with
  ``trainer.fit(ckpt_path=...)`` for 3 more, with AutoClip and periodic GNP in the chain, under DDP
  and FSDP2 (``resume_*.safetensors``; the masks of each step in ``result.json``).
"""

import argparse
import glob
import json
import os
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from safetensors.torch import save_file
from torch import nn

from dropgrad_dist import SAM, ClippedOptimizer, GradientClipper, GradientNormPenalty
from dropgrad_dist.integrations.lightning import DropGradDDPStrategy, DropGradFSDPStrategy

# Lightning's own pytree helper builds torch's deprecated LeafSpec on every batch: its warning, not ours.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)


class ToyRegression(pl.LightningModule):
    """A 2-layer MLP fitting a fixed random linear target with the mean squared error."""

    def __init__(self, clip_level: float = 0.0, sam_rho: float = 0.0, lr: float = 0.1, batch_size: int = 8,
                 clip_method: str = "norm", gnp_every: int = 0, data_size: int = 64) -> None:
        super().__init__()
        self.global_batch_size = batch_size  # the global batch
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.clip_level, self.clip_method, self.sam_rho, self.lr = clip_level, clip_method, sam_rho, lr
        self.gnp_every, self.data_size = gnp_every, data_size
        self.masks: list[list[int]] = []  # per optimizer step: the gradient coordinates that are exactly 0

    def configure_model(self) -> None:
        if isinstance(self.trainer.strategy, ModelParallelStrategy):  # FSDP2: shard each layer, then the net
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> torch.Tensor:
        inputs, targets = batch
        return nn.functional.mse_loss(self.net(inputs), targets)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        # Rank r takes samples r, r + world, ... in order (Lightning's own distributed sampler shuffles
        # here), so a step's global batch is the one a single process with --batch_size takes.
        world, batch_size, data = self.trainer.world_size, self.global_batch_size, toy_data(self.data_size)
        sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=self.global_rank, shuffle=False)
        return torch.utils.data.DataLoader(data, batch_size=batch_size // world, sampler=sampler)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        optimizer.register_step_post_hook(self._record_mask)
        if self.clip_level > 0:
            optimizer = ClippedOptimizer(optimizer, GradientClipper(self.clip_method, self.clip_level, model=self))
        if self.sam_rho > 0:
            optimizer = SAM(optimizer, rho=self.sam_rho, model=self)
        if self.gnp_every > 0:
            optimizer = GradientNormPenalty(optimizer, alpha=0.5, r=0.05, every=self.gnp_every, model=self)
        return optimizer

    def _record_mask(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if all(group["lr"] == 0 for group in optimizer.param_groups):
            return  # torch.distributed.checkpoint's optimizer-state initialization, not a training step
        grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in self.parameters()]
        self.masks.append(torch.cat([(g == 0).flatten() for g in grads]).nonzero().flatten().tolist())


def toy_data(size: int = 64) -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(1234)
    inputs = torch.randn(size, 8, generator=generator)
    return torch.utils.data.TensorDataset(inputs, inputs @ torch.randn(8, 1, generator=generator))


def fit(module: pl.LightningModule, strategy: pl.strategies.Strategy, devices: int, steps: int = -1,
        accumulate: int = 1, epochs: int | None = None, ckpt_path: str | None = None,
        checkpoint_dir: str | None = None) -> pl.Trainer:
    callbacks = [ModelCheckpoint(dirpath=checkpoint_dir, save_top_k=-1)] if checkpoint_dir else []
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps, max_epochs=epochs,
                         accumulate_grad_batches=accumulate, use_distributed_sampler=False, logger=False,
                         callbacks=callbacks, enable_checkpointing=bool(callbacks), enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def params_of(module: pl.LightningModule) -> dict[str, torch.Tensor]:
    """Whole parameters (gathered from FSDP2 shards on every rank)."""
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().contiguous()
            for name, p in module.named_parameters()}


def check_resume(make_strategy, args: argparse.Namespace, tag: str) -> tuple[dict, dict]:
    """6 steps (2 epochs of 3) against 3 steps saved by ModelCheckpoint, resumed with fit(ckpt_path=...)."""
    def module() -> ToyRegression:
        torch.manual_seed(0)
        return ToyRegression(clip_level=args.clip_level, clip_method="auto_clip", gnp_every=2,
                             batch_size=args.batch_size, data_size=3 * args.batch_size)

    whole, halves = module(), [module(), module()]
    fit(whole, make_strategy(), args.devices, epochs=2)
    directory = os.path.join(args.output_dir, f"checkpoints_{tag}")
    fit(halves[0], make_strategy(), args.devices, epochs=1, checkpoint_dir=directory)
    saved = sorted(glob.glob(os.path.join(directory, "*.ckpt")))[-1]
    fit(halves[1], resumed := make_strategy(), args.devices, epochs=2, ckpt_path=saved)
    drop = resumed.dropgrad_state if tag == "ddp" else resumed.dropgrad
    result = {f"resume_{tag}_step_index": drop.step_index, f"resume_{tag}_masks_whole": whole.masks,
              f"resume_{tag}_masks_resumed": halves[0].masks + halves[1].masks}
    return result, {f"resume_{tag}_whole": params_of(whole), f"resume_{tag}_resumed": params_of(halves[1])}


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
    parser.add_argument("--check_sam_accumulation", action="store_true")
    parser.add_argument("--check_resume", action="store_true")
    args = parser.parse_args()

    def ddp() -> DropGradDDPStrategy:
        return DropGradDDPStrategy(drop_rate=args.drop_rate, seed=3, communication=args.communication,
                                   process_group_backend="gloo")

    def fsdp() -> DropGradFSDPStrategy:
        return DropGradFSDPStrategy(drop_rate=args.drop_rate, seed=3, process_group_backend="gloo")

    torch.manual_seed(0)
    module = ToyRegression(clip_level=args.clip_level, batch_size=args.batch_size)
    strategy = ddp()
    trainer = fit(module, strategy, args.devices, args.steps)
    result = {"step_index": strategy.dropgrad_state.step_index,
              "bytes_communicated": strategy.dropgrad_state.bytes_communicated,
              "bytes_dense_equivalent": strategy.dropgrad_state.bytes_dense_equivalent}
    tensors = {"params": params_of(module)}
    if args.check_accumulation:  # 2 micro-batches per step: the hook masks the step's gradient once
        torch.manual_seed(0)
        accumulated, again = ToyRegression(clip_level=args.clip_level, batch_size=args.batch_size), ddp()
        fit(accumulated, again, args.devices, args.steps, accumulate=2)
        result["accumulated_step_index"] = again.dropgrad_state.step_index
        tensors["accumulated"] = params_of(accumulated)
    if args.check_sam_accumulation:  # SAM on the gradient of 2 accumulated micro-batches
        for tag, make in (("ddp", ddp), ("fsdp", fsdp)):
            torch.manual_seed(0)
            sam = ToyRegression(clip_level=args.clip_level, sam_rho=0.05, batch_size=args.batch_size)
            fit(sam, made := make(), args.devices, args.steps, accumulate=2)
            drop = made.dropgrad_state if tag == "ddp" else made.dropgrad
            result[f"sam_{tag}_step_index"] = drop.step_index
            tensors[f"sam_{tag}"] = params_of(sam)
    if args.check_resume:
        for tag, make in (("ddp", ddp), ("fsdp", fsdp)):
            found, params = check_resume(make, args, tag)
            result.update(found)
            tensors.update(params)
    if trainer.is_global_zero:
        os.makedirs(args.output_dir, exist_ok=True)
        for name, params in tensors.items():
            save_file(params, os.path.join(args.output_dir, f"{name}.safetensors"))
        with open(os.path.join(args.output_dir, "result.json"), "w") as file:
            json.dump(result, file)
        print(json.dumps({k: v for k, v in result.items() if "masks" not in k}))


if __name__ == "__main__":
    main()
