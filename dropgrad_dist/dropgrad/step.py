"""The functional core of ``DropGrad.step()``: mask this step's gradients, or drop the update.

:func:`mask_grads_` applies ``g <- m_t * g / (1 - p)`` to every masked gradient: through the
piece table cached per layout (:class:`~dropgrad_dist.mask.grad_table.GradTable`) when nothing
was masked yet in this step, else (or where the table does not apply) tensor by tensor, skipping
the gradients already masked. :func:`step_and_drop_update` steps on the full gradient and drops
coordinates of the update, ``w <- w_old + m_t * (w_new - w_old) / (1 - p)``, with the independent
update mask stream (:func:`drop_update_around` for any in-place update of any local pieces, e.g.
DeepSpeed's partitions). :class:`DropGrad` keeps the state; these functions hold the math.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from .. import mask as _mask
from ..core import ownership as _ownership
from ..core.ownership import refuse_hook_masked
from ..layout.shards import local_tensor
from ..mask.grad_table import GradTable
from ..mask.local import drop_locals_
from .mask_once import MaskedThisStep
from .plan import DropPlan, ParamEntry

__all__ = ["MaskColumns", "drop_update_around", "mask_columns", "mask_grads_", "masked_entries", "step_and_drop_update",
           "step_skipped"]

_GRAD = operator.attrgetter("grad")


def step_skipped(seed: int, step: int, skip_rate: float) -> bool:
    """Whether step ``step`` is skipped as a whole: ``u(seed, step) < q``, drawn from the skip stream."""
    if skip_rate == 0.0:
        return False
    return _mask.uniform_u32(seed, step, _mask.MaskStream.SKIP) < _mask.keep_threshold(1.0 - skip_rate)


class MaskColumns(NamedTuple):
    """The plan's entries as columns, position ``k`` for one parameter (the piece table's inputs).

    The same objects while the plan and the default rate are unchanged: the table compares
    them by identity to tell that the layout did not change.
    """

    params: list[torch.Tensor]
    keys: list[str]
    rates: list[float]
    starts: list[int]  # where each parameter's local piece starts in its flat parameter (FSDP1), else 0
    ids: list[int]


ColumnsKey = tuple[list[ParamEntry], float | None]  # (the plan's entries, the default rate) the columns were built for


def mask_columns(plan: DropPlan, starts: Mapping[torch.Tensor, int],
                 cached: tuple[ColumnsKey, MaskColumns] | None) -> tuple[ColumnsKey, MaskColumns]:
    """``cached`` while the plan's entries and default rate are unchanged, else fresh columns (and their key)."""
    entries, default = plan.entries, plan.default_rate()
    if cached is not None and cached[0][0] is entries and cached[0][1] == default:
        return cached
    params = [entry.param for entry in entries]
    columns = MaskColumns(params, [entry.key for entry in entries], [plan.rate_of(entry) for entry in entries],
                          [starts.get(param, 0) for param in params], [id(param) for param in params])
    return (entries, default), columns


def masked_entries(plan: DropPlan) -> list[tuple[ParamEntry, float]]:
    """The entries masked at this step: a gradient present and a rate above 0."""
    with_rates = ((entry, plan.rate_of(entry)) for entry in plan.entries if entry.param.grad is not None)
    return [(entry, rate) for entry, rate in with_rates if rate > 0.0]


@torch.no_grad()
def mask_grads_(plan: DropPlan, starts: Mapping[torch.Tensor, int], columns: MaskColumns, table: GradTable,
                masked: MaskedThisStep, *, seed: int, step: int) -> None:
    """Mask every gradient of ``plan`` not yet masked in this step, in place, and record it in ``masked``.

    Raises:
        RuntimeError: a backward accumulated into a gradient masked earlier in this step, or a
            DDP hook already masks one of these gradients.
    """
    masked.refuse_leaked_accumulation()
    if not masked:  # nothing masked yet in this step: every gradient through the cached table
        grads = list(map(_GRAD, columns.params))  # a C-level map: no Python frame per parameter
        if _ownership._MASKED_BY_HOOK:
            for param, key, grad, rate in zip(columns.params, columns.keys, grads, columns.rates):
                if grad is not None and rate > 0.0:
                    refuse_hook_masked(param, key)
        done = table.drop_(grads, columns.keys, columns.rates, columns.starts, seed=seed, step=step)
        if done is not None:
            masked.record(columns.ids, *done)
            return
    todo = []
    for entry, rate in masked_entries(plan):
        local = local_tensor(entry.param.grad)
        if masked.holds(entry.param, local):
            continue
        refuse_hook_masked(entry.param, entry.key)
        todo.append((entry.param.grad, entry.key, rate, starts.get(entry.param, 0)))
        masked.add(entry.param, local)
    drop_locals_(todo, seed=seed, step=step)  # one engine call for every gradient


def step_and_drop_update(optimizer: torch.optim.Optimizer, closure: Callable[[], Any] | None, plan: DropPlan,
                         starts: Mapping[torch.Tensor, int], *, seed: int, step: int) -> Any:
    """Step ``optimizer`` on the full gradient, then ``w <- w_old + m_t * (w_new - w_old) / (1 - p)``.

    The update mask is drawn from :attr:`~dropgrad_dist.mask.MaskStream.UPDATE`, independent of
    the gradient masks. Returns what the optimizer's step returns.
    """
    items = [(entry.param, entry.key, rate, starts.get(entry.param, 0)) for entry, rate in masked_entries(plan)]
    return drop_update_around(lambda: optimizer.step(closure) if closure is not None else optimizer.step(), items,
                              seed=seed, step=step)


def drop_update_around(update: Callable[[], Any], items: Sequence[tuple[torch.Tensor, str, float, int]], *,
                       seed: int, step: int) -> Any:
    """Run ``update`` (which changes the tensors of ``items`` in place), then drop coordinates of its change.

    ``w <- w_old + m_t * (w_new - w_old) / (1 - p)`` for each ``(w, key, rate, start)`` of ``items``
    (``start``: the global flat index of ``w``'s first element, as :func:`~dropgrad_dist.mask.local.drop_locals_`
    takes it), with the update mask stream. Returns what ``update`` returns.
    """
    olds = [w.detach().clone() for w, _, _, _ in items]
    result = update()
    if not items:
        return result
    with torch.no_grad():
        updates = [w.detach() for w, _, _, _ in items]
        torch._foreach_sub_(updates, olds)
        drop_locals_([(change, key, rate, start) for change, (_, key, rate, start) in zip(updates, items)],
                     seed=seed, step=step, stream=_mask.MaskStream.UPDATE)
        torch._foreach_add_(updates, olds)
    return result
