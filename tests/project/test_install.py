"""A non-editable install ships the C kernel source and builds it: the kernels pass their bitwise self-check."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # pip builds and installs the package, then the kernels compile (~20-40 s)

ROOT = Path(__file__).resolve().parents[2]

# From the installed copy only: the package, its C source, the CPU kernels built from it and
# checked against the eager definition (masking and compaction; "compiled" raises on any failure).
CHECK = """
import os, sys
import torch
import dropgrad_dist
from dropgrad_dist import mask
from dropgrad_dist.mask.kernels import native
site = sys.argv[1]
assert dropgrad_dist.__file__.startswith(site), dropgrad_dist.__file__
assert native.SOURCE.startswith(site) and os.path.isfile(native.SOURCE), native.SOURCE
mask.set_mask_backend("compiled")
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    values = torch.randn(5000, dtype=dtype)
    kernel = mask._native_kernel(values)  # built, then checked bitwise against the eager definition
    assert isinstance(kernel, native.CpuKernel), kernel
    send = mask.pack_segments(values, [(5000, "w", 0, 0.3)], seed=1, step=2)  # the pack/unpack check too
print("installed kernels ok")
"""


def test_a_non_editable_install_builds_the_kernels(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "dropgrad_dist", source / "dropgrad_dist",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc"))
    site = tmp_path / "site"
    # No build isolation: the test runs offline, with the setuptools already installed.
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                                "--no-index", "--target", str(site), str(source)],
                               capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    assert (site / "dropgrad_dist" / "csrc" / "mask_kernels.c").is_file()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), DROPGRAD_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", CHECK, str(site)], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=600)
    assert done.returncode == 0 and "installed kernels ok" in done.stdout, done.stdout + done.stderr[-3000:]
