"""The gradient norm penalty and SAM/ASAM as its special case (two passes per step).

- :mod:`.penalty`: :class:`GradientNormPenalty`;
- :mod:`.sam`: :class:`SAM` (our form and davda54/sam's);
- :mod:`.perturbation`: ``theta + e``, its restore, and mixing the two gradients;
- :mod:`.schedule`: the warmups and the periodic two-pass draw;
- :mod:`.second_pass`: what the second pass must leave as the first left it (RNG, BatchNorm statistics).
"""
