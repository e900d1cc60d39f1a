"""Hugging Face Trainer integration: 2 CPU processes under torchrun (DDP hook, FSDP2) match one process.

``hf_trainer_cases.py`` runs every case in one launch per layout (importing transformers is the slow
part): DropGrad (compact all-reduce) with norm clipping and Trainer's default ``max_grad_norm``;
GNP over accumulated micro-batches and ASAM under Trainer's ``max_grad_norm``, both against a plain
``GradientNormPenalty(DropGrad(...))`` loop; 6 steps against 3 + resume + 3; and the resumes that
must be refused.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the transformers extra is not installed (pip install .[transformers])")
from safetensors.torch import load_file  # noqa: E402

pytestmark = pytest.mark.distributed  # every test here starts several processes

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(Path(__file__).with_name("hf_trainer_cases.py"))
LAYOUTS = {"one": ("wrapper", 1), "ddp": ("ddp_hook", 2), "fsdp2": ("fsdp_wrapper", 2)}


def _start(command: list[str], output_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*command, SCRIPT, str(output_dir), *extra], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _case(output_dir: Path, case: str) -> tuple[dict, dict]:
    return (load_file(output_dir / case / "params.safetensors"),
            json.loads((output_dir / case / "result.json").read_text()))


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _steps(result: dict) -> list[dict]:
    return [entry for entry in result["log_history"] if "loss" in entry]


def _launch_all(root: Path) -> dict[str, Path]:
    """The output folder of each layout's launch; all three at once."""
    folders = {layout: root / layout for layout in LAYOUTS}
    processes = {"one": _start([sys.executable], folders["one"]),
                 "ddp": _start(_torchrun(), folders["ddp"]),
                 "fsdp2": _start(_torchrun(), folders["fsdp2"], "--fsdp2")}
    for process in processes.values():
        out, _ = process.communicate(timeout=480)
        assert process.returncode == 0, out[-4000:]
    return folders


def test_trainer_in_one_process_ddp_and_fsdp2(tmp_path):
    """One test, so that pytest-xdist never launches the three runs twice."""
    runs = _launch_all(tmp_path)
    _check_dropgrad_and_clipping_match_one_process_with_default_max_grad_norm(runs)
    for case in ("gnp", "asam"):
        _check_gnp_in_trainer_equals_the_plain_loop_in_every_layout(runs, case)
    _check_resume_continues_exactly_in_every_layout(runs)
    _check_a_checkpoint_without_our_state_or_with_another_configuration_is_refused(runs)


def _check_dropgrad_and_clipping_match_one_process_with_default_max_grad_norm(runs: dict[str, Path]) -> None:
    want, want_result = _case(runs["one"], "clip")
    assert (want_result["mode"], want_result["world_size"], want_result["step_index"]) == ("wrapper", 1, 4)
    reference_steps = _steps(want_result)
    for layout in ("ddp", "fsdp2"):
        got, got_result = _case(runs[layout], "clip")
        assert (got_result["mode"], got_result["world_size"], got_result["step_index"]) == (*LAYOUTS[layout], 4)
        assert _max_difference(want, got) < 1e-5, layout
        steps = _steps(got_result)
        assert len(steps) == 4
        for entry, reference in zip(steps, reference_steps):
            assert entry["drop_rate"] == 0.5 and entry["kept_fraction"] == 0.5
            # Trainer's grad_norm is the norm our clipper sees: masked, all ranks/shards, unclipped before.
            assert entry["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)
            assert entry["grad_norm_clipped"] == pytest.approx(min(entry["grad_norm"], 0.5), rel=1e-5)
        assert any(entry["clipped"] for entry in steps)
        if layout == "ddp":  # the compact all-reduce sends the kept half (plus one element per bucket)
            assert 0.45 < steps[-1]["bytes_communicated"] / steps[-1]["bytes_dense_equivalent"] < 0.55


def _check_gnp_in_trainer_equals_the_plain_loop_in_every_layout(runs: dict[str, Path], case: str) -> None:
    """Both passes inside Trainer's training_step (GNP over 2 accumulated micro-batches with our clipping;
    ASAM clipped by Trainer's max_grad_norm) equal GradientNormPenalty(DropGrad(...)) in a plain loop."""
    reference = load_file(runs["one"] / f"{case}_reference" / "params.safetensors")
    _, one_result = _case(runs["one"], case)
    plain, _ = _case(runs["one"], "clip")
    assert _max_difference(reference, plain) > 1e-2  # the penalty changes the run: the comparison can fail
    for layout, (mode, world_size) in LAYOUTS.items():
        got, result = _case(runs[layout], case)
        assert (result["mode"], result["world_size"], result["step_index"], result["penalty_steps"]) == (
            mode, world_size, 3, 3)
        assert _max_difference(reference, got) < 1e-5, layout
        steps = _steps(result)
        assert len(steps) == 3 and all(entry["gnp_alpha"] == (0.5 if case == "gnp" else 1.0) for entry in steps)
        for entry, want in zip(steps, _steps(one_result)):  # the norm Trainer clips: of the combined gradient
            assert entry["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
            assert entry["loss"] == pytest.approx(want["loss"], rel=1e-5)  # the first pass's loss is logged


def _check_resume_continues_exactly_in_every_layout(runs: dict[str, Path]) -> None:
    """6 steps equal 3 + resume_from_checkpoint + 3 (DropGrad, AutoClip, restarts, GNP with warmup, AdamW)."""
    for layout, (mode, world_size) in LAYOUTS.items():
        full, full_result = _case(runs[layout], "resume_full")
        half, half_result = _case(runs[layout], "resume_half")
        checkpoint = runs[layout] / "resume_full" / "checkpoint-3"
        assert (checkpoint / "trainer_state.json").exists()  # our files sit beside Trainer's
        saved = json.loads((checkpoint / "dropgrad_dist_state_0.json").read_text())
        assert saved["mode"] == mode and saved["gnp"]["step_index"] == 3
        assert all((checkpoint / f"dropgrad_dist_state_0_rank{r}.safetensors").exists() for r in range(world_size))
        assert _max_difference(full, half) < 1e-6, layout
        assert half_result["step_index"] == full_result["step_index"] == 6
        assert half_result["penalty_steps"] == full_result["penalty_steps"] == 5  # warmup: alpha_0 = 0
        # The same masks, clipping levels, restarts and GNP schedule at steps 4 to 6.
        keys = ("loss", "grad_norm", "grad_norm_clipped", "clip_level", "restarts", "gnp_alpha")
        # (The resumed log history begins with the checkpoint's, steps 1 to 3.)
        resumed = [{k: entry[k] for k in keys} for entry in _steps(half_result) if entry["step"] > 3]
        assert len(resumed) == 3
        assert resumed == [{k: entry[k] for k in keys} for entry in _steps(full_result)[3:]]


def _check_a_checkpoint_without_our_state_or_with_another_configuration_is_refused(runs: dict[str, Path]) -> None:
    for layout in LAYOUTS:
        messages = json.loads((runs[layout] / "refused.json").read_text())
        assert "holds no regularizer state" in messages["bare"] and "dropgrad_dist_state_0.json" in messages["bare"]
        assert "different configuration (drop_rate: checkpoint 0.5, this run 0.25)" in messages["changed"]


def test_bad_arguments_raise():
    from transformers import TrainingArguments

    from dropgrad_dist.integrations.transformers import RegularizersCallback

    with pytest.raises(TypeError, match="trainer must be a transformers.Trainer"):
        RegularizersCallback(TrainingArguments(output_dir="unused", use_cpu=True), dropgrad=dict(drop_rate=0.1))
