"""When a GNP/SAM step takes two passes, and with which coefficients: the warmups and the periodic draw.

Over ``warmup_steps`` optimizer steps ``t``: ``"lambda"`` ramps ``alpha_t = alpha min(1, t / warmup_steps)``,
``"r"`` ramps ``r_t = r min(1, t / warmup_steps)``, ``"zero"`` keeps ``alpha_t = 0`` while
``t < warmup_steps``; ``"none"`` (or ``warmup_steps = 0``) no ramp. The two-pass step runs on the steps
with ``t % every == 0`` and ``u(seed, t) < probability``: ``u`` is a draw of ``(seed, t)`` alone from
the mask definition's hash, identical on every rank, never the global RNG.
"""

from __future__ import annotations

from .. import mask as _mask

__all__ = ["WARMUPS", "coefficients", "periodic_step", "radius_scale"]

WARMUPS = ("none", "lambda", "r", "zero")
_PERIODIC_KEY = _mask.key_hash("gradient_norm_penalty.every")  # its own stream of per-step draws


def _ramp(t: int, warmup_steps: int) -> float:
    return min(1.0, t / warmup_steps) if warmup_steps else 1.0


def coefficients(alpha: float, r: float, warmup: str, warmup_steps: int, t: int) -> tuple[float, float]:
    """``(alpha_t, r_t)`` at step ``t`` under ``warmup`` (one of :data:`WARMUPS`)."""
    if warmup == "lambda":
        return alpha * _ramp(t, warmup_steps), r
    if warmup == "r":
        return alpha, r * _ramp(t, warmup_steps)
    if warmup == "zero":
        return (0.0 if t < warmup_steps else alpha), r
    return alpha, r


def radius_scale(warmup: str, warmup_steps: int, t: int) -> float:
    """The factor of every group's radius at step ``t``: ``min(1, t / warmup_steps)`` under the ``"r"`` warmup."""
    return _ramp(t, warmup_steps) if warmup == "r" else 1.0


def periodic_step(seed: int, every: int, probability: float, t: int) -> bool:
    """Whether step ``t`` is chosen for two passes: ``t % every == 0`` and ``u(seed, t) < probability``."""
    if t % every:
        return False
    if probability == 1.0:
        return True
    draw = _mask.uniform_u32(seed, t, _mask.MaskStream.SKIP, key=_PERIODIC_KEY)
    return draw < _mask.keep_threshold(1.0 - probability)
