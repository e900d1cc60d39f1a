"""Checkpoints of regularizer state: plain data, one rule, validated before anything changes.

The rule, the same for every regularizer:

- a state dict holds plain data only (ints, floats, strings, bools, None, lists, dicts; tensors
  only where a regularizer keeps per-parameter buffers, saved as safetensors);
- the checkpoint restores **progress** (step counts, schedule positions, histories, counters);
  the constructor gives **configuration** (seed, rates, schedule, method, mode). A checkpoint
  whose configuration differs from the object's raises ``ValueError`` naming the fields, unless
  loaded with ``strict=False``, which keeps the constructor's configuration, loads the progress
  and warns;
- loading validates every field first and changes nothing on error; a checkpoint without
  its configuration (no ``config``, or one that lacks a field) is refused like a differing one;
- plain data is bounded: ints in ``(-2**64, 2**64)``, finite floats, at most ``MAX_DEPTH``
  levels of nesting, JSON files of at most ``MAX_JSON_BYTES``; anything else raises
  ``ValueError`` naming the field (the same rule for a file and for an in-memory dict).

On disk (Accelerate's ``save_state``) the state is JSON: nothing in it can execute code. Every file
is written by :func:`write_atomically` (a temporary file in the same directory, flushed, fsynced,
renamed over the target): a process killed mid-save leaves the previous file whole, and a file cut
short some other way is refused, naming it. Inside a
``torch.distributed.checkpoint`` (DCP) the same JSON travels as a uint8 tensor of fixed capacity
(:func:`state_tensor`), because DCP pickles every non-tensor value it saves.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["FORMAT", "MAX_DEPTH", "MAX_JSON_BYTES", "STATE_TENSOR_HEADER", "check_config", "check_plain", "plain",
           "read_field", "read_json", "read_state_tensor", "read_tensor_field", "read_tensors", "state_tensor",
           "write_atomically", "write_json", "write_tensors"]

FORMAT = 1  # version of the state-dict layout
MAX_DEPTH = 32  # nesting levels of plain data; the regularizers' states use fewer than 8
MAX_JSON_BYTES = 64 << 20  # an AutoClip history of ~3 million norms; set history_size for longer runs
INT_LIMIT = 1 << 64  # seeds and counts are 64-bit words: a larger int is never a valid field
STATE_TENSOR_HEADER = 8  # bytes of a state tensor that hold the JSON's length (little-endian)
T = TypeVar("T")
_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it), restored on the next line
os.umask(_UMASK)


def _bounded_problem(value: Any) -> str | None:
    """Why a scalar is not bounded plain data, or None if it is (containers are checked by the caller)."""
    if value is None or isinstance(value, (bool, str)):
        return None
    if isinstance(value, int):
        return None if -INT_LIMIT < value < INT_LIMIT else "holds an integer outside (-2**64, 2**64)"
    if isinstance(value, float):
        return None if math.isfinite(value) else f"holds a non-finite float ({value!r})"
    return f"holds a {type(value).__name__}, which is not plain data"


def _all_finite_floats(items: list | tuple) -> bool:
    """True if every item is a finite float (a NaN or inf anywhere makes the exact sum non-finite or raise)."""
    if not items or set(map(type, items)) != {float}:
        return False
    try:
        return math.isfinite(math.fsum(items))
    except (OverflowError, ValueError):  # inf - inf, or a finite sum beyond the float range: check one by one
        return False


def check_plain(value: Any, owner: str, path: str) -> None:
    """Raise ``ValueError`` naming the field (``path`` and below) of the first value that is not
    bounded plain data: ints in ``(-2**64, 2**64)``, finite floats, str, bool, None, lists (tuples)
    and dicts with string keys, nested at most ``MAX_DEPTH`` levels. Iterative: no recursion limit."""
    stack = [(value, path, 0)]
    while stack:
        item, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"{owner} checkpoint field {where!r} nests deeper than {MAX_DEPTH} levels")
        if isinstance(item, (list, tuple)):
            if _all_finite_floats(item):  # a history of norms: one C-level pass
                continue
            for i, child in enumerate(item):  # long lists of scalars (histories): no path built unless refused
                if isinstance(child, (list, tuple, Mapping)):
                    stack.append((child, f"{where}[{i}]", depth + 1))
                elif not isinstance(child, float) or not math.isfinite(child):
                    problem = _bounded_problem(child)
                    if problem is not None:
                        raise ValueError(f"{owner} checkpoint field {where + f'[{i}]'!r} {problem}")
        elif isinstance(item, Mapping):
            bad_keys = [key for key in item if not isinstance(key, str)]
            if bad_keys:
                raise ValueError(f"{owner} checkpoint field {where!r} has non-string keys {bad_keys[:3]}")
            stack.extend((child, f"{where}.{key}", depth + 1) for key, child in item.items())
        else:
            problem = _bounded_problem(item)
            if problem is not None:
                raise ValueError(f"{owner} checkpoint field {where!r} {problem}")


def plain(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples become lists); raises for anything else.

    The same bounds as loading (:func:`check_plain`): what is saved can always be loaded.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        problem = _bounded_problem(value)
        if problem is not None:
            raise ValueError(f"state {problem}; it cannot be stored as a checkpoint")
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
    check_plain(state[name], owner, name)
    return check(state[name], f"{owner} checkpoint field {name!r}")


def read_tensor_field(state: Mapping[str, Any], name: str, check: Callable[[object, str], T], owner: str) -> T:
    """``check(state[name])`` for a field of tensors (not plain data), with errors naming ``owner`` and the field."""
    if not isinstance(state, Mapping):
        raise ValueError(f"{owner} checkpoint must be a dict, got {type(state).__name__}")
    if name not in state:
        raise ValueError(f"{owner} checkpoint has no {name!r} field (fields: {sorted(state)})")
    return check(state[name], f"{owner} checkpoint field {name!r}")


def check_config(owner: str, saved: Mapping[str, Any], current: Mapping[str, Any], strict: bool) -> None:
    """Compare the checkpoint's configuration with the object's (only fields the checkpoint has).

    Raises ``ValueError`` naming every differing or missing field when ``strict``; warns otherwise.
    A checkpoint without a field of the configuration cannot show that it matches: it counts as differing.
    """
    if not isinstance(saved, Mapping):
        raise ValueError(f"{owner} checkpoint field 'config' must be a dict, got {type(saved).__name__}")
    check_plain(saved, owner, "config")
    current = plain(current)
    differing = [f"{name}: checkpoint {saved[name]!r}, this run {current[name]!r}" if name in saved
                 else f"{name}: missing from the checkpoint's config, this run {current[name]!r}"
                 for name in current if name not in saved or plain(saved[name]) != current[name]]
    if not differing:
        return
    detail = "; ".join(differing)
    if strict:
        raise ValueError(f"{owner}: the checkpoint was saved with a different configuration ({detail}). "
                         "Build it with the checkpoint's arguments, or load with strict=False to keep this "
                         "run's configuration and take only the checkpoint's progress (step counts, schedule)")
    warnings.warn(f"{owner}: loading progress from a checkpoint with a different configuration ({detail}); "
                  "keeping this run's configuration (strict=False)", RuntimeWarning, stacklevel=3)


def _json_bytes(state: Mapping[str, Any], limit: int | None = None) -> bytes:
    """``state`` (plain data) as UTF-8 JSON of at most ``limit`` (default ``MAX_JSON_BYTES``) bytes;
    refuses (``ValueError``) what loading would refuse."""
    limit = MAX_JSON_BYTES if limit is None else limit
    state = plain(state)
    check_plain(state, "dropgrad_dist (saving)", "state")
    raw = json.dumps(state, indent=1, allow_nan=False).encode("utf-8")
    if len(raw) > limit:
        raise ValueError(f"the regularizer state is {len(raw)} bytes as JSON, over the {limit} bytes a checkpoint "
                         "of it may hold (an unbounded AutoClip history? set history_size)")
    return raw


def write_atomically(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of ``data``.

    The bytes go to a temporary file in the same directory, are flushed and fsynced, and the file
    is renamed over ``path`` (``os.replace``, atomic on POSIX and Windows); the directory is fsynced
    so the rename survives a power loss. A process killed at any point leaves the old file (and at
    worst a stray ``.<name>.*.tmp``). ``mode``: the file's permissions (default: what ``open`` gives).
    """
    path = Path(path)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, (0o666 & ~_UMASK) if mode is None else mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Write ``state`` (plain data) as JSON with :func:`write_atomically`.

    Refuses (``ValueError``) a state that :func:`read_json` would refuse: too large or too deep.
    """
    write_atomically(path, _json_bytes(state))


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")
_KEY_BEFORE = re.compile(r'"((?:[^"\\]|\\.)*)"\s*:\s*$')


def _check_nesting(text: str, owner: str) -> None:
    """Refuse JSON nested deeper than ``MAX_DEPTH`` before parsing it (a deep file would exhaust
    the parser's recursion), naming the top-level field that holds the deep part."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return
    # Blank string contents (same length, so offsets stay valid): brackets inside strings do not nest.
    blanked = _JSON_STRING.sub(lambda match: '"' + " " * (len(match.group()) - 2) + '"', text)
    depth, field_start = 0, 0
    for match in _BRACKET.finditer(blanked):
        depth += 1 if match.group() in "[{" else -1
        if depth == 2 and match.group() in "[{":
            field_start = match.start()  # a value of the top-level object begins here
        if depth > MAX_DEPTH + 1:  # +1: the top-level object itself
            key = _KEY_BEFORE.search(text, max(0, field_start - 256), field_start)
            where = key.group(1) if key else f"at byte {match.start()}"
            raise ValueError(f"{owner} checkpoint field {where!r} nests deeper than {MAX_DEPTH} levels; "
                             "refusing to load it")


def read_json(path: str | os.PathLike, owner: str) -> dict[str, Any]:
    """Read a JSON object written by :func:`write_json`; a file that is not one raises ``ValueError``.

    Bounded before parsing (size, nesting) and validated after (:func:`check_plain`): a malformed
    or hostile file raises ``ValueError`` naming the field, never ``RecursionError`` or ``OverflowError``.
    """
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise FileNotFoundError(f"{owner}: no checkpoint file {str(path)!r}") from None
    return _parse_json(raw, owner, repr(str(path)))


def _parse_json(raw: bytes, owner: str, where: str) -> dict[str, Any]:
    """The JSON object in ``raw`` (from ``where``: a file, a DCP entry), bounded and validated like a file."""
    if len(raw) > MAX_JSON_BYTES:
        raise ValueError(f"{owner}: {where} is larger than {MAX_JSON_BYTES >> 20} MiB; refusing to load it")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{owner}: {where} is not a JSON checkpoint ({err}); refusing to load it") from None
    _check_nesting(text, owner)
    try:
        # Non-finite constants parse to floats, so that check_plain names the field that holds them.
        state = json.loads(text, parse_constant=float)
    except (json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{owner}: {where} is not a JSON checkpoint ({type(err).__name__}: {err}); "
                         "refusing to load it") from None
    except ValueError as err:  # an integer of more digits than Python converts
        raise ValueError(f"{owner}: {where} holds a number that cannot be a checkpoint field ({err}); "
                         "refusing to load it") from None
    if not isinstance(state, dict):
        raise ValueError(f"{owner}: {where} holds a JSON {type(state).__name__}, expected an object")
    for key, value in state.items():
        check_plain(value, owner, key)
    return state


def state_tensor(state: Mapping[str, Any], capacity: int) -> Any:
    """``state`` (plain data) as JSON in a uint8 tensor of exactly ``capacity`` bytes, for DCP.

    Layout: the JSON's length (``STATE_TENSOR_HEADER`` bytes, little-endian), the UTF-8 JSON, zeros.
    The size is fixed because DCP loads a tensor in place into one of the size it was saved with.
    Refuses (``ValueError``) a state that does not fit or that :func:`read_state_tensor` would refuse.
    """
    import torch

    raw = _json_bytes(state, min(MAX_JSON_BYTES, capacity - STATE_TENSOR_HEADER))
    buffer = bytearray(capacity)
    buffer[:STATE_TENSOR_HEADER] = len(raw).to_bytes(STATE_TENSOR_HEADER, "little")
    buffer[STATE_TENSOR_HEADER:STATE_TENSOR_HEADER + len(raw)] = raw
    return torch.frombuffer(buffer, dtype=torch.uint8)


def read_state_tensor(tensor: Any, owner: str, where: str) -> dict[str, Any]:
    """The state :func:`state_tensor` wrote into ``tensor`` (read back by DCP), validated like a JSON file.

    A tensor of another dtype or shape, a length beyond the tensor, or bytes after the JSON raise
    ``ValueError`` naming ``where``.
    """
    import torch

    if not torch.is_tensor(tensor) or tensor.dtype != torch.uint8 or tensor.dim() != 1:
        shown = f"a {tensor.dtype} tensor of shape {tuple(tensor.shape)}" if torch.is_tensor(tensor) \
            else f"a {type(tensor).__name__}"
        raise ValueError(f"{owner}: {where} must be a 1-D uint8 tensor, got {shown}; refusing to load it")
    raw = tensor.detach().cpu().contiguous().numpy().tobytes()
    length = int.from_bytes(raw[:STATE_TENSOR_HEADER], "little")
    end = STATE_TENSOR_HEADER + length
    if len(raw) < STATE_TENSOR_HEADER or end > len(raw):
        raise ValueError(f"{owner}: {where} declares {length} bytes of JSON in a {len(raw)}-byte tensor "
                         "(truncated or not a regularizer state); refusing to load it")
    if raw[end:].count(0) != len(raw) - end:
        raise ValueError(f"{owner}: {where} holds bytes after its JSON (not a regularizer state); refusing to load it")
    return _parse_json(raw[STATE_TENSOR_HEADER:end], owner, where)


def write_tensors(path: str | os.PathLike, tensors: Mapping[str, Any]) -> None:
    """Write named tensors as safetensors (a format that holds only data) with :func:`write_atomically`."""
    from safetensors.torch import save

    write_atomically(path, save({name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}))


def read_tensors(path: str | os.PathLike, owner: str) -> dict[str, Any]:
    """Read named tensors written by :func:`write_tensors`; any other file raises ``ValueError``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"{owner}: no checkpoint file {str(path)!r}")
    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, OSError) as err:
        raise ValueError(f"{owner}: {str(path)!r} is not a safetensors checkpoint ({err}); "
                         "refusing to load it") from None
