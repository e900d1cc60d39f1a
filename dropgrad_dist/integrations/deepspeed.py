"""DeepSpeed ZeRO-1/2/3 (through Accelerate): DropGrad, clipping and GNP/SAM on this rank's fp32 partition.

Under DeepSpeed every ``p.grad`` is ``None`` after backward: the reduced gradient lives only in
this rank's flat fp32 partition, formed inside the ZeRO optimizer's ``step()`` and handed to the
client optimizer (the user's ``torch.optim`` optimizer) right before the update. Accelerate calls
``engine.step()`` inside ``accelerator.backward``, so the regularizers act there:

- the client optimizer's ``step``, which DeepSpeed calls only for a step it applies (not after a
  loss-scale overflow or a non-finite gradient), runs ``DropGrad.step`` (step count, schedule,
  cross-rank agreement, ``step_skip_rate``, checkpoint state: the ordinary wrapper over the model's
  parameters), whose inner step masks the fp32 partition fragment by fragment (or, with
  ``full_update_drop``, drops coordinates of its update), clips, then updates. So a step DeepSpeed
  skips counts nowhere, as under ``GradScaler``. Parameter ``p``'s fragment ``p._hp_mapping`` lies at
  ``hp_fragment_address.start`` of the partition and covers the flat coordinates
  ``[lp_fragment_address.start, + numel)`` of ``p``: its mask is ``(seed, t, key(p), i, rate)`` on
  those global coordinates, exactly the one-process mask (one engine call for all fragments). Under
  ZeRO-3 parameter ``p``'s piece ``p.ds_tensor`` holds the coordinates from ``rank * ds_numel`` on.
- with GNP/SAM the client step is :class:`~dropgrad_dist.integrations.deepspeed_gnp.ZeroPenaltyPasses`'
  (perturb in the first pass; combine, then mask, clip, update in the second).

Math: ``g_frag <- m_t(key, i) * g_frag / (1 - p)`` on each fragment, then ``clip``, then the update.
Supported: ZeRO stage 1, 2 and 3, fp32, bf16 (DeepSpeed's ``BF16_Optimizer`` or the ZeRO
optimizer with bf16) and fp16 (DeepSpeed's loss scaler), optimizer offload to the CPU, any client
``torch.optim`` optimizer, every DropGrad option, every clipping method, restarts (on the fp32
master fragments), GNP/SAM (with gradient accumulation), ``save_state``/``load_state``. Refused,
each with its reason: DeepSpeed's own ``gradient_clipping``, NVMe or partial optimizer offload,
clipping or GNP/SAM when the ZeRO optimizer steps several parameter groups (or ZeRO-3 sub-groups)
apart, and GNP/SAM with ``perturbation="local"``, ``first_pass="given"`` or ``pp_mesh``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from ..clipping.clipper import GradientClipper
from ..clipping.restarts import Restarter
from ..dropgrad.optimizer import DropGrad
from ..dropgrad.step import drop_update_around
from ..gnp.penalty import GradientNormPenalty
from ..layout.names import named_parameters
from ..layout.shards import FlatPiece
from ..mask.local import drop_locals_
from .deepspeed_gnp import ZeroPenaltyPasses, refresh_model_parameters

__all__ = ["FragmentGrads", "MasterFragments", "ZeroPartitions", "ZeroRegularizers", "prepare_deepspeed"]


def _refuse(what: str, why: str) -> ValueError:
    return ValueError(f"prepare_regularizers under DeepSpeed: {what} is not supported: {why}")


class ZeroPartitions:
    """Where each parameter's fragment lies in this rank's flat fp32 partitions (ZeRO-1/2/3, BF16_Optimizer).

    ``fragments[flat]``: ``[(param, start in flat, numel, start in param), ...]`` for each flat fp32
    partition ``flat`` (one per parameter group) that the client optimizer steps on.
    """

    def __init__(self, zero_optimizer: Any) -> None:
        if hasattr(zero_optimizer, "fp32_partitioned_groups_flat"):  # DeepSpeedZeroOptimizer_Stage3
            self._stage3(zero_optimizer)
            return
        if hasattr(zero_optimizer, "single_partition_of_fp32_groups"):  # DeepSpeedZeroOptimizer (stage 1, 2)
            flats, lps = zero_optimizer.single_partition_of_fp32_groups, zero_optimizer.bit16_groups
        elif hasattr(zero_optimizer, "fp32_groups_flat_partition"):  # BF16_Optimizer
            flats, lps = zero_optimizer.fp32_groups_flat_partition, zero_optimizer.bf16_groups
        else:
            raise _refuse(f"the optimizer {type(zero_optimizer).__name__}",
                          "DropGrad finds gradient partitions in DeepSpeed's ZeRO-1/2/3 optimizers and its "
                          "BF16_Optimizer only (fp32 or bf16 with zero_optimization.stage 1, 2 or 3)")
        self.groups: list[list[torch.Tensor]] = [list(group) for group in lps]
        self.flats: list[torch.Tensor] = list(flats)
        self.shard_groups = list(zero_optimizer.real_dp_process_group)
        self.fragments: dict[torch.Tensor, list[tuple[torch.Tensor, int, int, int]]] = {}
        for flat, group in zip(self.flats, self.groups):
            self.fragments[flat] = [
                (lp, lp._hp_mapping.hp_fragment_address.start, lp._hp_mapping.hp_fragment_address.numel,
                 lp._hp_mapping.lp_fragment_address.start)
                for lp in group if getattr(lp, "_hp_mapping", None) is not None]

    def _stage3(self, zero_optimizer: Any) -> None:
        """ZeRO-3: each parameter ``p`` is split evenly; this rank holds ``p.ds_tensor`` (padded), the flat
        coordinates from ``partition rank * p.ds_tensor.ds_numel`` on; a sub-group's fp32 partition lays
        the parameters' pieces back to back, in the sub-group's order."""
        self.groups = [list(group) for group in zero_optimizer.fp16_groups]
        self.flats = list(zero_optimizer.fp32_partitioned_groups_flat)
        self.shard_groups = [zero_optimizer._get_sub_group_process_group(i) for i in range(len(self.flats))]
        self.fragments = {}
        for i, (flat, group) in enumerate(zip(self.flats, self.groups)):
            rank = zero_optimizer._get_sub_group_partition_rank(i)
            fragments, at = [], 0
            for lp in group:
                size = lp.ds_tensor.ds_numel  # this rank's piece, padding included
                start = rank * size
                held = max(0, min(size, lp.ds_numel - start))  # the padding of the last piece is no coordinate
                if held:
                    fragments.append((lp, at, held, start))
                at += size
            self.fragments[flat] = fragments


class FragmentGrads:
    """Each model parameter's gradient fragment in this rank's partitions, as a tensor of its own (for clipping).

    ``params[k]`` stands for the ``k``-th model parameter in DeepSpeed's group order (the same on
    every rank): its ``.grad`` is a view of this rank's fragment of that parameter's gradient (None
    where the rank holds none), and ``pieces`` sums its squares over the data-parallel group, as for
    FSDP1's flat pieces. So ``||g_l||^2 = sum over ranks of ||fragment of g_l||^2``: per-parameter and
    global norms of whole gradients in one all-reduce, and scaling a stand-in's gradient scales the
    partition in place.
    """

    def __init__(self, partitions: ZeroPartitions) -> None:
        held = {lp: (at, numel) for fragments in partitions.fragments.values() for lp, at, numel, _ in fragments}
        self.params: list[torch.Tensor] = []
        self.pieces: dict[torch.Tensor, FlatPiece] = {}
        self._views: list[tuple[torch.Tensor, torch.Tensor, int, int]] = []  # (stand-in, flat, at, numel)
        for flat, group, lps in zip(partitions.flats, partitions.shard_groups, partitions.groups):
            for lp in lps:
                at, numel = held.get(lp, (0, 0))
                # No storage of its own: only its .grad (a view of the partition's gradient) is ever read.
                stand_in = torch.empty((), dtype=flat.dtype, device=flat.device).expand(numel)
                self.params.append(stand_in)
                self.pieces[stand_in] = FlatPiece(0, group)
                if numel:
                    self._views.append((stand_in, flat, at, numel))

    def current(self) -> list[torch.Tensor]:
        """The stand-ins, each ``.grad`` pointed at this step's fragment of the partitions' gradients."""
        for stand_in, flat, at, numel in self._views:
            stand_in.grad = None if flat.grad is None else flat.grad.view(-1).narrow(0, at, numel)
        return self.params


class MasterFragments(nn.Module):
    """This rank's fp32 master fragment of each model parameter as a parameter of its own: what ``Restarter`` sums,
    averages and saves (per rank, as it does FSDP shards).

    Each parameter sits under the model parameter's canonical name and shares the partition's
    storage (an empty one where this rank holds none), so setting it sets the master weights.
    """

    def __init__(self, partitions: ZeroPartitions, model: nn.Module) -> None:
        super().__init__()
        held = {lp: (flat, at, numel) for flat, fragments in partitions.fragments.items()
                for lp, at, numel, _ in fragments}
        for item in named_parameters(model):
            flat, at, numel = held.get(item.param, (None, 0, 0))
            data = flat.detach().view(-1).narrow(0, at, numel) if flat is not None else torch.empty(0)
            *path, name = item.key.split(".")
            owner: nn.Module = self
            for part in path:
                if part not in owner._modules:
                    owner.add_module(part, nn.Module())
                owner = owner._modules[part]
            owner.register_parameter(name, nn.Parameter(data, requires_grad=False))


class _ZeroStep(torch.optim.Optimizer):
    """The model's parameters, grouped as DeepSpeed groups them: what ``DropGrad`` wraps.

    ``DropGrad`` names and rates these parameters and counts the steps; their gradients stay
    ``None`` (DeepSpeed keeps them in its partitions), so it masks nothing itself. Its inner step
    is the partitions' update (:meth:`_ZeroUpdate.update`), run from inside DeepSpeed's step.
    """

    def __init__(self, groups: list[list[torch.Tensor]], update: Callable[[], Any]) -> None:
        super().__init__([{"params": group} for group in groups if group], {})
        self._update = update

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        if closure is not None:
            raise ValueError("the DeepSpeed ZeRO step takes no closure")
        return self._update()


class _ZeroUpdate:
    """The client optimizer's step as DeepSpeed calls it: DropGrad's step, then clipping, then the update.

    DeepSpeed calls the client step only for a step it applies (never after a loss-scale overflow
    or a non-finite gradient) and once per parameter group it updates. The first call of a
    DeepSpeed step runs ``DropGrad.step`` (step count, schedule, agreement, ``step_skip_rate``), whose
    inner step masks the partitions' fragments with ``m_t`` (or, with ``full_update_drop``, drops
    coordinates of their update), clips and updates; the later groups of that step take the same
    ``t`` and the same decision. So a step DeepSpeed skips advances no count, as under ``GradScaler``.
    """

    def __init__(self, client: torch.optim.Optimizer, zero_optimizer: Any, partitions: ZeroPartitions,
                 clipper: GradientClipper | None, restarter: Restarter | None, masters: MasterFragments | None) -> None:
        self._inner = client.step  # bound, with torch's step hooks
        self._client = client
        self._zero_optimizer = zero_optimizer
        self._partitions = partitions
        self.clipper = clipper
        self._restarter, self._masters = restarter, masters
        self.dropgrad: DropGrad | None = None
        self._fragments = FragmentGrads(partitions) if clipper is not None else None
        if clipper is not None:  # the stand-ins are pieces of whole gradients, summed over the DP group
            clipper._pieces = dict(self._fragments.pieces)
        self._masks: dict[torch.Tensor, list[tuple[int, int, str, float, int]]] | None = None  # this step's
        self._t = 0
        self._flats: list[torch.Tensor] = []
        self._updated = False  # whether the client updated in this DeepSpeed step

    def around(self, zero_step: Callable[..., Any]) -> Callable[..., Any]:
        """DeepSpeed's optimizer step, with this step's bookkeeping around it."""

        def step(*args: Any, **kwargs: Any) -> Any:
            self._masks, self._updated = None, False
            # DeepSpeed links each fragment to the client's optimizer state after its first step; a step
            # that updated nothing (skipped, or GNP's perturbing pass) left that state empty: link it later.
            linked = getattr(self._zero_optimizer, "_hp_optimizer_states_linked", None)
            try:
                result = zero_step(*args, **kwargs)
            finally:
                if linked is False and not self._updated:
                    self._zero_optimizer._hp_optimizer_states_linked = False
            if self._updated and self._restarter is not None:
                self._restart_if_due()
            return result

        return step

    def _restart_if_due(self) -> None:
        """After an update: add the master fragments to the restart sums; on a restart (masters set to the mean,
        the client's state cleared) relink DeepSpeed's fragments to that state and copy the masters into the model."""
        if self._restarter.step(self._masters, self._client):
            if hasattr(self._zero_optimizer, "_hp_optimizer_states_linked"):
                self._zero_optimizer._hp_optimizer_states_linked = False  # relinked after the next update
            refresh_model_parameters(self._zero_optimizer)

    @torch.no_grad()
    def step(self, *args: Any, **kwargs: Any) -> Any:
        """What replaces the client optimizer's ``step`` (or runs inside GNP's second pass)."""
        self._flats = [p for group in self._client.param_groups for p in group["params"]
                       if p in self._partitions.fragments]
        drop = self.dropgrad
        if drop is None:
            return self.update()
        if self._masks is None:  # the first group DeepSpeed updates in this step
            self._t = drop.step_index
            self._masks = self._mask_plan(drop)
            return drop.step()  # -> self.update(), unless DropGrad skips this step
        if drop.last_step_skipped:
            return None
        return self.update()

    def _mask_plan(self, drop: DropGrad) -> dict[torch.Tensor, list[tuple[int, int, str, float, int]]]:
        """Per partition, ``(at, numel, key, rate, start)`` of each fragment masked at this step (rate > 0).

        For every partition at once: a later group's gradient is formed after the schedule advanced."""
        plan: dict[torch.Tensor, list[tuple[int, int, str, float, int]]] = {}
        for flat, fragments in self._partitions.fragments.items():
            plan[flat] = []
            for lp, at, numel, start in fragments:
                entry = drop.plan.entry(lp)
                rate = drop.plan.rate_of(entry) if entry is not None else 0.0
                if rate > 0.0:
                    plan[flat].append((at, numel, entry.key, rate, start))
        return plan

    def update(self) -> Any:
        """Mask (or drop the update), clip, and update the partitions of this call's groups."""
        drop = self.dropgrad
        items = []
        if drop is not None:
            for flat in self._flats:
                tensor = flat.grad if not drop.full_update_drop else flat.detach()
                if flat.grad is not None:
                    items += [(tensor.view(-1).narrow(0, at, numel), key, rate, start)
                              for at, numel, key, rate, start in self._masks[flat]]
            if not drop.full_update_drop:
                drop_locals_(items, seed=drop.seed, step=self._t)
        if self.clipper is not None:
            self.clipper.clip_(self._fragments.current())
        if drop is not None and drop.full_update_drop:
            result = drop_update_around(self._inner, items, seed=drop.seed, step=self._t)
        else:
            result = self._inner()
        self._updated = True
        if self.clipper is not None:
            self.clipper.step()  # the clipped stand-ins are no optimizer's parameters: count the step here
        return result


