"""The mask engine: which gradient coordinates are dropped, and masking them fast on every device.

The definition (:mod:`.definition`, the single source of truth): coordinate ``i`` of the parameter
named ``key`` is kept at step ``t`` under seed ``s`` and drop rate ``p`` iff

    hash32(salt(s, t, key, stream, i // 2**31) + i % 2**31)  <  round((1 - p) * 2**32) - 2**31

and kept values are multiplied by ``1 / (1 - p)``. The decision is a pure function of
``(s, t, key, i, p)``: not of the rank, the world size, bucket or shard layout, chunking, device,
or which backend computed it. No global RNG is touched.

Modules:

- :mod:`.definition`: the hash, salt and threshold; :class:`MaskStream`;
- :mod:`.pieces`: pieces and the int64 piece table the native kernels read;
- :mod:`.dispatch`: the entry points :func:`drop_`, :func:`drop_tensors_`, :func:`drop_segments_`;
- :mod:`.backends`: native kernels (checked bitwise on first use), torch.compile, eager;
- :mod:`.compaction`: :func:`pack_segments`, :func:`unpack_segments_`;
- :mod:`.segment_table`: :class:`SegmentTable`, a buffer's segments checked once (the DDP hook's buckets);
- :mod:`.grad_table`: the wrapper's cached table of a step's gradients;
- :mod:`.local`: the mask on the locally held part of a sharded tensor;
- :mod:`.kernels`: native C on CPU (source in ``dropgrad_dist/csrc``), the verified kernel cache,
  Triton on CUDA (imported when used).

See ``docs/mask_engine.md``.
"""

# Public names, then (as explicit re-exports) the names other modules and tests import from here.
from . import backends as _backends
from . import definition as _definition
from .backends import Backend, mask_backend, set_mask_backend
from .backends import _compile_failed as _compile_failed
from .backends import _native_kernel as _native_kernel
from .backends import _native_kernels_off as _native_kernels_off
from .backends import _self_check as _self_check
from .compaction import _check_packer as _check_packer
from .compaction import _kept_positions as _kept_positions
from .compaction import _pack_torch as _pack_torch
from .compaction import pack_segments, unpack_segments_
from .definition import KEEP_ALL as KEEP_ALL
from .definition import MaskStream, keep_probability, keep_threshold, key_hash, uniform_u32
from .definition import _salt as _salt
from .definition import _salts as _salts
from .dispatch import Segment, drop_, drop_pairs_, drop_segments_, drop_tensors_, keep_mask
from .kernels.cuda import CudaKernel as CudaKernel
from .kernels.cuda import cuda_kernel as cuda_kernel
from .kernels.native import PARALLEL_GRAIN as PARALLEL_GRAIN
from .kernels.native import CpuKernel as CpuKernel
from .kernels.native import cpu_kernel as cpu_kernel
from .pieces import TABLE_COLUMNS as TABLE_COLUMNS
from .segment_table import SegmentTable

_same_bits = _backends.same_bits
_HASH_MULTIPLIERS = _definition.HASH_MULTIPLIERS
_HASH_SHIFTS = _definition.HASH_SHIFTS

__all__ = [
    "Backend",
    "MaskStream",
    "Segment",
    "SegmentTable",
    "drop_",
    "drop_pairs_",
    "drop_segments_",
    "drop_tensors_",
    "keep_mask",
    "keep_probability",
    "keep_threshold",
    "key_hash",
    "mask_backend",
    "pack_segments",
    "set_mask_backend",
    "unpack_segments_",
    "uniform_u32",
]
