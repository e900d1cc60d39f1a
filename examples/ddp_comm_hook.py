"""DropGrad inside DDP's gradient all-reduce: every rank drops the same coordinates.

Run on CPU with two processes:

    torchrun --nproc_per_node 2 examples/ddp_comm_hook.py --communication compact

The hook masks each gradient bucket with the seeded DropGrad mask (identical on every rank)
and, with ``--communication compact``, all-reduces only the kept coordinates. Gradient
accumulation goes through ``model.no_sync()`` so that each optimizer step masks once.
"""

import argparse
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dropgrad_dist import DropGradHookState, LinearDropRateScheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--communication", choices=["dense", "compact"], default="dense")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None, help="save model, optimizer and hook state here")
    args = parser.parse_args()

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank = dist.get_rank()
    torch.manual_seed(0)  # DDP broadcasts rank 0's initial weights anyway
    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10))
    ddp = DDP(model)

    # Drop rate 0.1 -> 0.5 over the run for the hidden layers, none on the output bias.
    state = DropGradHookState(
        ddp,
        params={"4.bias": 0.0},
        drop_rate_scheduler=LinearDropRateScheduler(0.1, 0.5, num_steps=args.steps),
        seed=args.seed,
        communication=args.communication,
    )
    state.register()  # = ddp.register_comm_hook(state, dropgrad_hook), with clearer errors
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=3e-3)

    teacher = torch.randn(32, 10, generator=torch.Generator().manual_seed(99))  # labels to learn
    data = torch.Generator().manual_seed(1234 + rank)  # each rank reads its own shard
    for step in range(args.steps):
        for micro in range(args.accumulate):
            x = torch.randn(16, 32, generator=data)
            y = (x @ teacher).argmax(dim=1)
            last = micro == args.accumulate - 1
            with nullcontext() if last else ddp.no_sync():
                loss = nn.functional.cross_entropy(ddp(x), y) / args.accumulate
                loss.backward()  # the hook runs on the last micro-batch only
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item() * args.accumulate:.4f}  mask step t={state.step_index}")

    if rank == 0:
        ratio = state.bytes_communicated / state.bytes_dense_equivalent
        print(f"bytes communicated / dense all-reduce: {ratio:.3f} "
              f"({state.bytes_communicated:,} of {state.bytes_dense_equivalent:,} bytes)")
        if args.checkpoint:  # the hook state resumes the masks exactly: load_state_dict on every rank
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "dropgrad_hook": state.state_dict()}, args.checkpoint)
    dist.barrier()  # let every rank finish before the group goes away
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
