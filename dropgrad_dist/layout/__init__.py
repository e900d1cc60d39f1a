"""Where a parameter lives: its canonical name, the global coordinates of its local shard, global norms.

- :mod:`.names`: canonical parameter names (wrappers peeled off), the key of masks and histories;
- :mod:`.shards`: local vs global coordinates of DTensor and FSDP1 shards;
- :mod:`.norms`: gradient norms of whole parameters over any layout, in one collective.

The bottom layer: imports nothing of ``dropgrad_dist``.
"""
