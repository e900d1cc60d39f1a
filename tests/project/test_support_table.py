"""The README's regularizer x engine table is true: every cell names the tests behind it.

``SUPPORT[row][column]`` is ``(cell, evidence)``: ``cell`` exactly as the README writes it, and for
each part of it (``Y/a`` has two) the tests that show it: ``"path::function"`` for a ``Y`` (a test
against the one-process run, or a bitwise check) or for a refusal letter (a test of the refusal's
message), ``"absent:path:Class:option"`` for a refusal by absence (the class's ``__init__`` in
``path`` has no such option). ``?`` (neither refused nor tested) has no evidence. The test fails when a README cell and
this mapping disagree, when a named test function is gone, or when a cell lacks its evidence.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Which regularizer runs in which engine"
COLUMNS = ("one process", "DDP hook", "FSDP2", "FSDP1", "HSDP", "FSDP2+TP", "Accelerate", "Trainer",
           "Lightning DDP", "Lightning FSDP2", "DeepSpeed")

# The tests, by what they run.
OPTIM = "tests/dropgrad/test_optim.py::"
CLIP = "tests/clipping/test_clip.py::"
GNP = "tests/gnp/test_gnp.py::"
SAM = "tests/gnp/test_sam.py::"
DDP_HOOK = "tests/ddp/test_ddp_hook.py::test_ddp_hook_matches_single_process_dropgrad"
DDP_RESUME = "tests/ddp/test_ddp_hook.py::test_resume_from_state_dict_or_pickle_is_bitwise_identical"
CLIP_DIST = "tests/clipping/test_clip_dist.py::test_layout_clips_like_one_process"  # DDP, FSDP2, FSDP1
GNP_DIST = "tests/gnp/test_gnp_dist.py::test_global_perturbation_equals_one_process_on_the_global_batch"
SAM_DIST = "tests/gnp/test_sam_dist.py::test_two_ranks_equal_one_process_on_the_global_batch"  # DDP, FSDP2
FSDP2 = "tests/dropgrad/test_fsdp.py::test_fsdp2_masks_training_clipping_and_resume_match_one_process"
FSDP1 = "tests/dropgrad/test_fsdp.py::test_fsdp1_orig_params_masks_training_clipping_and_resume_match_one_process"
HSDP = "tests/dropgrad/test_hsdp.py::test_hsdp_2x2_mesh_masks_training_clipping_and_agreement_match_one_process"
# GNP(DropGrad(Clipped(Restarting(AdamW), AutoClip))) on FSDP2 and HSDP (DDP: the hook under GNP(AutoClip)),
# resumed bitwise on its layout and, on 2 ranks or in one process, equal to the 4-rank run.
DCP = "tests/integrations/test_dcp.py::test_dcp_saved_on_four_ranks_resumes_on_four_two_and_one"
TP = "tests/dropgrad/test_tp.py::test_fsdp2_tp_2x2_mesh_offsets_masks_norms_and_trainings_match_one_process"
ACCELERATE = "tests/integrations/test_integration.py::"
ACCELERATE_CHAIN = ACCELERATE + "test_one_entry_point_masks_then_clips_then_steps_then_restarts"
ACCELERATE_GNP = ACCELERATE + "test_gnp_through_the_entry_point_accumulates_inside_its_closure"
ACCELERATE_WRAPPER_ONLY = (ACCELERATE +
                           "test_full_update_drop_and_layer_wise_clipping_through_the_entry_point_or_refused_under_ddp")
LAUNCH = "tests/project/test_launch.py::"  # the ViT example through Accelerate on 2 CPU processes
LAUNCH_RESUME = LAUNCH + "test_ddp_hook_mode_resumes_exactly_from_accelerate_checkpoint"  # AutoClip, restarts
TRAINER = "tests/integrations/test_hf_trainer.py::test_trainer_in_one_process_ddp_and_fsdp2"
LIGHTNING = ("tests/integrations/test_lightning.py::"
             "test_strategies_match_one_process_accumulate_sam_and_resume_from_model_checkpoint")
LIGHTNING_NO_RESTARTS = ("tests/integrations/test_lightning.py::"
                         "test_strategies_refuse_restarts_their_checkpoints_cannot_carry")
RESTARTER = CLIP + "test_restarter_sets_the_exact_mean_resets_the_optimizer_and_grows_the_period"
DEEPSPEED = "tests/integrations/test_deepspeed.py::test_zero_partitions_are_masked_as_one_process_masks"

NO_HOOK_OPTION = [f"absent:dropgrad_dist/ddp/hook.py:DropGradHookState:{option}"
                  for option in ("full_update_drop", "step_skip_rate")]
NO_LIGHTNING_DDP_OPTION = [f"absent:dropgrad_dist/integrations/lightning.py:DropGradDDPStrategy:{option}"
                           for option in ("full_update_drop", "step_skip_rate")]


SUPPORT: dict[str, dict[str, tuple[str, dict[str, list[str]]]]] = {
    "DropGrad masks": {
        "one process": ("Y", {"Y": [OPTIM + "test_step_applies_the_engine_mask_and_rescales"]}),
        "DDP hook": ("Y", {"Y": [DDP_HOOK]}),
        "FSDP2": ("Y", {"Y": [FSDP2]}),
        "FSDP1": ("Y", {"Y": [FSDP1]}),
        "HSDP": ("Y", {"Y": [HSDP]}),
        "FSDP2+TP": ("Y", {"Y": [TP]}),
        "Accelerate": ("Y", {"Y": [ACCELERATE_CHAIN, LAUNCH + "test_ddp_hook_mode_matches_one_process_and_ranks_agree",
                                   LAUNCH + "test_fsdp2_mode_matches_one_process"]}),
        "Trainer": ("Y", {"Y": [TRAINER]}),
        "Lightning DDP": ("Y", {"Y": [LIGHTNING]}),
        "Lightning FSDP2": ("Y", {"Y": [LIGHTNING]}),
        "DeepSpeed": ("Y", {"Y": [DEEPSPEED]}),
    },
    "`full_update_drop`, `step_skip_rate`": {
        "one process": ("Y", {"Y": [OPTIM + "test_full_update_drop_keeps_dropped_coordinates_and_rescales_kept_updates",
                                    OPTIM + "test_step_skip_rate_skips_whole_steps_by_seed_and_step"]}),
        "DDP hook": ("a", {"a": NO_HOOK_OPTION}),
        "FSDP2": ("Y", {"Y": [FSDP2]}),  # fsdp_common.CONFIGS["adam_update_skip"]
        "FSDP1": ("Y", {"Y": [FSDP1]}),
        "HSDP": ("Y", {"Y": [HSDP]}),
        "FSDP2+TP": ("Y", {"Y": [TP]}),
        "Accelerate": ("Y/a", {"Y": [ACCELERATE_WRAPPER_ONLY], "a": [ACCELERATE_WRAPPER_ONLY]}),
        "Trainer": ("?/a", {"?": [], "a": [ACCELERATE_WRAPPER_ONLY]}),  # Trainer runs prepare_regularizers
        "Lightning DDP": ("a", {"a": NO_LIGHTNING_DDP_OPTION}),
        "Lightning FSDP2": ("?", {"?": []}),
        "DeepSpeed": ("Y", {"Y": [DEEPSPEED]}),
    },
    "norm clipping": {
        "one process": ("Y", {"Y": [CLIP + "test_each_method_matches_its_formula_over_steps"]}),
        "DDP hook": ("Y", {"Y": [CLIP_DIST]}),
        "FSDP2": ("Y", {"Y": [CLIP_DIST, FSDP2]}),
        "FSDP1": ("Y", {"Y": [CLIP_DIST, FSDP1]}),
        "HSDP": ("Y", {"Y": [HSDP]}),
        "FSDP2+TP": ("Y", {"Y": [TP]}),
        "Accelerate": ("Y", {"Y": [ACCELERATE_GNP]}),
        "Trainer": ("Y", {"Y": [TRAINER]}),
        "Lightning DDP": ("Y", {"Y": [LIGHTNING]}),
        "Lightning FSDP2": ("Y", {"Y": [LIGHTNING]}),
        "DeepSpeed": ("Y", {"Y": [DEEPSPEED]}),
    },
    "`layer_wise` clipping": {
        "one process": ("Y", {"Y": [CLIP + "test_each_method_matches_its_formula_over_steps"]}),
        "DDP hook": ("Y", {"Y": [CLIP_DIST]}),
        "FSDP2": ("Y", {"Y": [CLIP_DIST]}),
        "FSDP1": ("Y", {"Y": [CLIP_DIST]}),
        "HSDP": ("Y", {"Y": [HSDP]}),
        "FSDP2+TP": ("Y", {"Y": [TP]}),
        "Accelerate": ("Y", {"Y": [ACCELERATE_WRAPPER_ONLY]}),
        "Trainer": ("?", {"?": []}),
        "Lightning DDP": ("?", {"?": []}),
        "Lightning FSDP2": ("?", {"?": []}),
        "DeepSpeed": ("Y", {"Y": [DEEPSPEED]}),
    },
    "AutoClip": {
        "one process": ("Y", {"Y": [CLIP + "test_autoclip_quantile_is_exactly_torch_quantile_over_the_window"]}),
        "DDP hook": ("Y", {"Y": [CLIP_DIST]}),
        "FSDP2": ("Y", {"Y": [CLIP_DIST]}),
        "FSDP1": ("Y", {"Y": [CLIP_DIST]}),
        "HSDP": ("Y", {"Y": [DCP]}),
        "FSDP2+TP": ("Y", {"Y": [TP]}),
        "Accelerate": ("Y", {"Y": [ACCELERATE_CHAIN]}),
        "Trainer": ("Y", {"Y": [TRAINER]}),  # the resume case: 6 steps == 3 + resume + 3, clip levels equal
        "Lightning DDP": ("Y", {"Y": [LIGHTNING]}),  # the resume case
        "Lightning FSDP2": ("Y", {"Y": [LIGHTNING]}),
        "DeepSpeed": ("Y", {"Y": [DEEPSPEED]}),
    },
    "restarts": {
        "one process": ("Y", {"Y": [RESTARTER]}),
        "DDP hook": ("Y", {"Y": [CLIP_DIST]}),  # CONFIGS["norm+restarts"]
        "FSDP2": ("Y", {"Y": [CLIP_DIST, DCP]}),
        "FSDP1": ("Y", {"Y": [CLIP_DIST]}),
        "HSDP": ("Y", {"Y": [DCP]}),
        "FSDP2+TP": ("Y", {"Y": [TP]}),
        "Accelerate": ("Y", {"Y": [ACCELERATE_CHAIN, LAUNCH_RESUME]}),
        "Trainer": ("Y", {"Y": [TRAINER]}),
        "Lightning DDP": ("b", {"b": [LIGHTNING_NO_RESTARTS]}),
        "Lightning FSDP2": ("b", {"b": [LIGHTNING_NO_RESTARTS]}),
        "DeepSpeed": ("Y", {"Y": [DEEPSPEED]}),
    },
    "GNP/SAM/ASAM": {
        "one process": ("Y", {"Y": [GNP + "test_combined_gradient_is_the_formula_and_theta_is_restored_bitwise",
                                    SAM + "test_asam_differs_from_sam_and_our_form_matches_davda54_form"]}),
        "DDP hook": ("Y", {"Y": [GNP_DIST, SAM_DIST]}),
        "FSDP2": ("Y", {"Y": [GNP_DIST, SAM_DIST]}),
        "FSDP1": ("Y", {"Y": [GNP_DIST]}),
        "HSDP": ("Y", {"Y": [DCP]}),
        "FSDP2+TP": ("Y", {"Y": [TP]}),
        "Accelerate": ("Y", {"Y": [ACCELERATE_GNP]}),
        "Trainer": ("Y", {"Y": [TRAINER]}),
        "Lightning DDP": ("Y", {"Y": [LIGHTNING]}),
        "Lightning FSDP2": ("Y", {"Y": [LIGHTNING]}),
        "DeepSpeed": ("Y", {"Y": [DEEPSPEED]}),
    },
    "GNP/SAM + accumulation": {
        "one process": ("Y", {"Y": [GNP + "test_a_closure_may_accumulate_micro_batches"]}),
        "DDP hook": ("Y", {"Y": [GNP_DIST]}),  # LAYOUTS["accumulate"]
        "FSDP2": ("Y", {"Y": [GNP_DIST]}),
        "FSDP1": ("Y", {"Y": [GNP_DIST]}),
        "HSDP": ("?", {"?": []}),
        "FSDP2+TP": ("Y", {"Y": [TP]}),
        "Accelerate": ("Y", {"Y": [ACCELERATE_GNP]}),
        "Trainer": ("Y", {"Y": [TRAINER]}),
        "Lightning DDP": ("Y", {"Y": [LIGHTNING]}),
        "Lightning FSDP2": ("Y", {"Y": [LIGHTNING]}),
        "DeepSpeed": ("Y", {"Y": [DEEPSPEED]}),
    },
    "exact resume": {
        "one process": ("Y", {"Y": [OPTIM + "test_resume_from_checkpoint_gives_bitwise_identical_training",
                                    CLIP + "test_resume_mid_run_is_exact", GNP + "test_resume_is_exact"]}),
        "DDP hook": ("Y", {"Y": [DDP_RESUME, DCP]}),
        "FSDP2": ("Y", {"Y": [FSDP2, DCP]}),
        "FSDP1": ("Y", {"Y": [FSDP1]}),
        "HSDP": ("Y", {"Y": [DCP]}),
        "FSDP2+TP": ("?", {"?": []}),
        "Accelerate": ("Y", {"Y": [ACCELERATE_CHAIN, LAUNCH_RESUME]}),
        "Trainer": ("Y", {"Y": [TRAINER]}),
        "Lightning DDP": ("Y", {"Y": [LIGHTNING]}),
        "Lightning FSDP2": ("Y", {"Y": [LIGHTNING]}),
        "DeepSpeed": ("Y", {"Y": [DEEPSPEED]}),
    },
}


def readme_table(text: str) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """The table under ``SECTION`` as ``{row: {column: cell}}``, and its footnotes ``{letter: reason}``."""
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    lines = [line.strip() for line in section.splitlines()]
    rows = [line for line in lines if line.startswith("|")]
    assert len(rows) > 2, "no table in the section"
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert tuple(header[1:]) == COLUMNS, header
    table = {}
    for line in rows[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == len(header), line
        table[cells[0]] = dict(zip(COLUMNS, cells[1:]))
    notes = dict(re.findall(r"^- ([a-z]): (.+)$", section, re.MULTILINE))
    return table, notes


@cache
def parsed(path: str) -> ast.Module:
    return ast.parse((ROOT / path).read_text())


def functions_in(path: str) -> set[str]:
    """The names of every function defined in ``path`` (nested ones included)."""
    return {node.name for node in ast.walk(parsed(path)) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def init_options(path: str, name: str) -> set[str] | None:
    """The argument names of class ``name``'s ``__init__`` in ``path`` (None: no such class or method)."""
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.ClassDef) and node.name == name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    arguments = item.args
                    return {a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs}
    return None


