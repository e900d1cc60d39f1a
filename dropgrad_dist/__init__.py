"""dropgrad-dist: DropGrad (and later other gradient regularizers) for distributed PyTorch.

Whether a gradient coordinate is dropped depends only on (seed, step, parameter name,
coordinate index, rate), never on rank, world size, bucket layout, shard boundaries or device.
"""

from .ddp_hook import DropGradHookState, dropgrad_hook, dropgrad_wrapper
from .integration import DropGradHandle, enable_fsdp_on_cpu, prepare_dropgrad
from .mask import MaskStream, drop_, keep_mask, keep_probability, keep_threshold, mask_backend, set_mask_backend
from .optim import DropGrad
from .params import canonical_name
from .schedules import (
    CosineAnnealingDropRateScheduler,
    DropRateScheduler,
    LinearDropRateScheduler,
    StepDropRateScheduler,
)

__version__ = "0.1.0"

__all__ = [
    "CosineAnnealingDropRateScheduler",
    "DropGrad",
    "DropGradHandle",
    "DropGradHookState",
    "DropRateScheduler",
    "LinearDropRateScheduler",
    "MaskStream",
    "StepDropRateScheduler",
    "canonical_name",
    "drop_",
    "dropgrad_hook",
    "dropgrad_wrapper",
    "enable_fsdp_on_cpu",
    "keep_mask",
    "keep_probability",
    "keep_threshold",
    "mask_backend",
    "prepare_dropgrad",
    "set_mask_backend",
]
