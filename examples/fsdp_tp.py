"""DropGrad + gradient clipping under FSDP2 + tensor parallelism on a torchtitan-style 2-D mesh.

Run on CPU (4 processes over gloo):

    torchrun --nproc_per_node 4 examples/fsdp_tp.py

The model is made tensor parallel over the ``"tp"`` mesh dim (``ColwiseParallel`` /
``RowwiseParallel``), then sharded by FSDP2 over the ``"dp"`` dim, as torchtitan does. Its
colwise weights carry ``(_StridedShard(dim=0, sf=2), Shard(dim=0))``, rowwise ones
``(Shard(dim=0), Shard(dim=1))``, and ``emb`` (left out of TP) lives on the 1-D ``"dp"`` mesh:
``torch.nn.utils.clip_grad_norm_`` raises on such a model ("All operands in aten.stack.default
must have the same mesh"), ``GradientClipper`` sums each parameter over the mesh dims that shard
it. The masks and the trained parameters equal those of the same model trained in one process.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from dropgrad_dist import ClippedOptimizer, DropGrad, GradientClipper

GLOBAL_BATCH = 8


class TPNet(nn.Module):
    """Column-parallel ``up`` and ``head``, row-parallel ``down``; sizes not divisible by the 4 ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Parameter(torch.randn(1, 7))
        self.up = nn.Linear(7, 6)
        self.down = nn.Linear(6, 3)
        self.head = nn.Linear(3, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.down(torch.tanh(self.up(x * self.emb)))))


def make_model() -> TPNet:
    torch.manual_seed(0)
    return TPNet()


def parallelize(model: TPNet, mesh, dp_dims: tuple[str, ...] = ("dp",)) -> TPNet:
    """Tensor parallel over ``mesh["tp"]``, then FSDP2 over ``mesh[dp_dims]`` (2 dims: HSDP)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    # The FSDP2-wrapped modules (``up`` and the root, whose output is ``head``'s) return DTensors:
    # ``to_local()`` would hand FSDP2 a view, on which an in-place op would skip its backward hook.
    parallelize_module(model, mesh["tp"], {"up": ColwiseParallel(use_local_output=False), "down": RowwiseParallel(),
                                           "head": ColwiseParallel(output_layouts=Replicate(), use_local_output=False)})
    dp_mesh = mesh[dp_dims]
    fully_shard(model.up, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    return model


def make_optimizer(model: nn.Module, method: str = "norm", level: float = 0.05) -> DropGrad:
    """DropGrad masks, then the clipper clips the masked gradient, then Adam steps."""
    clipper = GradientClipper(method, level, model=model)
    return DropGrad(ClippedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), clipper),
                    drop_rate=0.3, seed=7, model=model)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 7, generator=gen), torch.randn(GLOBAL_BATCH, 6, generator=gen)


def loss_on(model: nn.Module, step: int, dp_rank: int = 0, dp_size: int = 1) -> torch.Tensor:
    """The loss on this data-parallel rank's slice of the global batch (TP ranks share a slice)."""
    x, y = batch(step)
    per = GLOBAL_BATCH // dp_size
    rows = slice(dp_rank * per, (dp_rank + 1) * per)
    output = model(x[rows])
    if isinstance(output, DTensor):  # the parallel model's output, replicated over "tp"
        output = output.to_local()
    return nn.functional.mse_loss(output, y[rows])


def train(model: nn.Module, optimizer: DropGrad, steps: int, dp_rank: int = 0, dp_size: int = 1) -> list[float]:
    """``steps`` steps; returns the global gradient norm the clipper saw at each."""
    norms = []
    for step in range(steps):
        loss_on(model, step, dp_rank, dp_size).backward()
        optimizer.step()
        norms.append(optimizer.optimizer.clipper.last_stats["norm"])
        optimizer.zero_grad()
    return norms


def main() -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = parallelize(make_model(), mesh)
    try:
        loss_on(model, 0, mesh["dp"].get_local_rank(), 2).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    except RuntimeError as error:
        torch_clip = f"raises ({str(error).splitlines()[0][:70]}...)"
    else:
        torch_clip = "ran"
    model.zero_grad()
    optimizer = make_optimizer(model)
    norms = train(model, optimizer, steps=3, dp_rank=mesh["dp"].get_local_rank(), dp_size=2)
    if dist.get_rank() == 0:
        print("placements:", {n: str(p.placements) for n, p in model.named_parameters()})
        print("torch.nn.utils.clip_grad_norm_:", torch_clip)
        print("GradientClipper norms:", " ".join(f"{n:.6f}" for n in norms))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
