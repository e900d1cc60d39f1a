"""The on-disk cache of compiled kernels: a private directory, verified before anything is loaded.

``dlopen`` runs a library's constructors, so loading a file is running it. A library is loaded
from the cache only when

- its directory is owned by the current user and not writable by group or others (created 0o700);
- the file itself is a regular file with the same owner, not writable by group or others;
- its SHA-256 equals the one recorded, when it was built, in the ``<name>.sha256`` sidecar
  (same checks on the sidecar).

A missing, truncated, garbage or otherwise mismatching file is rebuilt in place. Builds happen in a
private temporary directory inside the cache and reach their final names through ``os.replace``
(atomic), so a concurrent process sees the old file or the new one, never half of one. The file
is hashed and loaded through one open descriptor, so what is loaded is what was hashed.

The cache lives in ``$DROPGRAD_CACHE_DIR``, else ``$XDG_CACHE_HOME/dropgrad_dist``, else
``~/.cache/dropgrad_dist``. When that directory is refused (foreign owner, writable by others) or
cannot be written, the build goes to one per-user directory ``<tmp>/dropgrad_dist-<uid>`` under the
same checks, with a warning; when that is refused too, to a throwaway directory removed right after
loading (the library then stays mapped; nothing is left behind).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import stat
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable

from ...core.checkpoint import write_atomically

__all__ = ["cache_root", "load_library"]

_SIDECAR = ".sha256"
_DIGEST_CHARS = 64
_warned: set[str] = set()
_lock = threading.Lock()


def cache_root() -> str:
    """The configured cache directory (see the module docstring); it may not exist yet."""
    return os.environ.get("DROPGRAD_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "dropgrad_dist")


def _fallback_root() -> str:
    return os.path.join(tempfile.gettempdir(), f"dropgrad_dist-{os.geteuid()}")


def _refusal(st: os.stat_result, kind: str) -> str | None:
    """Why a file or directory with status ``st`` may not be trusted, or None."""
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not by the current user ({os.geteuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    if kind == "dir" and not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if kind == "file" and not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    return None


def _private_directory(path: str) -> str | None:
    """Create ``path`` (0o700) if missing; None if it is private and writable, else why it is refused."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except OSError as err:
        return f"cannot be created ({type(err).__name__}: {err})"
    why = _refusal(st, "dir")
    if why is not None:
        return why
    if stat.S_IMODE(st.st_mode) != 0o700:
        try:  # ours and not writable by others: tighten it to owner-only
            os.chmod(path, 0o700)
        except OSError:
            pass
    if not os.access(path, os.W_OK | os.X_OK):
        return "not writable"
    return None


def _read_trusted(fd: int) -> bytes | None:
    """The content of an open file if its owner and mode are trusted, else None."""
    if _refusal(os.fstat(fd), "file") is not None:
        return None
    return _read(fd)


def _read(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _recorded_digest(path: str) -> str | None:
    try:
        fd = os.open(path + _SIDECAR, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        text = _read_trusted(fd)
    finally:
        os.close(fd)
    if text is None or len(text) > 2 * _DIGEST_CHARS:
        return None
    digest = text.decode("ascii", "replace").strip()
    return digest if len(digest) == _DIGEST_CHARS else None


def _dlopen(fd: int, path: str) -> ctypes.CDLL:
    """Load the library open as ``fd`` (on Linux through the descriptor itself: the inode hashed)."""
    fd_path = f"/proc/self/fd/{fd}"
    return ctypes.CDLL(fd_path if sys.platform.startswith("linux") and os.path.exists(fd_path) else path)


def _load_verified(path: str) -> ctypes.CDLL | None:
    """The library at ``path`` if it passes every check (see the module docstring), else None."""
    expected = _recorded_digest(path)
    if expected is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        content = _read_trusted(fd)
        if content is None or hashlib.sha256(content).hexdigest() != expected:
            return None
        return _dlopen(fd, path)
    finally:
        os.close(fd)


def _build_and_load(directory: str, filename: str, build: Callable[[str], None], keep: bool) -> ctypes.CDLL:
    """Build into a private temporary directory under ``directory``, load it, and (``keep``) install it."""
    work = tempfile.mkdtemp(dir=directory, prefix=".build-")  # 0o700, a fresh unpredictable name
    try:
        built = os.path.join(work, filename)
        build(built)
        fd = os.open(built, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            # Written by our compiler into our fresh 0o700 directory: nobody else could have touched it.
            os.fchmod(fd, 0o500)
            content = _read(fd)
            library = _dlopen(fd, built)
        finally:
            os.close(fd)
        if keep:
            target = os.path.join(directory, filename)
            os.replace(built, target)
            write_atomically(target + _SIDECAR, (hashlib.sha256(content).hexdigest() + "\n").encode(), mode=0o600)
        return library
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"dropgrad_dist: {message}", RuntimeWarning, stacklevel=4)


def load_library(filename: str, build: Callable[[str], None]) -> ctypes.CDLL:
    """The verified cached library ``filename``, built by ``build(path)`` where missing or bad.

    ``filename`` names the build's inputs (a digest of source, compiler, flags, CPU): one name,
    one content. ``build`` writes the library at the path it is given or raises.
    """
    with _lock:
        refused = []
        for directory in (cache_root(), _fallback_root()):
            why = _private_directory(directory)
            if why is not None:
                refused.append(f"{directory} ({why})")
                continue
            if refused:
                _warn_once(f"kernel cache {refused[0]} refused; using {directory}")
            library = _load_verified(os.path.join(directory, filename))
            return library if library is not None else _build_and_load(directory, filename, build, keep=True)
        _warn_once(f"kernel cache directories refused: {'; '.join(refused)}; building in a temporary "
                   "directory removed after loading (set $DROPGRAD_CACHE_DIR to a private directory)")
        throwaway = tempfile.mkdtemp(prefix="dropgrad_dist_build_")
        try:
            return _build_and_load(throwaway, filename, build, keep=False)
        finally:
            shutil.rmtree(throwaway, ignore_errors=True)