class _PartitionStep(torch.optim.Optimizer):
    """This rank's fp32 partitions (one group each), stepped by :meth:`_ZeroUpdate.step`: what GNP/SAM wraps.

    Its parameter list stays fixed (ZeRO-3 empties the client's groups outside its step), so the
    penalty's step count sees every update of the partitions.
    """

    def __init__(self, partitions: ZeroPartitions, masked_step: Callable[..., Any]) -> None:
        super().__init__([{"params": [flat]} for flat in partitions.flats], {})
        self._masked_step = masked_step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        if closure is not None:
            raise ValueError("the DeepSpeed partition step takes no closure")
        return self._masked_step()


def _stepped_apart(zero_optimizer: Any) -> bool:
    """Whether DeepSpeed's ZeRO optimizer updates several parameter groups (or ZeRO-3 sub-groups) one by one."""
    groups = getattr(zero_optimizer, "single_partition_of_fp32_groups", None) or \
        getattr(zero_optimizer, "fp32_partitioned_groups_flat", [])
    return len(groups) > 1


def _check_engine(engine: Any, zero_optimizer: Any, clipping: Mapping[str, Any] | None) -> None:
    """Refuse, before anything changes, every combination this integration would get wrong."""
    if engine.gradient_clipping() > 0.0:
        raise _refuse(f"DeepSpeed's gradient_clipping={engine.gradient_clipping()}",
                      "DeepSpeed clips before DropGrad masks; set gradient_clipping to 0 in the DeepSpeed config and "
                      "pass clipping=dict(method='norm', clipping_level=...) to prepare_regularizers instead")
    _check_offload(zero_optimizer)
    if clipping is not None:
        if _stepped_apart(zero_optimizer):
            raise _refuse("clipping with several parameter groups (or ZeRO-3 sub-groups) under the ZeRO optimizer",
                          "DeepSpeed updates one group after another, so no global norm exists before the first "
                          "group's update; use one parameter group (or bf16 with DeepSpeed's BF16_Optimizer)")


