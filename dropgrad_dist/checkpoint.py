"""Checkpoints of regularizer state: plain data, one rule, validated before anything changes.

The rule, the same for every regularizer:

- a state dict holds plain data only (ints, floats, strings, bools, None, lists, dicts; tensors
  only where a regularizer keeps per-parameter buffers, saved as safetensors);
- the checkpoint restores **progress** (step counts, schedule positions, histories, counters);
  the constructor gives **configuration** (seed, rates, schedule, method, mode). A checkpoint
  whose configuration differs from the object's raises ``ValueError`` naming the fields, unless
  loaded with ``strict=False``, which keeps the constructor's configuration, loads the progress
  and warns;
- loading validates every field first and changes nothing on error.

On disk (Accelerate's ``save_state``) the state is JSON: nothing in it can execute code.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

__all__ = ["FORMAT", "check_config", "plain", "read_field", "read_json", "read_tensors", "write_json", "write_tensors"]

FORMAT = 1  # version of the state-dict layout
T = TypeVar("T")


def plain(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples become lists); raises for anything else."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"state holds a non-finite float {value!r}; it cannot be stored as plain data")
        return value
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, Mapping):
        if not all(isinstance(key, str) for key in value):
            raise ValueError(f"state holds a dict with non-string keys {list(value)[:3]}; not plain data")
        return {key: plain(item) for key, item in value.items()}
    raise ValueError(f"state holds a {type(value).__name__}, which is not plain data")


def read_field(state: Mapping[str, Any], name: str, check: Callable[[object, str], T], owner: str) -> T:
    """``check(state[name])``, with errors naming ``owner`` and the field."""
    if not isinstance(state, Mapping):
        raise ValueError(f"{owner} checkpoint must be a dict, got {type(state).__name__}")
    if name not in state:
        raise ValueError(f"{owner} checkpoint has no {name!r} field (fields: {sorted(state)})")
    return check(state[name], f"{owner} checkpoint field {name!r}")


def check_config(owner: str, saved: Mapping[str, Any], current: Mapping[str, Any], strict: bool) -> None:
    """Compare the checkpoint's configuration with the object's (only fields the checkpoint has).

    Raises ``ValueError`` naming every differing field when ``strict``; warns otherwise.
    """
    if not isinstance(saved, Mapping):
        raise ValueError(f"{owner} checkpoint field 'config' must be a dict, got {type(saved).__name__}")
    current = plain(current)
    differing = [f"{name}: checkpoint {saved[name]!r}, this run {current[name]!r}"
                 for name in current if name in saved and plain(saved[name]) != current[name]]
    if not differing:
        return
    detail = "; ".join(differing)
    if strict:
        raise ValueError(f"{owner}: the checkpoint was saved with a different configuration ({detail}). "
                         "Build it with the checkpoint's arguments, or load with strict=False to keep this "
                         "run's configuration and take only the checkpoint's progress (step counts, schedule)")
    warnings.warn(f"{owner}: loading progress from a checkpoint with a different configuration ({detail}); "
                  "keeping this run's configuration (strict=False)", RuntimeWarning, stacklevel=3)


def write_json(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Write ``state`` (plain data) as JSON, atomically (a partial file never replaces a good one)."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(plain(state), indent=1, allow_nan=False))
    os.replace(temporary, path)


def read_json(path: str | os.PathLike, owner: str) -> dict[str, Any]:
    """Read a JSON object written by :func:`write_json`; a file that is not one raises ``ValueError``."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
        state = json.loads(text)
    except FileNotFoundError:
        raise FileNotFoundError(f"{owner}: no checkpoint file {str(path)!r}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{owner}: {str(path)!r} is not a JSON checkpoint ({type(err).__name__}: {err}); "
                         "refusing to load it") from None
    if not isinstance(state, dict):
        raise ValueError(f"{owner}: {str(path)!r} holds a JSON {type(state).__name__}, expected an object")
    return state


def write_tensors(path: str | os.PathLike, tensors: Mapping[str, Any]) -> None:
    """Write named tensors as safetensors (a format that holds only data), atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    save_file({name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}, str(temporary))
    os.replace(temporary, path)


def read_tensors(path: str | os.PathLike, owner: str) -> dict[str, Any]:
    """Read named tensors written by :func:`write_tensors`; any other file raises ``ValueError``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"{owner}: no checkpoint file {str(path)!r}")
    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, OSError) as err:
        raise ValueError(f"{owner}: {str(path)!r} is not a safetensors checkpoint ({err}); refusing to load it") from None
