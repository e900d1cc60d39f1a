"""torch-clip's API on dropgrad-dist: its README's code runs with only the import lines changed.

``from torch_clip.optimizers import ClippedSGD``, ``from torch_clip.restarter import Restarter``
and ``from torch_clip.optimizers_collector import OptimizerProperties, ModelProperties,
RestartProperties`` all become ``from dropgrad_dist.compat.torch_clip import ...``.

The restart schedule is torch-clip's: with ``first_restart_steps_cnt = n_0``, a restart averages
``n_k + 1`` iterates (it comes once more than ``n_k`` steps have passed), then
``n_{k+1} = floor(n_k * restart_coeff)``; none once ``n_k + 1 >= max_steps_cnt``. For
``(10, 1.5, 100)`` that is steps 11, 27, 50, 84, 134, 208. The restart point is the exact mean of
those iterates (torch-clip divides their sum by the number of parameter tensors instead).
:class:`dropgrad_dist.Restarter` reads the same names as "restart every ``n_k`` steps" with an
unrounded period: steps 10, 25, 48, 82, 133, 209.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..clipping.clipper import ClippedSGD
from ..clipping.restarts import Restarter as _Restarter

__all__ = ["ClippedSGD", "ModelProperties", "OptimizerProperties", "RestartProperties", "Restarter"]


class OptimizerProperties:
    """An optimizer class and its keyword arguments: ``optimizer_class(params, **optimizer_kwargs)``."""

    def __init__(self, optimizer_class: Callable[..., torch.optim.Optimizer], **kwargs: Any) -> None:
        if not callable(optimizer_class):
            raise TypeError(f"optimizer_class must be a callable that builds an optimizer, "
                            f"got {type(optimizer_class).__name__}")
        self.optimizer_class = optimizer_class
        self.optimizer_kwargs = kwargs

    def __repr__(self) -> str:
        return f"OptimizerProperties({getattr(self.optimizer_class, '__name__', self.optimizer_class)}, " \
               f"**{self.optimizer_kwargs})"


class ModelProperties:
    """A model class and its keyword arguments; ``get_model()`` builds ``model_class(**model_kwargs)``."""

    def __init__(self, model_class: Callable[..., nn.Module], **kwargs: Any) -> None:
        if not callable(model_class):
            raise TypeError(f"model_class must be a callable that builds a model, got {type(model_class).__name__}")
        self.model = model_class
        self.model_kwargs = kwargs

    def get_model(self) -> nn.Module:
        """A new model: ``model_class(**model_kwargs)``."""
        return self.model(**self.model_kwargs)


class RestartProperties:
    """A restarter class and its schedule; ``get_kwargs()`` gives the schedule as keyword arguments."""

    def __init__(self, restart_class: type, first_restart_steps_cnt: int = 100, restart_coeff: float = 1.5,
                 max_steps_cnt: int = 5000) -> None:
        self.restart_class = restart_class
        self.first_restart_steps_cnt = first_restart_steps_cnt
        self.restart_coeff = restart_coeff
        self.max_steps_cnt = max_steps_cnt

    def get_kwargs(self) -> dict[str, Any]:
        """``{"first_restart_steps_cnt", "restart_coeff", "max_steps_cnt"}``."""
        return {"first_restart_steps_cnt": self.first_restart_steps_cnt, "restart_coeff": self.restart_coeff,
                "max_steps_cnt": self.max_steps_cnt}


class Restarter(_Restarter):
    """torch-clip's ``Restarter``: its arguments and schedule, :class:`dropgrad_dist.Restarter`'s restart.

    Math: a restart sets ``theta <- (1 / (n_k + 1)) * sum theta_j`` over the iterates since the last
    one, once ``n_k + 1`` were added, then ``n_{k+1} = floor(n_k * restart_coeff)``; restarts stop
    once ``n_k + 1 >= max_steps_cnt``.

    Use as in torch-clip: ``restarter.add_coords(model.parameters())`` then
    ``optimizer = restarter.make_restart(model, optimizer)`` after each step. ``make_restart``
    returns the same optimizer with its state (momentum buffers) cleared, where torch-clip builds
    a new one from ``optimizer_properties``: learning-rate schedulers stay attached, and code that
    drops the returned value still restarts its momentum. The iterates' sums are kept shard-local
    (no CPU copies of every iterate) and checkpoint with ``state_dict(model)``.
    """

    def __init__(self, optimizer_properties: OptimizerProperties, first_restart_steps_cnt: int = 100,
                 restart_coeff: float = 1.5, max_steps_cnt: int = 5000, *,
                 process_group: dist.ProcessGroup | None = None) -> None:
        if not isinstance(optimizer_properties, OptimizerProperties):
            raise TypeError(f"optimizer_properties must be an OptimizerProperties, "
                            f"got {type(optimizer_properties).__name__}")
        super().__init__(first_restart_steps_cnt, restart_coeff, max_steps_cnt, process_group=process_group)
        self.optimizer_properties = optimizer_properties
        self.optimizer_class = optimizer_properties.optimizer_class
        self.optimizer_kwargs = optimizer_properties.optimizer_kwargs

    @property
    def active(self) -> bool:
        """Whether restarts still happen: the next one, at ``n_k + 1`` iterates, is below ``max_steps_cnt``."""
        return self.period + 1 < self.max_steps

    def due(self) -> bool:
        """More than ``n_k`` iterates since the last restart."""
        return self.count > self.period

    def next_period(self) -> float:
        """``floor(n_k * restart_coeff)``."""
        return float(int(self.period * self.restart_coeff))

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "schedule": "torch_clip"}