def missing_evidence(evidence: str) -> str | None:
    """Why ``evidence`` shows nothing (a test function that does not exist, an option that does), or None."""
    if evidence.startswith("absent:"):
        _, path, name, option = evidence.split(":")
        options = init_options(path, name) if (ROOT / path).is_file() else None
        if options is None:
            return f"{path} defines no class {name} with an __init__"
        return f"{name} has the option {option!r}" if option in options else None
    path, _, function = evidence.partition("::")
    if not (ROOT / path).is_file():
        return f"{path} does not exist"
    if function not in functions_in(path):
        return f"{path} defines no function {function}"
    return None


def check(table: dict[str, dict[str, str]], notes: dict[str, str], support=SUPPORT) -> list[str]:
    """Every disagreement between the README's table and ``support``, and every cell without evidence."""
    problems = []
    if list(table) != list(support):
        problems.append(f"rows: README {list(table)}, mapping {list(support)}")
    for row, cells in support.items():
        for column in COLUMNS:
            cell, evidence = cells[column]
            where = f"{row} | {column}"
            written = table.get(row, {}).get(column)
            if written != cell:
                problems.append(f"{where}: README says {written!r}, the mapping {cell!r}")
            parts = cell.split("/")
            if sorted(parts) != sorted(evidence):
                problems.append(f"{where}: cell parts {parts}, evidence for {sorted(evidence)}")
            for part in parts:
                tests = evidence.get(part, [])
                if part == "?":
                    if tests:
                        problems.append(f"{where}: '?' but tests named: mark it Y")
                    continue
                if not tests:
                    kind = "test" if part == "Y" else "refusal test"
                    problems.append(f"{where}: {part!r} without a {kind}")
                if part != "Y" and part not in notes:
                    problems.append(f"{where}: refusal {part!r} has no footnote under the table")
                problems.extend(f"{where}: {reason}" for reason in map(missing_evidence, tests) if reason)
    return problems


