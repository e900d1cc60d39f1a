"""DropGrad composed with a compressing all-reduce (bf16, fp16, PowerSGD), optionally under torch.compile.

Run on CPU with two processes:

    torchrun --nproc_per_node 2 examples/composed_hooks.py --compress powersgd --compile

Every bucket is masked with the seeded DropGrad mask (identical on every rank), then torch's
compression hook averages it; after PowerSGD (not elementwise) the dropped coordinates are zeroed
again. ``--compile`` compiles the DDP model with torch's default DDPOptimizer, which keeps the hook.
"""

import argparse

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState
from torch.nn.parallel import DistributedDataParallel as DDP

from dropgrad_dist import DropGradHookState, compressed_hook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compress", choices=["bf16", "fp16", "powersgd"], default="bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the DDP model (DDPOptimizer)")
    args = parser.parse_args()

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank = dist.get_rank()
    torch.manual_seed(0)
    ddp = DDP(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 10)))

    state = DropGradHookState(ddp, drop_rate=0.3, seed=0)  # communication="dense": the compressor sends
    # PowerSGD keeps its own state (rank, warm-up iterations); the bf16/fp16 hooks take the process group.
    compress = (PowerSGDState(process_group=None, matrix_approximation_rank=2, start_powerSGD_iter=5)
                if args.compress == "powersgd" else args.compress)
    state.register(ddp, compressed_hook(compress))  # = dropgrad_wrapper(torch's hook, state=...)
    forward = torch.compile(ddp, backend="eager") if args.compile else ddp
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=3e-3)

    teacher = torch.randn(32, 10, generator=torch.Generator().manual_seed(99))
    data = torch.Generator().manual_seed(1234 + rank)  # each rank reads its own shard
    for step in range(args.steps):
        x = torch.randn(16, 32, generator=data)
        loss = nn.functional.cross_entropy(forward(x), (x @ teacher).argmax(dim=1))
        loss.backward()  # the composed hook masks, then compresses and averages, each bucket
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}  t={state.step_index}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
