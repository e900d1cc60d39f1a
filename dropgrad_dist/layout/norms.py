"""Gradient norms of whole (unsharded) parameters, whatever the layout, in one collective.

Clipping and the gradient norm penalty need ``||g||`` over all parameters, and per parameter,
as the one-process run would compute them. Under DDP (and in one process) gradients are whole
and identical on every rank: no communication. Under FSDP2/HSDP (``DTensor``) and FSDP1
(``use_orig_params=True`` flat pieces) each rank holds pieces: the local squared norms of all
parameters are summed over the ranks that shard them with **one** ``all_reduce`` per distinct
group of ranks (one for FSDP, which shards every parameter over the same group; one per
sharded mesh dim under tensor parallelism), never one per parameter. Squares are accumulated
in float32 (float64 for float64 gradients).

Tensor parallel (2-D/3-D meshes: ``Shard``/``_StridedShard`` on several mesh dims) sums each
parameter over every mesh dim that shards it, never over a ``Replicate`` dim. Pipeline
parallel: each stage holds other parameters, so the *total* norm also sums the stages'
squared norms over ``pp_mesh`` (one more scalar ``all_reduce``, as torchtitan's
``clip_grad_norm_(..., pp_mesh=...)`` does); per-parameter norms need no stage reduction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from .shards import _PLAIN_OR_NONE, FlatPiece, _is_dtensor, local_grads, placement_kind

__all__ = ["GradNorms", "NormPlan", "grad_norms", "norm_plan", "planned_norms", "stage_group"]


class GradNorms:
    """Per-parameter squared gradient norms (float32/64, one entry per parameter) and derived norms.

    ``above``: per parameter, on how many ranks' pieces some ``|g_i|`` exceeds the threshold
    asked for (None when none was asked); > 0 means the whole gradient has such a coordinate.
    """

    def __init__(self, squares: torch.Tensor, above: torch.Tensor | None = None,
                 total_squares: torch.Tensor | None = None) -> None:
        self.squares = squares
        self.above = above
        self.total_squares = squares.sum() if total_squares is None else total_squares

    @property
    def per_param(self) -> torch.Tensor:
        """``||g_l||`` per parameter."""
        return self.squares.sqrt()

    @property
    def total(self) -> torch.Tensor:
        """``sqrt(sum_l ||g_l||^2)`` over all parameters of all pipeline stages: the global L2 norm (0-dim)."""
        return self.total_squares.sqrt()


def stage_group(pp_mesh: Any, argument: str = "pp_mesh") -> Any:
    """The process group of the pipeline stages: from a 1-D ``DeviceMesh`` or a ``ProcessGroup`` (None: none)."""
    if pp_mesh is None or isinstance(pp_mesh, dist.ProcessGroup):
        return pp_mesh
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(pp_mesh, DeviceMesh):
        raise TypeError(f"{argument} must be a 1-D DeviceMesh or a ProcessGroup over the pipeline stages "
                        f"(torchtitan: parallel_dims.get_mesh('pp')), got {type(pp_mesh).__name__}")
    if pp_mesh.ndim != 1:
        raise ValueError(f"{argument} must be a 1-D DeviceMesh (the pipeline dim, e.g. world_mesh['pp']), "
                         f"got a {pp_mesh.ndim}-D mesh {pp_mesh.mesh_dim_names}")
    return pp_mesh.get_group()


def _shard_groups(param: torch.Tensor, pieces: Mapping[torch.Tensor, FlatPiece]) -> tuple[Any, ...]:
    """The process groups over which ``param``'s local squares must be summed (empty: it is whole here)."""
    if param in pieces:
        return (pieces[param].group,)
    grad = param.grad if param.grad is not None else param
    if not _is_dtensor(grad):
        return ()
    groups = []
    for dim, placement in enumerate(grad.placements):
        kind = placement_kind(placement)
        if kind == "partial":
            raise ValueError(f"gradient norm of a DTensor with a Partial placement ({tuple(grad.placements)}): "
                             "reduce the gradient first (FSDP2 does, after backward)")
        if kind in ("shard", "strided"):  # a _StridedShard dim holds distinct pieces like a Shard dim
            groups.append(grad.device_mesh.get_group(dim))
    return tuple(groups)


class NormPlan(NamedTuple):
    """What gathering one layout's squared norms needs, found once per layout (:func:`norm_plan`)."""

    size: int  # parameters
    held: tuple[int, ...] | None  # the parameters with a non-empty local gradient (None: all of them)
    rows: torch.Tensor | None  # ``held`` as an index on ``device``
    dtype: torch.dtype  # float32, or float64 when some gradient is float64
    device: torch.device
    groups: tuple[tuple[Any, torch.Tensor | None], ...]  # per shard group, the parameters it shards (None: all)


