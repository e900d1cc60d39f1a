"""DropGrad as a DDP communication hook: every rank drops the same coordinates of every bucket.

- :mod:`.hook`: :class:`DropGradHookState`, :func:`dropgrad_hook` (dense and compact rounds);
- :mod:`.rounds`: which backward pass is open, which optimizer step consumed it;
- :mod:`.buckets`: per-bucket segment tables, built once per bucket layout;
- :mod:`.compose`: the mask followed by another hook (bf16, fp16, PowerSGD);
- :mod:`.held_grads`, :mod:`.registration`, :mod:`.checkpoint`: the guard against compounding masks,
  what registration refuses, the state's checkpoint.

Uses :mod:`dropgrad_dist.dropgrad`'s masking plan; nothing below imports this package.
"""
