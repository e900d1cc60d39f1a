"""`accelerate launch` of the ViT script on 2 CPU processes: DDP-hook and FSDP2 modes agree with one process.

Every run computes the penalized gradient (GNP, two passes), masks it (DropGrad), clips it
(GradientClipper), then steps: the order of every layout.
"""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from dropgrad_dist.testing import free_port

pytestmark = pytest.mark.distributed  # every test here starts several processes

ROOT = Path(__file__).resolve().parents[2]
# One global batch per epoch (train_size == batch_size), so every layout sees the same batch
# each step and runs can be compared parameter by parameter. SGD: no Adam sign amplification.
TINY = ["--num_layers", "1", "--hidden_dim", "32", "--mlp_dim", "64", "--num_heads", "2", "--patch_size", "8",
        "--batch_size", "32", "--train_size", "32", "--test_size", "32", "--optimizer", "sgd",
        "--drop_rate", "0.3", "--clipping_type", "norm", "--clipping_level", "0.05", "--warmup_steps", "1",
        "--gnp_alpha", "0.5", "--gnp_r", "0.05"]


def _launch(script: str, output_dir: Path, *extra: str) -> list[dict]:
    env = {"MAIN_PROCESS_PORT": str(free_port())}
    done = subprocess.run(["bash", str(ROOT / "launch" / script), *TINY, "--output_dir", str(output_dir), *extra],
                          capture_output=True, text=True, timeout=300, env={**__import__("os").environ, **env})
    causes = [line for line in done.stderr.splitlines() if any(w in line for w in ("rror", "terminate", "what()"))]
    assert done.returncode == 0, "\n".join(causes[:30]) + done.stdout[-2000:] + done.stderr[-3000:]
    assert "[launch] " in done.stdout  # each script prints what it runs
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _max_diff(a: Path, b: Path) -> float:
    want, got = torch.load(a / "model.pt", weights_only=True), torch.load(b / "model.pt", weights_only=True)
    assert want.keys() == got.keys()
    return max((want[k].float() - got[k].float()).abs().max().item() for k in want)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return out, _launch("cpu_single.sh", out, "--max_steps", "6")


def test_ddp_hook_mode_matches_one_process_and_ranks_agree(single_run, tmp_path):
    records = _launch("cpu_ddp.sh", tmp_path, "--max_steps", "6", "--communication", "compact")
    config, final = records[0], records[-1]
    assert config["processes"] == 2 and config["distributed_type"] == "DistributedType.MULTI_CPU"
    train = [r for r in records if r["type"] == "train"]
    assert len(train) == 6
    sent = [r["bytes_communicated"] / r["bytes_dense_equivalent"] for r in train]
    # GNP's first pass is averaged unmasked (all bytes); the second, compact, sends the kept 70%.
    assert all(abs(ratio - (1.0 + 0.7) / 2) < 0.02 for ratio in sent)
    assert len(set(final["rank_param_digests"])) == 1  # both ranks hold the same parameters
    assert _max_diff(single_run[0], tmp_path) < 1e-6  # same masks as the single-process wrapper


def test_fsdp2_mode_matches_one_process(single_run, tmp_path):
    records = _launch("cpu_fsdp2.sh", tmp_path, "--max_steps", "6")
    assert records[0]["distributed_type"] == "DistributedType.FSDP" and records[0]["processes"] == 2
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, 7))
    assert _max_diff(single_run[0], tmp_path) < 1e-6


def test_ddp_hook_mode_resumes_exactly_from_accelerate_checkpoint(tmp_path):
    """Masks, AutoClip history and restart sums all resume from save_state's JSON and safetensors files."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = ["--max_steps", "6", "--checkpointing_steps", "3", "--dropout", "0.1", "--epochs", "6",
            "--clipping_type", "auto_clip", "--p_autoclip", "0.5", "--restarts", "2"]
    records = _launch("cpu_ddp.sh", full, *args)
    _launch("cpu_ddp.sh", resumed, *args, "--resume_from_checkpoint", str(full / "step_3"))
    assert _max_diff(full, resumed) == 0.0
    saved = sorted(p.name for p in (full / "step_3").iterdir() if p.name.startswith("dropgrad_dist"))
    assert saved == ["dropgrad_dist_state_0.json", "dropgrad_dist_state_0_rank0.safetensors",
                     "dropgrad_dist_state_0_rank1.safetensors"]
    train = [r for r in records if r["type"] == "train"]
    assert [r["restarts"] for r in train] == [0, 1, 1, 1, 2, 2]  # periods 2, then 2.5 -> 3 steps
    assert all(r["clip_level"] > 0 and r["grad_norm"] > 0 for r in train)
