"""The regularizers' state in ``accelerator.save_state``/``load_state``, all or nothing, validated on every rank first.

:func:`attach_to_checkpoints` writes a handle's state (JSON, per-rank safetensors for restart sums)
through Accelerate's save hooks; Hugging Face Trainer's checkpoints get the same files
(:mod:`dropgrad_dist.integrations.transformers`).

Accelerate loads an FSDP model and optimizer before it runs its load pre-hooks, so a regularizer
file refused in a hook would leave the optimizer state half replaced. The wrapper installed here
reads and validates every handle's files, agrees across ranks in one small all-reduce, lets
Accelerate load, and applies the regularizers' state last.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

from ..core import checkpoint as _checkpoint
from ..core.agreement import all_ranks_ok

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["attach_to_checkpoints", "make_load_state_all_or_nothing", "prepare_on_all_ranks",
           "state_stem", "write_handle_files"]


def _checkpoint_dir(accelerator: Accelerator, input_dir: str | None) -> str | None:
    """The folder ``accelerator.load_state(input_dir)`` will read (Accelerate's rule); None if it would refuse."""
    if input_dir is not None:
        input_dir = os.path.expanduser(input_dir)
        return input_dir if os.path.isdir(input_dir) else None
    if not accelerator.project_configuration.automatic_checkpoint_naming:
        return None
    root = os.path.join(accelerator.project_dir, "checkpoints")
    try:
        names = os.listdir(root)
    except OSError:
        return None
    numbered = [(int(digits[0]), os.path.join(root, name)) for name in names
                if (digits := re.findall(r"[0-9]+", name))]
    return max(numbered)[1] if numbered else None


def state_stem(index: int) -> str:
    """The file stem of an accelerator's ``index``-th handle: ``dropgrad_dist_state_<index>``."""
    return f"dropgrad_dist_state_{index}"


def write_handle_files(handle: Any, output_dir: str, write_json: bool) -> None:
    """Write ``handle``'s files into ``output_dir``: its JSON state (where ``write_json``: one process per
    shared folder) and this rank's restart sums. Each file atomically (``core.checkpoint``)."""
    if write_json:
        _checkpoint.write_json(os.path.join(output_dir, f"{handle._stem}.json"), handle.state_dict())
    if handle.restarter is not None:
        _checkpoint.write_tensors(os.path.join(output_dir, f"{handle._stem}_rank{handle._rank}.safetensors"),
                                  handle.restart_sums())


def prepare_on_all_ranks(handles: list[Any], directory: str) -> list[Any]:
    """Read and validate every handle's files in ``directory`` on every rank, then agree (one all-reduce).

    Returns what applies them; if any rank refused its files, every rank raises and nothing is applied.
    """
    applies, error = [], None
    try:
        applies = [handle.prepare_checkpoint(directory) for handle in handles]
    except Exception as err:  # noqa: BLE001 - every rank must reach the agreement below, then it re-raises
        error = err
    all_ok = all_ranks_ok(error is None)
    if error is not None:
        raise error
    if not all_ok:
        raise ValueError(f"dropgrad_dist: another rank refused its regularizer checkpoint files in "
                         f"{directory!r} (see that rank's error); nothing was loaded")
    return applies


def make_load_state_all_or_nothing(accelerator: Accelerator) -> None:
    """Make ``accelerator.load_state`` validate the regularizers' files before Accelerate loads anything.

    Accelerate loads an FSDP model and optimizer before it runs the load pre-hooks, so a file
    refused in a hook would leave the AdamW moments replaced. Instead every rank reads and
    validates every handle's files first, the ranks agree that all succeeded (else every rank
    raises and nothing is loaded), Accelerate loads its part, and only then the regularizers'
    state is applied. In every distributed type: DDP's hooks run before the optimizer loads, but
    a rank whose own restart sums are bad must stop the other ranks too.
    """
    if "_dropgrad_dist_load_state" in accelerator.__dict__:
        return
    original = accelerator.load_state
    accelerator.__dict__["_dropgrad_dist_load_state"] = original

    def load_state(input_dir: str | None = None, load_kwargs: dict | None = None, **load_model_func_kwargs: Any) -> Any:
        directory = _checkpoint_dir(accelerator, input_dir)
        # Without a folder Accelerate raises its own error (every rank alike: the same rule decides).
        applies = prepare_on_all_ranks(accelerator._dropgrad_dist_handles, directory) if directory is not None else []
        accelerator.__dict__["_dropgrad_dist_loading"] = True
        try:
            result = original(input_dir, load_kwargs, **load_model_func_kwargs)
        finally:
            accelerator.__dict__["_dropgrad_dist_loading"] = False
        for apply in applies:
            apply()
        return result

    accelerator.load_state = load_state


def attach_to_checkpoints(accelerator: Accelerator, handle: Any) -> None:
    """Save and load ``handle``'s state (a ``Regularizers``) with ``accelerator.save_state``/``load_state``.

    Files: ``dropgrad_dist_state_<i>.json`` (``handle.state_dict()``, written by the main process) and
    ``..._rank<r>.safetensors`` (each rank's restart sums), ``i`` counting the handles of ``accelerator``.
    """
    handles = accelerator.__dict__.setdefault("_dropgrad_dist_handles", [])
    handle._stem = state_stem(len(handles))
    handles.append(handle)
    handle._rank = accelerator.process_index

    def save(models: Any, weights: Any, output_dir: str) -> None:
        os.makedirs(output_dir, exist_ok=True)
        write_handle_files(handle, output_dir, accelerator.is_main_process or (
            accelerator.is_local_main_process and accelerator.project_configuration.save_on_each_node))

    def load(models: Any, input_dir: str) -> None:
        if not accelerator.__dict__.get("_dropgrad_dist_loading"):  # load_state's wrapper applies it
            handle.prepare_checkpoint(input_dir)()

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)
    make_load_state_all_or_nothing(accelerator)
