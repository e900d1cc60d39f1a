"""The mask kernels: native C on CPU, Triton on CUDA, and the verified cache of compiled kernels.

- :mod:`.native`: the C kernels (source in ``dropgrad_dist/csrc``), compiled on first use;
- :mod:`.cache`: where compiled kernels are kept and what is checked before one is loaded;
- :mod:`.cuda`, :mod:`.triton`: the CUDA host side and the Triton kernels (imported when used).

Every kernel computes the bits of :mod:`dropgrad_dist.mask.definition`; :mod:`..backends` checks
that bitwise on first use.
"""