def _check_offload(zero_optimizer: Any) -> None:
    """Optimizer offload to CPU keeps the fp32 partitions on the CPU and steps them with the client optimizer: the
    same partitions, masked the same way. Refused: the layouts where something else steps them."""
    if not getattr(zero_optimizer, "offload_optimizer", False):  # ZeRO-3's flag (ZeRO-1/2: cpu_offload, supported)
        return
    if getattr(zero_optimizer, "swap_optimizer", False):
        raise _refuse("offload_optimizer to nvme", "the partitions are swapped to NVMe around each sub-group's "
                      "update by DeepSpeed's async I/O path, which is not covered; offload to 'cpu'")
    ratio = getattr(zero_optimizer, "partial_offload", 1.0)
    if ratio != 1.0:
        raise _refuse(f"offload_optimizer with ratio={ratio}", "DeepSpeed steps the sub-groups kept on the GPU with a "
                      "backup optimizer of its own, not the client optimizer that masks; use ratio 1")


def _check_penalty(zero_optimizer: Any, gnp: Mapping[str, Any]) -> None:
    """Refuse the GNP/SAM combinations the two ZeRO passes (:mod:`.deepspeed_gnp`) would get wrong."""
    what = "gnp (gradient norm penalty / SAM)"
    if gnp.get("perturbation") == "local":
        raise _refuse("gnp perturbation='local'", "DeepSpeed reduces the gradient inside backward, so no rank holds "
                      "its own unreduced gradient; use perturbation='global'")
    if gnp.get("first_pass") == "given":
        raise _refuse("gnp first_pass='given'", "a backward before regularizers.step would already update; let the "
                      "closure run both passes (first_pass='closure')")
    if "pp_mesh" in gnp:
        raise _refuse("gnp pp_mesh=", "the norm is summed over the data-parallel partitions; DeepSpeed's pipeline "
                      "engine is not integrated")
    if _stepped_apart(zero_optimizer):
        raise _refuse(f"{what} with several parameter groups (or ZeRO-3 sub-groups) under the ZeRO optimizer",
                      "DeepSpeed updates one group after another, so no global norm exists before the first group "
                      "moves; use one parameter group (or bf16 with DeepSpeed's BF16_Optimizer)")


