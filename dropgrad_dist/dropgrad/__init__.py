"""DropGrad as an optimizer wrapper (one process, FSDP2, FSDP1, HSDP, tensor parallel).

- :mod:`.optimizer`: :class:`DropGrad`;
- :mod:`.step`: the functional core of its step (cached table, full update drop, step skip);
- :mod:`.mask_once`: each gradient masked once per step;
- :mod:`.plan`, :mod:`.schedules`, :mod:`.plan_state`: which parameters at which rate, the drop-rate
  schedules, and a plan's progress in checkpoints (shared with the DDP hook).
"""
