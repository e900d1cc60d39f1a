"""DropGrad on an FSDP2-sharded model: ``torchrun --nproc_per_node 2 examples/fsdp_step_wrapper.py``.

Runs on CPU with gloo (or one GPU per rank with nccl). The wrapper is unchanged: DropGrad
masks each rank's gradient shard with the coordinates the unsharded model would use, so
the run is the same for any number of ranks. Pass ``--fsdp1`` for FullyShardedDataParallel
with ``use_orig_params=True``.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

from dropgrad_dist import DropGrad
from dropgrad_dist.core.collectives import exit_skipping_finalization


def build(width: int, fsdp1: bool, device: torch.device) -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)).to(device)
    if fsdp1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP(model, use_orig_params=True, device_id=device)  # DropGrad needs use_orig_params=True
    from torch.distributed.fsdp import fully_shard

    fully_shard(model[0])
    return fully_shard(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--drop-rate", type=float, default=0.1)
    parser.add_argument("--fsdp1", action="store_true", help="FSDP1 (use_orig_params=True) instead of FSDP2")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    model = build(args.width, args.fsdp1, device)
    # Build the optimizer on the sharded parameters, then wrap it; model= gives the mask keys
    # (canonical names) and, for FSDP1, where each rank's piece of a parameter starts.
    optimizer = DropGrad(torch.optim.AdamW(model.parameters(), lr=1e-3), drop_rate=args.drop_rate,
                         model=model, seed=0)
    gen = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        x = torch.randn(8 * world_size, args.width, generator=gen)  # the global batch ...
        y = torch.randint(0, 10, (8 * world_size,), generator=gen)
        x, y = x[rank::world_size].to(device), y[rank::world_size].to(device)  # ... this rank's slice
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if args.fsdp1:
            model.clip_grad_norm_(1.0)  # FSDP1: the norm over all shards
        else:
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # DTensor grads: a global norm
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f} (rank 0 batch)  DropGrad step_index {optimizer.step_index}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # FSDP's own collectives hold Python tensors that a gloo worker may release during interpreter
    # finalization, which aborts the process: end without it (see dropgrad_dist.core.collectives).
    exit_skipping_finalization(0)