class ZeroRegularizers(NamedTuple):
    """What :func:`prepare_deepspeed` hooked into the engine (None where not asked for)."""

    dropgrad: DropGrad | None
    clipper: GradientClipper | None
    restarter: Restarter | None
    masters: MasterFragments | None  # what the restarter averages and saves
    penalty: GradientNormPenalty | None
    penalty_step: Callable[..., Any] | None  # regularizers.step(closure) with GNP/SAM


def prepare_deepspeed(accelerator: Any, engine: nn.Module, optimizer: Any, *, dropgrad: Mapping[str, Any] | None,
                      clipping: Mapping[str, Any] | None, restarts: Mapping[str, Any] | None,
                      gnp: Mapping[str, Any] | None) -> ZeroRegularizers:
    """Hook DropGrad, clipping, restarts and GNP/SAM into a prepared DeepSpeed engine.

    ``engine``/``optimizer``: what ``accelerator.prepare`` returned (the ``DeepSpeedEngine`` and
    Accelerate's ``DeepSpeedOptimizerWrapper``). Validates everything before changing anything.
    """
    if not callable(getattr(engine, "zero_optimization_stage", None)):
        raise ValueError("prepare_regularizers under DeepSpeed: model must be the DeepSpeedEngine returned by "
                         f"accelerator.prepare, got {type(engine).__name__}")
    zero_optimizer = engine.optimizer
    client = getattr(zero_optimizer, "optimizer", None)
    _check_engine(engine, zero_optimizer, clipping)
    if gnp is not None:
        _check_penalty(zero_optimizer, gnp)
    if not isinstance(client, torch.optim.Optimizer):
        raise _refuse(f"the engine optimizer {type(zero_optimizer).__name__}",
                      "DropGrad needs DeepSpeed's ZeRO optimizer around a torch.optim client optimizer")
    partitions = ZeroPartitions(zero_optimizer)
    model = engine.module  # canonical names: the one-process model's (the engine adds "module.")
    clipper = GradientClipper(**clipping, model=model) if clipping is not None else None
    restarter = Restarter(**restarts) if restarts is not None else None
    masters = MasterFragments(partitions, model) if restarter is not None else None
    update = _ZeroUpdate(client, zero_optimizer, partitions, clipper, restarter, masters)
    zero_step = update.around(zero_optimizer.step)
    drop = None
    if dropgrad is not None:
        drop = DropGrad(_ZeroStep(partitions.groups, update.update), **dropgrad, model=model)
        drop.include_state_in_state_dict = False  # the integration's JSON file holds it
        update.dropgrad = drop
    penalty = passes = None
    if gnp is not None:
        # Each rank's partition is a disjoint part of every parameter: ||g|| sums the ranks' squares over the
        # data-parallel group, what GradientNormPenalty does over pipeline stages (pp_mesh).
        penalty = GradientNormPenalty(_PartitionStep(partitions, update.step), **gnp, model=model,
                                      pp_mesh=partitions.shard_groups[0])
        penalty.include_state_in_state_dict = False
        passes = ZeroPenaltyPasses(engine, zero_step, penalty)
    zero_optimizer.step = zero_step  # engine.step() -> DeepSpeed's step -> the client step below
    if passes is not None:
        zero_optimizer.step = passes.guard(zero_step)
        client.step = passes.client_step  # perturb, or combine and then mask, clip, update
    elif drop is not None or clipper is not None:
        client.step = update.step
    return ZeroRegularizers(drop, clipper, restarter, masters, penalty, passes.step if passes is not None else None)
