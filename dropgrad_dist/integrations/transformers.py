"""Hugging Face Transformers ``Trainer``: DropGrad, clipping and restarts inside Trainer's own loop.

``add_regularizers(trainer, dropgrad={...}, clipping={...}, restarts={...})`` adds a
:class:`RegularizersCallback` that, when training begins (after Trainer has run
``accelerator.prepare``, so under FSDP2 the optimizer already holds the sharded parameters),
applies :func:`~dropgrad_dist.prepare_regularizers` to Trainer's accelerator, prepared model and
optimizer. The gradient each step is ``clip(m_t * g / (1 - p))``, as in every other layout.

Trainer measures (and, with ``max_grad_norm > 0``, clips) the gradient every step through
``accelerator.clip_grad_norm_``. With ``clipping=`` our clipper is the only clipping: Trainer's call
then returns the norm our clipper sees (masked, unscaled, all shards) and clips nothing, so
``max_grad_norm`` (default 1.0) is ignored. Without ``clipping=``, Trainer clips masked gradients.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from .accelerate import Regularizers, prepare_regularizers

__all__ = ["RegularizersCallback", "add_regularizers"]

logger = logging.getLogger(__name__)


class RegularizersCallback(TrainerCallback):
    """Applies the regularizers to ``trainer`` when its training begins; build it with :func:`add_regularizers`.

    A ``TrainerCallback`` receives Trainer's unwrapped model but neither the accelerator nor the
    DDP/FSDP-wrapped model that the DDP hook and the step chain need, so it holds ``trainer``.
    ``regularizers`` is the :class:`~dropgrad_dist.Regularizers` handle once training began.
    """

    def __init__(self, trainer: Trainer, *, dropgrad: Mapping[str, Any] | None = None,
                 clipping: Mapping[str, Any] | None = None, restarts: Mapping[str, Any] | None = None) -> None:
        if not isinstance(trainer, Trainer):
            raise TypeError(f"trainer must be a transformers.Trainer, got {type(trainer).__name__}")
        if dropgrad is None and clipping is None and restarts is None:
            raise ValueError("add_regularizers needs at least one of dropgrad=, clipping=, restarts=")
        self.trainer = trainer
        self.options = {"dropgrad": dropgrad, "clipping": clipping, "restarts": restarts}
        self.regularizers: Regularizers | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        if self.regularizers is not None:
            raise RuntimeError("add_regularizers applies to one trainer.train() call: Trainer prepares a new "
                               "optimizer each call; build a new Trainer and call add_regularizers on it")
        if state.global_step > 0:
            # Trainer's checkpoints do not carry the masks' step or the clipper's history.
            raise ValueError("resuming a Trainer checkpoint with add_regularizers is not supported: the masks "
                             "would restart at step 0; train from the start or use prepare_regularizers with "
                             "accelerator.save_state/load_state")
        self.regularizers = prepare_regularizers(trainer.accelerator, trainer.model_wrapped, trainer.optimizer,
                                                 **self.options)
        if self.regularizers.clipper is not None:
            if args.max_grad_norm and args.max_grad_norm > 0:
                logger.info("add_regularizers(clipping=...) clips; Trainer's max_grad_norm=%s is ignored",
                            args.max_grad_norm)
            trainer.accelerator.clip_grad_norm_ = self._measured_norm

    def _measured_norm(self, parameters: Any, max_norm: float, norm_type: float = 2, **kwargs: Any) -> torch.Tensor:
        """Trainer's ``clip_grad_norm_`` call under our clipping: the norm it sees, nothing clipped."""
        if norm_type != 2:
            raise ValueError(f"norm_type: add_regularizers measures the L2 norm, got {norm_type}")
        return torch.tensor(self.regularizers.gradient_norm())

    def metrics(self) -> dict[str, float]:
        """The regularizers' numbers (drop rate, kept fraction, bytes, pre/post-clip norm); empty before training."""
        return self.regularizers.metrics() if self.regularizers is not None else {}


def add_regularizers(trainer: Trainer, *, dropgrad: Mapping[str, Any] | None = None,
                     clipping: Mapping[str, Any] | None = None,
                     restarts: Mapping[str, Any] | None = None) -> RegularizersCallback:
    """Apply DropGrad / clipping / restarts to ``trainer``'s training; returns the added callback.

    Math: ``g <- clip(m_t * g / (1 - p))`` before each optimizer step. Options as for
    :func:`~dropgrad_dist.prepare_regularizers`. Training logs (``trainer.state.log_history`` and
    every ``report_to`` integration) gain the regularizers' metrics; Trainer's own ``grad_norm``
    is the masked pre-clip norm. Gradient norm penalty / SAM needs two gradient passes per step,
    which Trainer's loop does not run: use ``prepare_regularizers(gnp=...)`` in an Accelerate loop.
    """
    callback = RegularizersCallback(trainer, dropgrad=dropgrad, clipping=clipping, restarts=restarts)
    trainer.add_callback(callback)
    log = trainer.log

    # Trainer appends logs to log_history before calling on_log, and report_to callbacks run
    # before this one: adding the metrics to the logs Trainer.log receives reaches all of them.
    def log_with_metrics(logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            for key, value in callback.metrics().items():
                logs.setdefault(key, value)
        log(logs, *args, **kwargs)

    trainer.log = log_with_metrics
    return callback
