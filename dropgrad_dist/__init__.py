"""dropgrad-dist: DropGrad and other gradient regularizers (clipping, GNP/SAM) for distributed PyTorch.

Whether a gradient coordinate is dropped depends only on (seed, step, parameter name,
coordinate index, rate), never on rank, world size, bucket layout, shard boundaries or device.
"""

from .clipping.clipper import CLIPPING_METHODS, ClippedOptimizer, ClippedSGD, GradientClipper
from .clipping.restarts import Restarter, RestartingOptimizer
from .core.agreement import RankDisagreement
from .ddp.compose import compressed_hook, dropgrad_wrapper
from .ddp.hook import DropGradHookState, dropgrad_hook
from .dropgrad.optimizer import DropGrad
from .dropgrad.schedules import (
    CosineAnnealingDropRateScheduler,
    DropRateScheduler,
    LinearDropRateScheduler,
    StepDropRateScheduler,
)
from .gnp.penalty import GradientNormPenalty
from .gnp.sam import SAM
from .integrations.accelerate import (
    DropGradHandle,
    Regularizers,
    check_launch,
    enable_fsdp_on_cpu,
    prepare_dropgrad,
    prepare_regularizers,
)
from .layout.names import canonical_name
from .mask import (
    MaskStream,
    Segment,
    drop_,
    drop_segments_,
    drop_tensors_,
    keep_mask,
    keep_probability,
    keep_threshold,
    mask_backend,
    pack_segments,
    set_mask_backend,
    unpack_segments_,
)

__version__ = "0.1.0"

__all__ = [
    "CLIPPING_METHODS",
    "ClippedOptimizer",
    "ClippedSGD",
    "CosineAnnealingDropRateScheduler",
    "DropGrad",
    "DropGradHandle",
    "DropGradHookState",
    "DropRateScheduler",
    "GradientClipper",
    "GradientNormPenalty",
    "LinearDropRateScheduler",
    "MaskStream",
    "RankDisagreement",
    "Regularizers",
    "Restarter",
    "RestartingOptimizer",
    "SAM",
    "Segment",
    "StepDropRateScheduler",
    "canonical_name",
    "check_launch",
    "drop_",
    "drop_segments_",
    "drop_tensors_",
    "dropgrad_hook",
    "compressed_hook",
    "dropgrad_wrapper",
    "enable_fsdp_on_cpu",
    "keep_mask",
    "keep_probability",
    "keep_threshold",
    "mask_backend",
    "pack_segments",
    "prepare_dropgrad",
    "prepare_regularizers",
    "set_mask_backend",
    "unpack_segments_",
]
