"""The compiled-kernel cache loads only what it verifies (owner, mode, SHA-256), rebuilds bad files,
and leaves nothing behind when it cannot use its directory.

Every case compiles or loads the CPU kernels in a fresh subprocess with its own
``$DROPGRAD_CACHE_DIR`` and ``$TMPDIR``, so the library already loaded in this process plays no part.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # each case builds the kernels (a few seconds of compiler time)

ROOT = Path(__file__).resolve().parents[2]

# Masks with the native kernel (the "compiled" backend raises where it cannot be built or checked)
# and compares with the eager definition.
USE_KERNEL = """
import warnings
warnings.simplefilter("always")
import torch
from dropgrad_dist import mask
args = dict(seed=1, step=2, key="w", rate=0.5)
mask.set_mask_backend("eager")
want = mask.drop_(torch.randn(5000, generator=torch.Generator().manual_seed(0)), **args)
mask.set_mask_backend("compiled")
got = mask.drop_(torch.randn(5000, generator=torch.Generator().manual_seed(0)), **args)
print("same masks" if torch.equal(got, want) else "different masks")
"""

# A library whose constructor runs at dlopen and leaves a marker file: what an attacker would plant.
PLANTED_C = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE* f = fopen(MARKER, "w");
    if (f) { fputs("the planted library ran\n", f); fclose(f); }
}
"""


def _run(cache: Path, tmp: Path, prelude: str = "") -> subprocess.CompletedProcess:
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "DROPGRAD_CACHE_DIR": str(cache), "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", prelude + USE_KERNEL], capture_output=True, text=True, env=env,
                          timeout=600)


def _assert_kernel_used(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stderr[-3000:]
    assert "same masks" in done.stdout, done.stdout + done.stderr[-3000:]


def _libraries(cache: Path) -> list[Path]:
    return sorted(cache.glob("mask_kernels_*.so"))


def _sidecar_matches(library: Path) -> bool:
    sidecar = library.with_name(library.name + ".sha256")
    return sidecar.exists() and sidecar.read_text().strip() == hashlib.sha256(library.read_bytes()).hexdigest()


def _planted_library(tmp_path: Path, marker: Path) -> bytes:
    source = tmp_path / "planted.c"
    source.write_text(PLANTED_C)
    out = tmp_path / "planted.so"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    subprocess.run([cc, "-shared", "-fPIC", f'-DMARKER="{marker}"', str(source), "-o", str(out)], check=True)
    return out.read_bytes()


def _replace(path: Path, content: bytes) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    path.chmod(0o700)
    path.write_bytes(content)
    path.chmod(mode)


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory) -> Path:
    """A cache directory holding the kernels as built (copied by each test)."""
    root = tmp_path_factory.mktemp("built")
    _assert_kernel_used(_run(root / "cache", root / "tmp"))
    assert _libraries(root / "cache")
    return root / "cache"


def _copy(built_cache: Path, tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    return cache


def test_a_planted_library_never_runs(built_cache, tmp_path):
    # Someone replaced the cached library: its constructor must not run; the kernel is rebuilt.
    cache, marker = _copy(built_cache, tmp_path), tmp_path / "marker"
    planted = _planted_library(tmp_path, marker)
    for library in _libraries(cache):
        _replace(library, planted)
    done = _run(cache, tmp_path / "tmp")
    assert not marker.exists(), "the planted library's constructor ran"
    _assert_kernel_used(done)
    assert all(_sidecar_matches(library) for library in _libraries(cache))


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_library_is_rebuilt(damage, built_cache, tmp_path):
    cache = _copy(built_cache, tmp_path)
    libraries = _libraries(cache)
    for library in libraries:
        content = library.read_bytes()
        _replace(library, content[:len(content) // 2] if damage == "truncated" else os.urandom(len(content)))
    _assert_kernel_used(_run(cache, tmp_path / "tmp"))
    assert _libraries(cache) == libraries and all(_sidecar_matches(library) for library in libraries)


@pytest.mark.parametrize("how", ["writable by others", "owned by another user"])
def test_a_directory_others_control_is_refused(how, built_cache, tmp_path):
    # Even with a sidecar that matches the planted file, a directory others can write (or that is
    # someone else's) is not trusted: the kernels are built elsewhere, the planted file never runs.
    cache, marker, tmp = _copy(built_cache, tmp_path), tmp_path / "marker", tmp_path / "tmp"
    planted = _planted_library(tmp_path, marker)
    for library in _libraries(cache):
        _replace(library, planted)
        sidecar = library.with_name(library.name + ".sha256")
        sidecar.write_text(hashlib.sha256(planted).hexdigest() + "\n")
    prelude = ""
    if how == "writable by others":
        cache.chmod(0o777)
    else:  # this process sees itself as another user: every existing file belongs to "someone else"
        prelude = "import os\n_uid = os.geteuid()\nos.geteuid = lambda: _uid + 4242\n"
    done = _run(cache, tmp, prelude)
    assert not marker.exists(), "the planted library's constructor ran"
    _assert_kernel_used(done)
    assert "refused" in done.stderr and str(cache) in done.stderr, done.stderr[-3000:]
    assert not [entry for entry in os.listdir(tmp) if entry.startswith("dropgrad_dist_")], os.listdir(tmp)


def test_an_unwritable_cache_leaves_no_directory_per_process(tmp_path):
    # $DROPGRAD_CACHE_DIR cannot be created (a file is in the way): the kernels go to one private
    # per-user directory under $TMPDIR, reused by the next process; nothing accumulates.
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("")
    tmp = tmp_path / "tmp"
    listings = []
    for _ in range(2):
        done = _run(blocker / "cache", tmp)
        _assert_kernel_used(done)
        assert "refused" in done.stderr, done.stderr[-3000:]
        listings.append(sorted(os.listdir(tmp)))
    assert listings[0] == listings[1] and len(listings[0]) <= 1, listings
    for entry in listings[0]:
        st = (tmp / entry).stat()
        assert st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o700


def test_files_with_loose_modes_are_not_loaded(built_cache, tmp_path):
    # In process, without dlopen on failure: the checks on the library file itself.
    from dropgrad_dist.mask.kernels import cache as kernel_cache

    directory = _copy(built_cache, tmp_path)
    directory.chmod(0o700)
    library = _libraries(directory)[0]
    library.chmod(0o664)  # group-writable: refused although the digest matches
    assert _sidecar_matches(library) and kernel_cache._load_verified(str(library)) is None
    library.chmod(0o500)
    sidecar = library.with_name(library.name + ".sha256")
    sidecar.chmod(0o666)  # a sidecar others could rewrite proves nothing
    assert kernel_cache._load_verified(str(library)) is None
    sidecar.chmod(0o600)
    assert kernel_cache._load_verified(str(library)) is not None
