"""Argument checks shared by the mask engine's entry points (messages name the argument)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..core.checks import SEED_LIMIT, check_count, check_int_in, check_rate, check_seed
from .definition import _key_hash


def check_common(seed: int, step: int, extra_scale: float) -> None:
    check_seed(seed)
    check_count(step, "step")
    if isinstance(extra_scale, bool) or not isinstance(extra_scale, (int, float)) or not math.isfinite(extra_scale):
        raise ValueError(f"extra_scale must be a finite number, got {extra_scale!r}")


def check_args(seed: int, step: int, rate: float, start: int, extra_scale: float = 1.0) -> float:
    """The checked rate of one masking call (the other arguments are checked and kept as given)."""
    # The common, valid call is decided by one expression; anything else gets the detailed checks.
    if (type(seed) is int and type(step) is int and type(start) is int and type(rate) is float
            and type(extra_scale) is float and 0 <= seed < SEED_LIMIT and 0 <= step < SEED_LIMIT
            and start >= 0 and 0.0 <= rate <= 1.0 and math.isfinite(extra_scale)):
        return rate
    check_common(seed, step, extra_scale)
    check_int_in(start, "start", 0)
    return check_rate(rate, "rate")


def check_tensor(tensor: torch.Tensor, name: str = "tensor") -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise ValueError(f"{name} must be dense (strided), got layout {tensor.layout}; DropGrad does not "
                         "support sparse gradients (use a dense embedding, sparse=False)")
    if not (tensor.is_floating_point() or tensor.is_complex()):
        raise ValueError(f"{name} must be floating point or complex, got {tensor.dtype}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous (mask a contiguous view of the gradient)")


def check_key(key: object, name: str) -> int:
    """The key's 64-bit hash, after checking it is a str."""
    if not isinstance(key, str):
        raise TypeError(f"{name} must be a str (a canonical parameter name), got {type(key).__name__}")
    return _key_hash(key)


def check_mask_out(mask_out: torch.Tensor | None, tensor: torch.Tensor, of: str) -> torch.Tensor | None:
    """``mask_out`` as a flat uint8 view (the kernels store bytes), after checking it fits ``tensor``."""
    if mask_out is None:
        return None
    if (not isinstance(mask_out, torch.Tensor) or mask_out.dtype != torch.bool
            or mask_out.numel() != tensor.numel()):
        raise ValueError(f"mask_out must be a bool tensor with as many elements as {of}")
    if not mask_out.is_contiguous() or mask_out.device != tensor.device:
        raise ValueError(f"mask_out must be contiguous and on the device of {of} ({tensor.device})")
    return mask_out.view(-1).view(torch.uint8)


def check_sequence(values: object, count: int, name: str) -> list:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a sequence with one entry per tensor, got {type(values).__name__}")
    if len(values) != count:
        raise ValueError(f"{name} must have one entry per tensor ({count}), got {len(values)}")
    return list(values)


def check_rates(rates: object, count: int) -> list[float]:
    """One checked rate per tensor, from one number or a sequence of them."""
    if isinstance(rates, (int, float)) and not isinstance(rates, bool):
        return [check_rate(rates, "rates")] * count
    rate_list = check_sequence(rates, count, "rates")
    if not all(type(rate) is float and 0.0 <= rate <= 1.0 for rate in rate_list):
        rate_list = [check_rate(rate, f"rates[{k}]") for k, rate in enumerate(rate_list)]
    return rate_list


def check_segment(segment: object, k: int) -> tuple[int, int, int, float]:
    """``(numel, key hash, start, rate)`` of ``segments[k]``; an unmasked segment is rate 0 (all kept)."""
    if not isinstance(segment, tuple) or len(segment) != 4:
        raise ValueError(f"segments[{k}] must be a (numel, key, start, rate) tuple, got {segment!r}")
    numel, key, start, rate = segment
    if type(numel) is not int or numel < 0:
        check_int_in(numel, f"segments[{k}].numel", 0)
    if type(start) is not int or start < 0:
        check_int_in(start, f"segments[{k}].start", 0)
    if rate is None:
        return numel, 0, start, 0.0
    if type(rate) is not float or not 0.0 <= rate <= 1.0:
        rate = check_rate(rate, f"segments[{k}].rate")
    return numel, check_key(key, f"segments[{k}].key"), start, rate