def norm_plan(params: Sequence[torch.Tensor], local: Sequence[torch.Tensor | None],
              pieces: Mapping[torch.Tensor, FlatPiece] | None = None) -> NormPlan:
    """The plan of :func:`planned_norms` for ``params`` whose local gradients are ``local``.

    Raises ValueError for a sparse gradient or a ``Partial`` DTensor gradient.
    """
    pieces = pieces or {}
    held = [i for i, g in enumerate(local) if g is not None and g.numel() > 0]  # empty FSDP shards contribute 0
    for index in held:
        if local[index].layout != torch.strided:
            raise ValueError("gradient norms of sparse gradients are not supported; use dense gradients")
    dtype = torch.float64 if any(local[i].dtype == torch.float64 for i in held) else torch.float32
    device = local[held[0]].device if held else torch.device("cpu")
    # Per group, the parameters it shards: a 2-D (dp, tp) mesh takes two all_reduces, whatever the mix.
    by_group: dict[Any, list[int]] = {}
    # Plain parameters and gradients (one process, DDP) are whole here: no per-parameter look-up.
    if pieces or not (set(map(type, params)) | {type(p.grad) for p in params}) <= _PLAIN_OR_NONE:
        for index, param in enumerate(params):
            for group in _shard_groups(param, pieces):
                by_group.setdefault(group, []).append(index)
    groups = tuple((group, None if len(indices) == len(params) else torch.tensor(indices, device=device))
                   for group, indices in by_group.items())
    every = len(held) == len(params)
    return NormPlan(len(params), None if every else tuple(held),
                    None if every else torch.tensor(held, device=device, dtype=torch.long), dtype, device, groups)


def _local_stats(local: Sequence[torch.Tensor | None], plan: NormPlan,
                 above: float | Sequence[float] | None) -> torch.Tensor:
    """Per parameter: the squared norm of the locally held gradient (0 where there is none) and,
    if ``above`` (one threshold, or one per parameter) is given, 1 where some local ``|g_i| > above``.
    Shape ``[n]`` or ``[n, 2]``."""
    held = list(local) if plan.held is None else [local[i] for i in plan.held]
    width = 1 if above is None else 2
    if not held:
        stats = torch.zeros(plan.size, width, dtype=plan.dtype, device=plan.device)
        return stats if above is not None else stats[:, 0].contiguous()
    columns = [torch.stack(torch._foreach_norm(held, 2, dtype=plan.dtype)).square()]  # one fused pass each
    if above is not None:
        # aminmax is vectorized where an infinity norm reduction is not (8x slower on CPU).
        peaks = torch.stack([torch.stack(torch.aminmax(g)).abs().max().to(plan.dtype) for g in held])
        if not isinstance(above, (int, float)):
            above = torch.tensor(list(above), dtype=plan.dtype, device=plan.device)
            above = above if plan.rows is None else above.index_select(0, plan.rows)
        columns.append((peaks > above).to(plan.dtype))
    if plan.rows is None and above is None:
        return columns[0]
    if plan.rows is None:
        return torch.stack(columns, dim=1)
    stats = torch.zeros(plan.size, width, dtype=plan.dtype, device=plan.device)
    stats.index_copy_(0, plan.rows, torch.stack(columns, dim=1))
    return stats if above is not None else stats[:, 0].contiguous()


def grad_norms(params: Sequence[torch.Tensor], pieces: Mapping[torch.Tensor, FlatPiece] | None = None,
               above: float | Sequence[float] | None = None, pp_group: Any = None) -> GradNorms:
    """The norms of the whole gradients of ``params`` (0 for a parameter without gradient).

    ``pieces``: FSDP1 parameters' flat pieces (:func:`dropgrad_dist.layout.shards.flat_param_pieces`).
    ``above``: also find which parameters have a coordinate with ``|g_i| > above`` (same collective);
    one threshold for all, or one per parameter.
    ``pp_group``: the process group of the pipeline stages (:func:`stage_group`); ``total``
    then sums every stage's parameters. Every rank sharding a parameter must pass the same
    parameters in the same order (the optimizer's, say), whether or not it holds a gradient
    piece of each.
    """
    local = local_grads(params)
    return planned_norms(norm_plan(params, local, pieces), local, above, pp_group)


def planned_norms(plan: NormPlan, local: Sequence[torch.Tensor | None],
                  above: float | Sequence[float] | None = None, pp_group: Any = None) -> GradNorms:
    """:func:`grad_norms` of the local gradients ``local`` of a layout whose :func:`norm_plan` is ``plan``.

    ``||g_l||^2 = sum over the ranks sharding l of ||local g_l||^2``: one all-reduce per shard group.
    """
    stats = _local_stats(local, plan, above)
    for group, picked in plan.groups:
        if picked is None:
            dist.all_reduce(stats, group=group)
            continue
        subset = stats.index_select(0, picked)
        dist.all_reduce(subset, group=group)
        stats.index_copy_(0, picked, subset)
    squares = stats if above is None else stats[:, 0].contiguous()
    total = None
    if pp_group is not None:
        total = squares.sum().reshape(1)
        dist.all_reduce(total, group=pp_group)
        total = total.reshape(())
    return GradNorms(squares, None if above is None else stats[:, 1].contiguous(), total)
