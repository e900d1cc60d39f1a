"""Hugging Face Transformers ``Trainer``: DropGrad, clipping, restarts and GNP/SAM inside Trainer's own loop.

``add_regularizers(trainer, dropgrad={...}, clipping={...}, restarts={...}, gnp={...})`` adds a
:class:`RegularizersCallback` that, when training begins (after Trainer has run
``accelerator.prepare``, so under FSDP2 the optimizer already holds the sharded parameters),
applies :func:`~dropgrad_dist.prepare_regularizers` to Trainer's accelerator, prepared model and
optimizer. The gradient each step is ``clip(m_t * g / (1 - p))``, as in every other layout, ``g``
being GNP/SAM's ``(1 - alpha) g1 + alpha grad L(theta + e)`` with ``gnp=``.

Trainer measures (and, with ``max_grad_norm > 0``, clips) the gradient every step through
``accelerator.clip_grad_norm_``. With ``clipping=`` our clipper is the only clipping: Trainer's call
then returns the norm our clipper sees (masked, unscaled, all shards) and clips nothing, so
``max_grad_norm`` (default 1.0) is ignored. Without ``clipping=``, Trainer clips masked gradients.

GNP/SAM runs both passes through Trainer's own ``training_step`` (a subclass's override
included): the first pass is Trainer's micro-batches as they come (the DDP hook suspended, or
``no_sync`` for the local perturbation); after the last micro-batch of an optimizer step the
parameters move to ``theta + e``, every micro-batch of the step runs again, ``theta`` is restored
and the combined gradient is what Trainer then clips, logs and steps on.

Checkpoints: each of Trainer's ``checkpoint-N/`` folders gets the regularizers' state (``on_save``:
``dropgrad_dist_state_0.json``, plus ``..._rank<r>.safetensors`` with restarts), and
``trainer.train(resume_from_checkpoint=...)`` restores it; a checkpoint without it is refused.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..core.agreement import all_ranks_ok
from ..core.checks import check_bool
from ..gnp.penalty import GradientNormPenalty
from .accelerate import Regularizers, prepare_regularizers
from .accelerate_checkpoints import prepare_on_all_ranks, state_stem, write_handle_files

__all__ = ["RegularizersCallback", "add_regularizers"]

logger = logging.getLogger(__name__)


class RegularizersCallback(TrainerCallback):
    """Applies the regularizers to ``trainer`` when its training begins; build it with :func:`add_regularizers`.

    A ``TrainerCallback`` receives Trainer's unwrapped model but neither the accelerator nor the
    DDP/FSDP-wrapped model that the DDP hook and the step chain need, so it holds ``trainer``.
    ``regularizers`` is the :class:`~dropgrad_dist.Regularizers` handle once training began.
    """

    def __init__(self, trainer: Trainer, *, dropgrad: Mapping[str, Any] | None = None,
                 clipping: Mapping[str, Any] | None = None, restarts: Mapping[str, Any] | None = None,
                 gnp: Mapping[str, Any] | None = None, strict: bool = True) -> None:
        if not isinstance(trainer, Trainer):
            raise TypeError(f"trainer must be a transformers.Trainer, got {type(trainer).__name__}")
        if dropgrad is None and clipping is None and restarts is None and gnp is None:
            raise ValueError("add_regularizers needs at least one of dropgrad=, clipping=, restarts=, gnp=")
        self.strict = check_bool(strict, "strict")
        self.trainer = trainer
        self.options = {"dropgrad": dropgrad, "clipping": clipping, "restarts": restarts, "gnp": gnp}
        self.regularizers: Regularizers | None = None
        self.resume_from: str | None = None  # the checkpoint folder trainer.train resumes from

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        if self.regularizers is not None:
            raise RuntimeError("add_regularizers applies to one trainer.train() call: Trainer prepares a new "
                               "optimizer each call; build a new Trainer and call add_regularizers on it")
        if state.global_step > 0 and self.resume_from is None:
            raise ValueError(f"Trainer resumed at step {state.global_step} without "
                             "trainer.train(resume_from_checkpoint=...), so the regularizers' state is unknown: "
                             "the masks would restart at step 0")
        regularizers = prepare_regularizers(trainer.accelerator, trainer.model_wrapped, trainer.optimizer,
                                            **self.options)
        regularizers.strict_load = self.strict
        if self.resume_from is not None:
            # Every rank validated its files before any applies (Trainer loaded the model and optimizer already).
            for apply in prepare_on_all_ranks([regularizers], self.resume_from):
                apply()
        self.regularizers = regularizers
        if regularizers.clipper is not None:
            if args.max_grad_norm and args.max_grad_norm > 0:
                logger.info("add_regularizers(clipping=...) clips; Trainer's max_grad_norm=%s is ignored",
                            args.max_grad_norm)
            trainer.accelerator.clip_grad_norm_ = self._measured_norm
        if regularizers.gnp is not None:
            trainer.training_step = _PenalizedTrainingStep(trainer, regularizers.gnp)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the regularizers' state into the ``checkpoint-N/`` folder Trainer has just written."""
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if args.should_save and not os.path.isdir(folder):
            raise RuntimeError(f"add_regularizers: Trainer's checkpoint folder {folder!r} does not exist (a "
                               "hyperparameter search's run folder?); the regularizers' state cannot be saved")
        os.makedirs(folder, exist_ok=True)  # a rank on another node without a shared folder: its restart sums
        write_handle_files(self.regularizers, folder, write_json=args.should_save)

    def _measured_norm(self, parameters: Any, max_norm: float, norm_type: float = 2, **kwargs: Any) -> torch.Tensor:
        """Trainer's ``clip_grad_norm_`` call under our clipping: the norm it sees, nothing clipped."""
        if norm_type != 2:
            raise ValueError(f"norm_type: add_regularizers measures the L2 norm, got {norm_type}")
        return torch.tensor(self.regularizers.gradient_norm())

    def metrics(self) -> dict[str, float]:
        """The regularizers' numbers (drop rate, kept fraction, bytes, pre/post-clip norm); empty before training."""
        return self.regularizers.metrics() if self.regularizers is not None else {}

    def check_resumable(self, checkpoint: str) -> None:
        """Refuse (``ValueError``, on every rank) a checkpoint folder without the regularizers' state,
        before Trainer loads anything from it."""
        path = os.path.join(checkpoint, f"{state_stem(0)}.json")
        found = os.path.isfile(path)
        if not all_ranks_ok(found):
            raise ValueError(
                f"resume_from_checkpoint={checkpoint!r} holds no regularizer state ({path!r} "
                f"{'exists here but not on another rank' if found else 'is missing'}): it was saved without "
                "add_regularizers, or the run stopped between Trainer's files and ours. Resuming would restart "
                "the masks, the clipping history and the GNP schedule at step 0; resume from a checkpoint "
                "saved with add_regularizers (the previous checkpoint-N) or train from the start")


