"""torch-clip's clipping family, distributed-correct: one global decision on every rank.

- :mod:`.clipper`: :class:`GradientClipper`, :class:`ClippedOptimizer`, :class:`ClippedSGD`;
- :mod:`.methods`: the eight methods as functions (options, decision, in-place scaling);
- :mod:`.layout_cache`: the norm pieces of one gradient layout, found once and reused;
- :mod:`.history`: AutoClip's exact-quantile norm histories;
- :mod:`.state`: the clipper's checkpoint;
- :mod:`.restarts`: :class:`Restarter`, restarts from the averaged iterate.
"""