def test_readme_table_matches_the_mapping_and_every_cell_has_its_test():
    table, notes = readme_table((ROOT / "README.md").read_text())
    assert check(table, notes) == []


def test_the_check_fails_on_a_flipped_cell_a_deleted_test_and_a_missing_refusal_test(tmp_path):
    table, notes = readme_table((ROOT / "README.md").read_text())
    flipped = {row: dict(cells) for row, cells in table.items()}
    flipped["restarts"]["Lightning DDP"] = "Y"
    assert check(flipped, notes) == ["restarts | Lightning DDP: README says 'Y', the mapping 'b'"]

    support = {row: dict(cells) for row, cells in SUPPORT.items()}
    support["AutoClip"]["FSDP1"] = ("Y", {"Y": ["tests/clipping/test_clip_dist.py::test_gone"]})
    support["`full_update_drop`, `step_skip_rate`"]["Lightning DDP"] = ("a", {"a": []})
    assert check(table, notes, support) == [
        "`full_update_drop`, `step_skip_rate` | Lightning DDP: 'a' without a refusal test",
        "AutoClip | FSDP1: tests/clipping/test_clip_dist.py defines no function test_gone"]
    support = {row: dict(cells) for row, cells in SUPPORT.items()}
    support["`full_update_drop`, `step_skip_rate`"]["DDP hook"] = (
        "a", {"a": ["absent:dropgrad_dist/ddp/hook.py:DropGradHookState:communication"]})
    assert check(table, notes, support) == [
        "`full_update_drop`, `step_skip_rate` | DDP hook: DropGradHookState has the option 'communication'"]


@pytest.mark.parametrize("page", ["accelerate", "transformers", "lightning", "deepspeed", "fsdp", "ddp",
                                  "tensor_parallel"])
def test_every_engine_page_links_the_table(page):
    text = (ROOT / "docs" / f"{page}.md").read_text()
    assert "../README.md#which-regularizer-runs-in-which-engine" in text, page
