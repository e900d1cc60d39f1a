"""Round bookkeeping of the DDP hook: which backward pass is open, which optimizer step consumed it.

A *round* is one synchronizing backward pass: DDP calls the hook once per bucket and
``bucket.is_last()`` closes it. Opening a round launches the cross-rank agreement check
(:mod:`dropgrad_dist.core.agreement`) and arms the :class:`~dropgrad_dist.core.steps.StepWatch`; the first
optimizer step over the model after a round advances the masks' step ``t``. A round that no
optimizer step consumed, followed by another synchronizing backward on gradients still held,
would mask twice: :meth:`Rounds.unconsumed` tells the state's gradient pre-hook so.
"""

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from ..core.agreement import AgreementCheck, PendingCheck
from ..core.collectives import SentTensors
from ..core.steps import StepWatch


class Rounds:
    """Open/close of rounds, the pending agreement check, and the send buffers held until the next round.

    Public counters: ``pending`` (synchronizing rounds since the last optimizer step), ``in_round``
    (a backward pass is between its first and last bucket), ``held`` (``unconsumed() > 0``, kept as a
    flag: every masked parameter's gradient pre-hook reads it, a thousand times a backward pass).
    """

    __slots__ = ("agreement", "sent", "pending", "in_round", "held", "_check", "_watch", "_steps_at_round")

    def __init__(self, owner: str, process_group: dist.ProcessGroup | None) -> None:
        self.agreement = AgreementCheck(owner, process_group)
        self.sent = SentTensors()  # the last round's send buffers (see collectives.py)
        self._watch: StepWatch | None = None
        self._steps_at_round = 0  # the watch's step count when the last round opened
        self.reset()

    def watch(self, params: Iterable[torch.Tensor], on_first_step: Callable[[], None]) -> None:
        """Call ``on_first_step`` at the first optimizer step over ``params`` after a round."""
        self._watch = StepWatch(set(params), on_first_step, count_all=True)
        self._steps_at_round = 0

    def reset(self) -> None:
        """No round open, none pending (a loaded checkpoint, a new binding)."""
        self.pending = 0
        self.in_round = self.held = False
        self._check: PendingCheck | None = None
        if self._watch is not None:
            self._watch.disarm()

    def steps_since_round(self) -> int:
        """``optimizer.step()`` calls over the model since the last round opened (any optimizer)."""
        return self._watch.steps - self._steps_at_round if self._watch is not None else 0

    def open(self, fields: dict[str, object], device: torch.device, masking: bool) -> None:
        """Open a round: start the agreement check on ``fields`` (waited for by :meth:`settle` or :meth:`close`)."""
        self.sent.release()  # the previous round's collectives completed before its optimizer step
        self._check = self.agreement.start(fields, device)
        self._steps_at_round = self._watch.steps if self._watch is not None else 0
        self.in_round = True
        if masking:
            self.pending += 1
            if self._watch is not None:
                self._watch.arm()
        self._update_held()

    def settle(self) -> None:
        """Wait for the round's agreement check now (raises on every rank); a no-op once it was waited for.

        Compact calls it before its first all-reduce, whose size depends on ``t``.
        """
        check, self._check = self._check, None
        if check is not None:
            try:
                check.wait()
            except BaseException:
                self.in_round = False
                self._update_held()
                raise

    def close(self) -> None:
        """The last bucket: wait for the agreement check (raises on every rank before any step)."""
        self.in_round = False
        self._update_held()
        check, self._check = self._check, None
        if check is not None:
            check.wait()

    def abort(self) -> None:
        """A bucket raised: the round is over, its check abandoned."""
        self.in_round = False
        self._check = None
        self._update_held()

    def consumed(self) -> None:
        """An optimizer step consumed the pending rounds."""
        self.pending = 0
        self.held = False

    def unconsumed(self) -> int:
        """Closed rounds that no optimizer step consumed yet."""
        return self.pending - (1 if self.in_round else 0)

    def _update_held(self) -> None:
        self.held = self.unconsumed() > 0
