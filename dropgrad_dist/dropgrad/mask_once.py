"""Each gradient is masked once per step: what DropGrad masked in this step, and the refusals that keep it so.

A gradient masked twice has its kept coordinates scaled by ``1/(1-p)**2``; a backward that adds
to a masked gradient leaks the later micro-batches into dropped coordinates
(``m*s*g1 + g2 != m*s*(g1 + g2)``). :class:`MaskedThisStep` records which local gradient tensors
were masked in the current step (a second ``mask_gradients_()`` skips them), watches autograd's
accumulation into them once an early mask was asked for, and stamps the gradients each step
stepped on, so that a second ``step()`` on them with no backward in between is refused.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence

import torch

from ..core.steps import GradientStamp
from .plan import ParamEntry

__all__ = ["MaskedThisStep"]


class MaskedThisStep:
    """The gradients masked in the current step and the gradients the last step stepped on.

    Attributes:
        leaked_key: the key of a gradient that a backward accumulated into after it was masked in
            this step (None: none did); :meth:`refuse_leaked_accumulation` raises on it.
        watching: whether post-accumulate-grad hooks watch the parameters (installed by the first
            early mask, :meth:`watch_accumulation`).
        stepped_on: the stamp of the gradients the last step masked and stepped on (None: no
            closure-free step yet, or forgotten).
    """

    def __init__(self) -> None:
        self._by_param: dict[int, torch.Tensor] = {}  # id(param) -> its local gradient masked in this step
        # What the piece table masked, (ids, positions, locals_): turned into _by_param only when asked,
        # since most steps never ask (no early mask, no accumulation watch).
        self._from_table: tuple[Sequence[int], Sequence[int], Sequence[torch.Tensor | None]] | None = None
        self.leaked_key: str | None = None
        self.watching = False
        self.stepped_on: GradientStamp | None = None
        self._params: tuple[Sequence[ParamEntry] | None, list[torch.Tensor]] = (None, [])  # entries -> their params

    def __bool__(self) -> bool:
        """Whether any gradient was masked in this step."""
        return bool(self._by_param) or (self._from_table is not None and len(self._from_table[1]) > 0)

    def record(self, ids: Sequence[int], positions: Sequence[int], locals_: Sequence[torch.Tensor | None]) -> None:
        """Note that ``locals_[k]``, the gradient of the parameter with id ``ids[k]``, was masked, for ``k`` in
        ``positions`` (what the piece table returns); replaces what was noted."""
        self._by_param, self._from_table = {}, (ids, positions, locals_)

    def _masked(self) -> dict[int, torch.Tensor]:
        if self._from_table is not None:
            ids, positions, locals_ = self._from_table
            self._by_param.update(zip(map(ids.__getitem__, positions), map(locals_.__getitem__, positions)))
            self._from_table = None
        return self._by_param

    def add(self, param: torch.Tensor, local: torch.Tensor) -> None:
        """Note that ``local``, the local gradient of ``param``, was masked."""
        self._masked()[id(param)] = local

    def holds(self, param: torch.Tensor, local: torch.Tensor) -> bool:
        """Whether ``local`` is the gradient of ``param`` masked in this step."""
        return self._masked().get(id(param)) is local

    def forget(self) -> None:
        """A new step begins (a step ran, ``zero_grad``, a closure's fresh gradients, a load)."""
        self._by_param.clear()
        self._from_table = None
        self.leaked_key = None

    # -- a backward into a masked gradient ---------------------------------------------------------
    def watch_accumulation(self, entries: Iterable[ParamEntry]) -> None:
        """Install, once, hooks that note a backward accumulating into a gradient masked in this step."""
        if self.watching:
            return
        self.watching = True
        this = weakref.ref(self)
        for entry in entries:
            if entry.param.requires_grad:  # hooks outlive this record otherwise
                handle = entry.param.register_post_accumulate_grad_hook(_accumulation_check(this, entry.key))
                weakref.finalize(self, handle.remove)

    def accumulated(self, param: torch.Tensor, key: str) -> None:
        """Autograd accumulated into the gradient of ``param``: a leak if it was masked in this step."""
        if self.leaked_key is None and id(param) in self._masked():
            self.leaked_key = key

    def refuse_leaked_accumulation(self) -> None:
        """Raise (and forget this step's masks) if a backward accumulated into a masked gradient."""
        if self.leaked_key is not None:
            key = self.leaked_key
            self.forget()
            raise RuntimeError(
                f"DropGrad: a backward accumulated into the gradient of {key!r} after mask_gradients_() masked it "
                "in this step; the step would leak the later micro-batches into dropped coordinates. Call "
                "mask_gradients_() (or clip) only after the last micro-batch's backward")

    # -- a second step on the same gradients -------------------------------------------------------
    def stamp_step(self, entries: Sequence[ParamEntry] | None) -> None:
        """Remember the gradients of ``entries`` that a step just stepped on (None: nothing to refuse later)."""
        self.stepped_on = None if entries is None else GradientStamp(self._params_of(entries))

    def refuse_second_step(self, entries: Sequence[ParamEntry], step_index: int) -> None:
        """Raise if ``entries`` hold the very gradients the last step masked and stepped on.

        They would be masked twice (and, on one rank of a distributed run, that rank would send
        one collective more than the others: a hang, not an error).
        """
        if self.stepped_on is not None and self.stepped_on.unchanged(self._params_of(entries)):
            raise RuntimeError(
                f"DropGrad.step() called again (step {step_index}) on the gradients that step "
                f"{step_index - 1} already masked and stepped on, with no backward in between: they would be "
                "masked twice. Compute new gradients (backward) before every step")

    def _params_of(self, entries: Sequence[ParamEntry]) -> list[torch.Tensor]:
        if self._params[0] is not entries:  # a plan keeps its entries list until its rates change
            self._params = (entries, [entry.param for entry in entries])
        return self._params[1]


def _accumulation_check(record_ref: weakref.ref[MaskedThisStep], key: str) -> Callable[[torch.Tensor], None]:
    def check(param: torch.Tensor) -> None:
        record = record_ref()
        if record is not None:
            record.accumulated(param, key)
    return check
