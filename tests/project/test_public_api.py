"""The public API and the layers: every public name imports from where users import it, and
packages import downward only (the import-linter contracts in pyproject.toml)."""

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PUBLIC = {
    "dropgrad_dist": [
        "CLIPPING_METHODS", "ClippedOptimizer", "ClippedSGD", "CosineAnnealingDropRateScheduler", "DropGrad",
        "DropGradHandle", "DropGradHookState", "DropRateScheduler", "GradientClipper", "GradientNormPenalty",
        "LinearDropRateScheduler", "MaskStream", "RankDisagreement", "Regularizers", "Restarter",
        "RestartingOptimizer", "SAM", "Segment", "StepDropRateScheduler", "canonical_name", "check_launch",
        "compressed_hook", "drop_", "drop_segments_", "drop_tensors_", "dropgrad_hook", "dropgrad_wrapper",
        "enable_fsdp_on_cpu", "keep_mask", "keep_probability", "keep_threshold", "mask_backend", "pack_segments",
        "prepare_dropgrad", "prepare_regularizers", "set_mask_backend", "unpack_segments_",
    ],
    "dropgrad_dist.mask": [
        "Backend", "MaskStream", "Segment", "SegmentTable", "drop_", "drop_pairs_", "drop_segments_",
        "drop_tensors_", "keep_mask", "keep_probability", "keep_threshold", "key_hash", "mask_backend",
        "pack_segments", "set_mask_backend", "uniform_u32", "unpack_segments_",
    ],
    "dropgrad_dist.integrations.dcp": ["DEFAULT_CAPACITY", "RegularizerState"],
    "dropgrad_dist.integrations.transformers": ["RegularizersCallback", "add_regularizers"],
    "dropgrad_dist.integrations.lightning": ["DropGradDDPStrategy", "DropGradFSDPStrategy"],
    "dropgrad_dist.compat.torch_clip": [
        "ClippedSGD", "ModelProperties", "OptimizerProperties", "RestartProperties", "Restarter",
    ],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_every_public_name_imports_from_its_public_module(module):
    imported = importlib.import_module(module)
    missing = [name for name in PUBLIC[module] if not hasattr(imported, name)]
    assert not missing, f"{module} lost {missing}"
    assert sorted(imported.__all__) == sorted(PUBLIC[module]), f"{module}.__all__ changed: update PUBLIC and the docs"


def test_the_top_level_holds_only_the_entry_points():
    top = sorted(p.name for p in (ROOT / "dropgrad_dist").glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "testing.py"], top


def test_packages_import_downward_only():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint, "lint-imports is missing: install the dev extra (import-linter)"
    done = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout, done.stdout[-3000:]
