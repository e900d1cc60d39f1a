"""Hugging Face Trainer integration: 2 CPU processes under torchrun (DDP hook, FSDP2) match one process.

The example script trains a tiny BERT built from a config (no download) with DropGrad (compact
all-reduce) and norm clipping, Trainer's ``max_grad_norm`` left at its default.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the transformers extra is not installed (pip install .[transformers])")
from safetensors.torch import load_file  # noqa: E402

from dropgrad_dist.testing import free_port  # noqa: E402

pytestmark = pytest.mark.distributed  # every test here starts several processes

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "examples" / "hf_trainer.py")


def _start(command: list[str], output_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*command, SCRIPT, "--output_dir", str(output_dir), *extra], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(process: subprocess.Popen, output_dir: Path) -> tuple[dict, dict]:
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out[-4000:]
    return load_file(output_dir / "params.safetensors"), json.loads((output_dir / "result.json").read_text())


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]


def test_trainer_ddp_and_fsdp2_match_one_process_with_clipping_and_default_max_grad_norm(tmp_path):
    one, ddp, fsdp2 = tmp_path / "one", tmp_path / "ddp", tmp_path / "fsdp2"
    # All runs at once: most of their time is importing transformers.
    runs = [_start([sys.executable], one), _start(_torchrun(), ddp), _start(_torchrun(), fsdp2, "--fsdp2")]
    want, want_result = _finish(runs[0], one)
    assert (want_result["mode"], want_result["world_size"], want_result["step_index"]) == ("wrapper", 1, 4)
    reference_steps = [entry for entry in want_result["log_history"] if "loss" in entry]
    for process, output_dir, mode in ((runs[1], ddp, "ddp_hook"), (runs[2], fsdp2, "fsdp_wrapper")):
        got, got_result = _finish(process, output_dir)
        assert (got_result["mode"], got_result["world_size"], got_result["step_index"]) == (mode, 2, 4)
        assert want.keys() == got.keys()
        assert max((want[k] - got[k]).abs().max().item() for k in want) < 1e-5, mode
        steps = [entry for entry in got_result["log_history"] if "loss" in entry]
        assert len(steps) == 4
        for entry, reference in zip(steps, reference_steps):
            assert entry["drop_rate"] == 0.5 and entry["kept_fraction"] == 0.5
            # Trainer's grad_norm is the norm our clipper sees: masked, all ranks/shards, unclipped before.
            assert entry["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)
            assert entry["grad_norm_clipped"] == pytest.approx(min(entry["grad_norm"], 0.5), rel=1e-5)
        assert any(entry["clipped"] for entry in steps)
        if mode == "ddp_hook":  # the compact all-reduce sends the kept half (plus one element per bucket)
            assert 0.45 < steps[-1]["bytes_communicated"] / steps[-1]["bytes_dense_equivalent"] < 0.55


def test_bad_arguments_raise():
    from transformers import TrainingArguments

    from dropgrad_dist.integrations.transformers import RegularizersCallback, add_regularizers

    with pytest.raises(TypeError, match="trainer must be a transformers.Trainer"):
        RegularizersCallback(TrainingArguments(output_dir="unused", use_cpu=True), dropgrad=dict(drop_rate=0.1))
    with pytest.raises(TypeError, match="gnp"):
        add_regularizers(object(), gnp=dict(alpha=0.5))  # Trainer runs one gradient pass per step