class _PenalizedTrainingStep:
    """Trainer's ``training_step`` running both GNP/SAM passes: each micro-batch's first pass as Trainer
    calls it; after the last one of an optimizer step, the second pass over all of them at ``theta + e``."""

    def __init__(self, trainer: Trainer, penalty: GradientNormPenalty) -> None:
        self.trainer = trainer
        self.penalty = penalty
        self.training_step = trainer.training_step  # bound: a subclass's override runs in both passes
        self.open = False  # from the first micro-batch of an optimizer step to its last

    def __call__(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        accelerator = self.trainer.accelerator
        try:
            if not self.open:
                self.penalty.begin_passes()
                self.open = True
            self.penalty.record_micro_batch((model, inputs, num_items_in_batch))
            with self.penalty.first_pass_context():
                # A copy: compute_loss may pop the labels from the dict it is given.
                loss = self.training_step(model, copy.copy(inputs), num_items_in_batch)
            if accelerator.sync_gradients:  # the last micro-batch of this optimizer step
                self.open = False
                self._second_pass()
        except BaseException:
            self.open = False
            raise
        return loss

    def _second_pass(self) -> None:
        """Every micro-batch again, synchronized as Trainer's loop synchronizes them (only the last, unless
        ``sync_each_batch``); the losses are the perturbed point's, not logged."""
        accelerator = self.trainer.accelerator
        sync_each = accelerator.gradient_state.plugin_kwargs.get("sync_each_batch", False)

        def micro_batch(recorded: tuple[Any, Any, Any], last: bool) -> None:
            model, inputs, num_items_in_batch = recorded
            # Trainer sets sync_gradients itself per micro-batch (it prefetches them): mirror it.
            accelerator.gradient_state._set_sync_gradients(last)
            with contextlib.nullcontext() if last or sync_each else accelerator.no_sync(model):
                self.training_step(model, copy.copy(inputs), num_items_in_batch)

        try:
            self.penalty.finish_passes(micro_batch=micro_batch, scaler=accelerator.scaler)
        finally:
            accelerator.gradient_state._set_sync_gradients(True)


def add_regularizers(trainer: Trainer, *, dropgrad: Mapping[str, Any] | None = None,
                     clipping: Mapping[str, Any] | None = None, restarts: Mapping[str, Any] | None = None,
                     gnp: Mapping[str, Any] | None = None, strict: bool = True) -> RegularizersCallback:
    """Apply DropGrad / clipping / restarts / GNP-SAM to ``trainer``'s training; returns the added callback.

    Math: ``g <- clip(m_t * g / (1 - p))`` before each optimizer step, with ``gnp``
    ``g = (1 - alpha) g1 + alpha grad L(theta + r g1 / ||g1||)`` over the step's accumulated
    micro-batches (SAM: ``alpha=1, r=rho``). Options as for
    :func:`~dropgrad_dist.prepare_regularizers`. Training logs (``trainer.state.log_history`` and
    every ``report_to`` integration) gain the regularizers' metrics; Trainer's own ``grad_norm``
    is the masked pre-clip norm. Trainer's checkpoints hold the regularizers' state, and
    ``trainer.train(resume_from_checkpoint=...)`` restores it; ``strict=False`` resumes with a
    changed regularizer configuration (the progress loads, this run's configuration stays, a warning).
    """
    callback = RegularizersCallback(trainer, dropgrad=dropgrad, clipping=clipping, restarts=restarts, gnp=gnp,
                                    strict=strict)
    trainer.add_callback(callback)
    log, train = trainer.log, trainer.train

    # Trainer appends logs to log_history before calling on_log, and report_to callbacks run
    # before this one: adding the metrics to the logs Trainer.log receives reaches all of them.
    def log_with_metrics(logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            for key, value in callback.metrics().items():
                logs.setdefault(key, value)
        log(logs, *args, **kwargs)

    # A callback never learns which folder train() resumes from: note it (Trainer's rule for True),
    # and refuse a folder without our state before Trainer loads anything from it.
    def train_resuming_regularizers(resume_from_checkpoint: str | bool | None = None, *args: Any,
                                    **kwargs: Any) -> Any:
        folder = resume_from_checkpoint
        if folder is True:
            folder = get_last_checkpoint(trainer.args.output_dir)  # None: Trainer raises its own error
        if isinstance(folder, (str, os.PathLike)) and os.path.isdir(folder):  # else Trainer raises its own error
            callback.check_resumable(os.fspath(folder))
            callback.resume_from = os.fspath(folder)
        return train(resume_from_checkpoint, *args, **kwargs)

    trainer.log = log_with_metrics
    trainer.train = train_resuming_regularizers
    return callback
