"""DeepSpeed ZeRO-1/2/3 through Accelerate, 2 gloo ranks on CPU, against the one-process run.

One spawned run covers every configuration (DeepSpeed's import and engine setup dominate the
time): each rank records, per step, the masked gradient its client optimizer steps on (summed
over the ranks' partitions into whole gradients) and the final parameters; the parent compares
them with one-process ``DropGrad`` (and clipping, and GNP/SAM around them) on the same global
batch, and the zero pattern with the mask engine's ``keep_mask``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from dropgrad_dist import DropGrad, GradientNormPenalty, Restarter, RestartingOptimizer
from dropgrad_dist.clipping.clipper import ClippedOptimizer, GradientClipper
from dropgrad_dist.mask import keep_mask
from dropgrad_dist.testing import run_on_ranks

pytestmark = pytest.mark.distributed

pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install dropgrad-dist[deepspeed])")

STEPS = 3
SEED = 7
RATES = dict(drop_rate=0.5, params={"0.weight": 0.3})
ZERO, BF16, ZERO3 = "DeepSpeedZeroOptimizer", "BF16_Optimizer", "DeepSpeedZeroOptimizer_Stage3"
# (name, ZeRO stage, half precision (True: bf16 gradients, "fp32": bf16 with fp32 gradient accumulation, "fp16":
# fp16 with DeepSpeed's loss scaler), optimizer, clipping level or None, the DeepSpeed optimizer it gives,
# micro-batches per step, more options: "dropgrad" (more DropGrad options), "clipping" (instead of norm clipping
# at the level), "overflow_at" (the step whose loss is infinite on rank 0: DeepSpeed skips it), "offload" (the
# optimizer offloaded to the CPU), "restarts" (Restarter options))
CONFIGS = [
    # A restart after the second update: the masters become the mean of two iterates, AdamW's state restarts.
    ("zero2_fp32_adamw_offload_restarts", 2, False, "adamw", None, ZERO, 1,
     {"offload": True, "restarts": dict(first_restart_steps=2)}),
    ("zero2_fp32_adamw_accumulate", 2, False, "adamw", None, ZERO, 2, {}),
    ("zero1_bf16_adamw", 1, True, "adamw", None, ZERO, 1, {}),
    ("zero2_bf16_sgd", 2, True, "sgd", None, ZERO, 1, {}),
    ("zero1_bf16_fp32acc_sgd_clip", 1, "fp32", "sgd", 0.05, BF16, 1, {}),
    ("zero3_bf16_sgd_clip", 3, True, "sgd", 0.05, ZERO3, 1, {}),
    # Per-parameter norms of parameters split over the ranks' partitions; steps 0 and 2 skipped (seed 7).
    ("zero2_fp32_adamw_layer_wise_skip", 2, False, "adamw", None, ZERO, 1,
     {"clipping": dict(method="layer_wise", clipping_level=0.05), "dropgrad": dict(step_skip_rate=0.5)}),
    # Steps 0 and 2 skipped (seed 7): DeepSpeed still steps, the client updates nothing; the update is masked.
    ("zero3_fp32_adamw_full_update_skip", 3, False, "adamw", 0.05, ZERO3, 1,
     {"dropgrad": dict(full_update_drop=True, step_skip_rate=0.5), "offload": True}),
    # The overflowing step is skipped whole, as GradScaler skips it: no mask step, no AutoClip norm, no iterate
    # for the restart (after the second update).
    ("zero3_fp16_adamw_autoclip_overflow_restarts", 3, "fp16", "adamw", None, ZERO3, 1,
     {"clipping": dict(method="auto_clip", p_autoclip=0.5), "overflow_at": 1,
      "restarts": dict(first_restart_steps=2)}),
]
# GNP/SAM around DropGrad (and clipping): (name, stage, bf16, optimizer, clipping level, DeepSpeed optimizer, gnp=,
# micro-batches per step).
# They also cover DropGrad with ZeRO-1 fp32, ZeRO-2 fp32 clipping and ZeRO-3 fp32 (the same partition step).
GNP_CONFIGS = [
    ("zero1_fp32_sgd_sam", 1, False, "sgd", None, ZERO, dict(alpha=1.0, r=0.05), 1),
    ("zero2_fp32_adamw_gnp_asam_every2", 2, False, "adamw", None, ZERO,
     dict(alpha=0.6, r=0.1, adaptive=True, every=2), 1),
    # Two micro-batches per pass: the penalty on the accumulated gradient.
    ("zero2_fp32_sgd_gnp_normalized_clip_accumulate", 2, False, "sgd", 0.05, ZERO,
     dict(alpha=0.5, r=0.05, mix="normalized", warmup="lambda", warmup_steps=2), 2),
    # bf16: a radius whose effect on the gradients is well above the bf16 tolerance
    ("zero2_bf16_adamw_sam", 2, True, "adamw", None, ZERO, dict(alpha=1.0, r=0.5), 1),
    ("zero1_bf16_fp32acc_sgd_gnp", 1, "fp32", "sgd", None, BF16, dict(alpha=0.5, r=0.5), 1),
    ("zero3_fp32_adamw_gnp_offload", 3, False, "adamw", None, ZERO3, dict(alpha=0.5, r=0.1), 1),
    ("zero3_bf16_sgd_sam_clip_accumulate", 3, True, "sgd", 0.05, ZERO3, dict(alpha=1.0, r=0.5), 2),
]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def make_optimizer(name: str, params) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 5, generator=generator), torch.randn(8, 3, generator=generator)) for _ in range(STEPS)]


def reference(optimizer_name: str, clip: float | None, gnp: dict | None = None,
              options: dict | None = None) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """One process, the whole batch: the masked (and clipped) gradients per step, and the final parameters."""
    options = options or {}
    model = make_model()
    inner = make_optimizer(optimizer_name, model.parameters())
    seen: list[dict[str, torch.Tensor]] = []
    record = inner.step

    def step(*args, **kwargs):
        seen.append({name: p.grad.detach().clone().view(-1) for name, p in model.named_parameters()})
        return record(*args, **kwargs)

    inner.step = step
    clipping = _clipping(clip, options)
    # prepare_regularizers' order: restarts innermost (after the update), then clipping, then DropGrad
    chain = RestartingOptimizer(inner, Restarter(**options["restarts"]), model) if "restarts" in options else inner
    chain = ClippedOptimizer(chain, GradientClipper(**clipping, model=model)) if clipping is not None else chain
    dropgrad = DropGrad(chain, **RATES, **options.get("dropgrad", {}), seed=SEED, model=model)
    penalty = GradientNormPenalty(dropgrad, **gnp, model=model) if gnp is not None else None
    for t, (x, y) in enumerate(batches()):
        if t == options.get("overflow_at"):  # GradScaler would skip this step: nothing counts it
            continue
        dropgrad.zero_grad()
        if penalty is not None:
            penalty.step(lambda x=x, y=y: nn.functional.mse_loss(model(x), y).backward())
            continue
        nn.functional.mse_loss(model(x), y).backward()
        dropgrad.step()
    return seen, {name: p.detach().clone() for name, p in model.named_parameters()}


def _clipping(clip: float | None, options: dict) -> dict | None:
    """The clipping options of a configuration."""
    if "clipping" in options:
        return options["clipping"]
    return dict(method="norm", clipping_level=clip) if clip is not None else None


def _new_accelerator(stage: int, bf16: bool | str, clipping: float = 0.0, micro: int = 1, offload: bool = False):
    import deepspeed.ops
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.accelerator import get_accelerator

    # The shared-memory collective is a C++ extension DeepSpeed would compile at first use; gloo suffices.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    AcceleratorState._reset_state()  # one DeepSpeed config per Accelerator; the process group stays
    config = {"train_micro_batch_size_per_gpu": 4 // micro, "gradient_accumulation_steps": micro,
              "gradient_clipping": clipping,
              "zero_optimization": {"stage": stage}, "bf16": {"enabled": bool(bf16) and bf16 != "fp16"},
              "zero_allow_untested_optimizer": True}
    if offload:  # DeepSpeed's CPU path steps the partitions with the client optimizer (no DeepSpeedCPUAdam here)
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        config["zero_force_ds_cpu_optimizer"] = False
    if bf16 == "fp16":  # a scale (2**8) that no finite gradient here overflows
        config["fp16"] = {"enabled": True, "initial_scale_power": 8}
        # DeepSpeed's CPU accelerator admits fp16 only where oneDNN has fast fp16 kernels; torch computes fp16
        # on any CPU, and the loss scaler under test is device independent.
        get_accelerator().is_fp16_supported = lambda: True
    if bf16 == "fp32":  # ZeRO-1 with bf16 parameters and fp32 gradients: DeepSpeed's BF16_Optimizer
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config))
    # Without a GPU Accelerate finds no backend and records one process of index 0 on every rank;
    # the process group (gloo) is there: record the real ranks (checkpoint files are per rank).
    rank, world = dist.get_rank(), dist.get_world_size()
    ranks = dict(process_index=rank, num_processes=world, local_process_index=rank)
    PartialState._shared_state.update(ranks)
    AcceleratorState._shared_state.update(ranks)
    assert accelerator.num_processes == 2
    return accelerator


def _whole_gradients(engine, client) -> dict[str, torch.Tensor]:
    """The gradient the client optimizer is about to step on, reassembled from every rank's fragments."""
    import torch.distributed as dist

    from dropgrad_dist.integrations.deepspeed import ZeroPartitions

    whole = {name: torch.zeros(_numel(p)) for name, p in engine.module.named_parameters()}
    by_param = {p: name for name, p in engine.module.named_parameters()}
    for flat, fragments in ZeroPartitions(engine.optimizer).fragments.items():
        for lp, at, numel, start in fragments:
            whole[by_param[lp]][start:start + numel] = flat.grad.view(-1)[at:at + numel]
    for tensor in whole.values():
        dist.all_reduce(tensor)
    return whole


def _numel(param: torch.Tensor) -> int:
    return getattr(param, "ds_numel", param.numel())  # ZeRO-3 parameters hold nothing outside forward


def _final_params(engine) -> dict:
    if engine.zero_optimization_stage() == 3:
        from deepspeed.utils import safe_get_full_fp32_param

        return _plain({name: safe_get_full_fp32_param(p) for name, p in engine.module.named_parameters()})
    return _plain(dict(engine.module.named_parameters()))


def _train(accelerator, engine, steps: list[int], micro: int = 1, regularizers=None,
           overflow_at: int | None = None, record: bool = True) -> list[dict[str, torch.Tensor]]:
    """Train on this rank's rows of each step's batch; with ``regularizers`` through ``regularizers.step(closure)``.

    ``overflow_at``: the step whose loss is infinite on rank 0 (DeepSpeed finds the overflow on every rank)."""
    client = engine.optimizer.optimizer
    seen: list[dict[str, torch.Tensor]] = []
    # A step pre-hook of the client optimizer runs after the library masked and clipped, right before the update.
    handle = client.register_step_pre_hook(lambda *_: seen.append(_whole_gradients(engine, client)) if record else None)
    try:
        dtype = next(engine.module.parameters()).dtype
        data = batches()
        rank = torch.distributed.get_rank()  # this process's rows of the global batch
        for t in steps:
            x, y = data[t]
            size = 4 // micro  # DeepSpeed averages the micro-batches' gradients, then the ranks'
            scale = float("inf") if t == overflow_at and rank == 0 else 1.0

            def closure(x=x, y=y, scale=scale):  # every micro-batch of the step (GNP: of one pass)
                for m in range(micro):
                    rows = slice(rank * 4 + m * size, rank * 4 + (m + 1) * size)
                    with accelerator.accumulate(engine):
                        loss = nn.functional.mse_loss(engine(x[rows].to(dtype)).float(), y[rows])
                        accelerator.backward(loss * scale)
                return loss

            if regularizers is not None:
                regularizers.step(closure)
            else:
                closure()
    finally:
        handle.remove()
    return seen


def _penalized_runs() -> dict:
    """GNP/SAM configurations: what each rank saw, and DeepSpeed's own step count (once per step, not per pass)."""
    from deepspeed.runtime.lr_schedules import WarmupLR

    from dropgrad_dist import prepare_regularizers

    out = {}
    for name, stage, bf16, optimizer_name, clip, _, gnp, micro in GNP_CONFIGS:
        accelerator = _new_accelerator(stage, bf16, micro=micro, offload=name.endswith("_offload"))
        model = make_model()
        client = make_optimizer(optimizer_name, model.parameters())
        # A DeepSpeed LR schedule, which the engine steps: constant here, so only its step count tells.
        lr = client.param_groups[0]["lr"]
        schedule = WarmupLR(client, warmup_min_lr=lr, warmup_max_lr=lr, warmup_num_steps=10)
        engine, optimizer, _ = accelerator.prepare(model, client, schedule)
        clipping = dict(method="norm", clipping_level=clip) if clip is not None else None
        regularizers = prepare_regularizers(accelerator, engine, optimizer, dropgrad=dict(RATES, seed=SEED),
                                            clipping=clipping, gnp=gnp)
        seen = _train(accelerator, engine, list(range(STEPS)), micro, regularizers=regularizers)
        out[name] = {"grads": [_plain(grads) for grads in seen], "params": _final_params(engine),
                     "step_index": regularizers.step_index, "optimizer": type(engine.optimizer).__name__,
                     "gnp_steps": (regularizers.gnp.step_index, regularizers.gnp.penalty_steps),
                     "engine_steps": (engine.global_steps, engine.micro_steps,
                                      engine.lr_scheduler.last_batch_iteration + 1),
                     "state_linked": _optimizer_state_linked(engine, optimizer_name)}
    # The second pass replays the first pass's random state (dropout sees the same sub-network).
    draws, (x, y) = [], batches()[0]
    dtype = next(engine.module.parameters()).dtype

    def drawing_closure():
        draws.append(torch.rand(1).item())
        loss = nn.functional.mse_loss(engine(x[:4].to(dtype)).float(), y[:4])
        accelerator.backward(loss)
        return loss

    regularizers.step(drawing_closure)
    out["replayed"] = len(draws) == 2 and draws[0] == draws[1] != torch.rand(1).item()
    # A backward outside regularizers.step would update without the penalty: refused before DeepSpeed steps.
    before = _final_params(engine)
    with pytest.raises(RuntimeError, match="step with regularizers.step"):
        accelerator.backward(nn.functional.mse_loss(engine(x[:4].to(dtype)).float(), y[:4]))
    out["outside"] = all((before[key] == value).all() for key, value in _final_params(engine).items())
    out["skipped"] = {name: _skipped_steps(stage, bf16) for name, stage, bf16 in (
        ("bf16_optimizer", 1, "fp32"), ("zero3_bf16", 3, True), ("zero2_fp16", 2, "fp16"))}
    return out


def _optimizer_state_linked(engine, optimizer_name: str) -> bool:
    """Whether DeepSpeed's per-parameter view of the client optimizer's state (linked after the first update,
    not after the perturbing step) holds the state."""
    from deepspeed.utils import safe_get_full_optimizer_state

    key = "exp_avg" if optimizer_name == "adamw" else "momentum_buffer"
    return all(safe_get_full_optimizer_state(p, key) is not None for p in engine.module.parameters())


def _skipped_steps(stage: int, bf16: bool | str) -> dict:
    """A non-finite loss in either pass: DeepSpeed skips its step, the parameters stay where they were (bitwise,
    the perturbation undone) and nothing counts it (GNP, DropGrad, AutoClip's history), as under GradScaler; the
    next finite step is the one a fresh engine takes."""
    from dropgrad_dist import prepare_regularizers

    x, y = batches()[0]
    rows = slice(torch.distributed.get_rank() * 4, torch.distributed.get_rank() * 4 + 4)
    out: dict = {"unchanged": []}
    for poisoned in ((1, 2), ()):  # the first pass (at theta), then the second (at theta + e); or none
        accelerator = _new_accelerator(stage, bf16)
        model = make_model()
        engine, optimizer = accelerator.prepare(model, make_optimizer("adamw", model.parameters()))
        regularizers = prepare_regularizers(accelerator, engine, optimizer, dropgrad=dict(RATES, seed=SEED),
                                            clipping=dict(method="auto_clip", p_autoclip=0.5),
                                            gnp=dict(alpha=0.5, r=0.5))
        dtype = next(engine.module.parameters()).dtype
        passes: list[int] = []

        def closure(poisoned_pass: int, engine=engine, accelerator=accelerator, dtype=dtype, passes=passes):
            passes.append(len(passes))
            loss = nn.functional.mse_loss(engine(x[rows].to(dtype)).float(), y[rows])
            accelerator.backward(loss * float("nan") if len(passes) == poisoned_pass else loss)
            return loss

        for poisoned_pass in poisoned:
            passes.clear()
            before = _final_params(engine)
            regularizers.step(lambda poisoned_pass=poisoned_pass: closure(poisoned_pass))
            out["unchanged"].append(all((before[key] == value).all() for key, value in _final_params(engine).items()))
            out["unchanged"].append(len(passes) == poisoned_pass)  # a skipped first pass has no second
            out["counts"] = [regularizers.gnp.step_index, regularizers.gnp.penalty_steps, regularizers.step_index,
                             len(regularizers.clipper.history)]
        regularizers.step(lambda: closure(0))
        out["after skips" if poisoned else "fresh"] = _final_params(engine)
    out["same"] = all((out["fresh"][key] == value).all() for key, value in out.pop("after skips").items())
    del out["fresh"]
    return out


def _ranks_main(rank: int, world_size: int, checkpoint_dir: str) -> dict:
    from dropgrad_dist import prepare_regularizers

    out: dict = {}
    for name, stage, bf16, optimizer_name, clip, _, micro, options in CONFIGS:
        accelerator = _new_accelerator(stage, bf16, micro=micro, offload=options.get("offload", False))
        model = make_model()
        engine, optimizer = accelerator.prepare(model, make_optimizer(optimizer_name, model.parameters()))
        regularizers = prepare_regularizers(accelerator, engine, optimizer,
                                            dropgrad=dict(RATES, **options.get("dropgrad", {}), seed=SEED),
                                            clipping=_clipping(clip, options), restarts=options.get("restarts"))
        seen = _train(accelerator, engine, list(range(STEPS)), micro, overflow_at=options.get("overflow_at"))
        out[name] = {"grads": [_plain(grads) for grads in seen],
                     "params": _final_params(engine),
                     "step_index": regularizers.step_index, "optimizer": type(engine.optimizer).__name__}
    out.update(_penalized_runs())
    out["checkpoint"] = {stage: _resumes_exactly(stage, os.path.join(checkpoint_dir, f"zero{stage}"))
                         for stage in (2, 3)}
    out["refusals"] = _refusals()
    out["example"] = _example(os.path.join(checkpoint_dir, "example"))
    out["example_sam"] = _example(os.path.join(checkpoint_dir, "example_sam"), sam=0.05)
    return out


def _example(checkpoint_dir: str, sam: float | None = None) -> list[float]:
    """examples/deepspeed_zero.py's training, in this spawned run (a run of its own would import DeepSpeed again)."""
    import importlib.util

    from accelerate.state import AcceleratorState

    path = str(Path(__file__).resolve().parents[2] / "examples" / "deepspeed_zero.py")
    spec = importlib.util.spec_from_file_location("deepspeed_zero_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    AcceleratorState._reset_state()
    losses = example.train(checkpoint_dir, sam)
    torch.distributed.barrier()  # rank 0 writes the JSON
    assert os.path.exists(os.path.join(checkpoint_dir, "dropgrad_dist_state_0.json"))
    return losses


def _resumes_exactly(stage: int, checkpoint_dir: str) -> dict:
    """save_state after 2 steps, a 3rd step; a fresh engine loading the checkpoint takes the same 3rd step.

    With GNP, whose warmup ramps with its step count."""
    from dropgrad_dist import prepare_regularizers

    options = dict(dropgrad=dict(RATES, seed=SEED), clipping=dict(method="auto_clip", p_autoclip=0.5),
                   restarts=dict(first_restart_steps=3),  # its sums are saved after step 2 and restart at step 3
                   gnp=dict(alpha=0.5, r=0.05, warmup="lambda", warmup_steps=4))
    runs = []
    for resume in (False, True):
        accelerator = _new_accelerator(stage, False)
        model = make_model()
        engine, optimizer = accelerator.prepare(model, make_optimizer("adamw", model.parameters()))
        regularizers = prepare_regularizers(accelerator, engine, optimizer, **options)
        if resume:
            accelerator.load_state(checkpoint_dir)
            assert (regularizers.step_index, len(regularizers.clipper.history), regularizers.gnp.step_index,
                    regularizers.restarter.count) == (2, 2, 2, 2)
        else:
            _train(accelerator, engine, [0, 1], regularizers=regularizers)
            accelerator.save_state(checkpoint_dir)
        _train(accelerator, engine, [2], regularizers=regularizers)
        runs.append(_final_params(engine))
        assert regularizers.step_index == 3 and regularizers.restarter.restarts == 1
    return {"uninterrupted": runs[0], "resumed": runs[1],
            "files": sorted(name for name in os.listdir(checkpoint_dir) if name.startswith("dropgrad_dist"))}


def _refusals() -> dict:
    """What prepare_regularizers refuses under DeepSpeed, each message, and that nothing was hooked; then DropGrad
    alone on the two-group engine (DeepSpeed calls the client step once per group: one DropGrad step)."""
    from dropgrad_dist import prepare_regularizers

    messages = {}
    gnp = dict(alpha=0.5, r=0.05)
    # Refusals of the options need no engine of their own: the two-group engine serves them all.
    for engine_name, clipping, refused_options in (
            ("deepspeed_clipping", 1.0, {"deepspeed_clipping": {}}),
            ("groups", 0.0, {"clip_groups": {"clipping": dict(method="layer_wise", clipping_level=1.0)},
                             "gnp_groups": {"gnp": gnp},
                             "gnp_local": {"gnp": dict(gnp, perturbation="local")}})):
        accelerator = _new_accelerator(2, False, clipping)
        model = make_model()
        # two parameter groups, which DeepSpeed's ZeRO optimizer updates one by one
        groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
        engine, optimizer = accelerator.prepare(model, make_optimizer("sgd", groups if engine_name == "groups" else
                                                                      model.parameters()))
        for name, options in refused_options.items():
            with pytest.raises(ValueError) as refused:
                prepare_regularizers(accelerator, engine, optimizer, dropgrad=dict(RATES, seed=SEED), **options)
            assert "step" not in vars(engine.optimizer) and "step" not in vars(engine.optimizer.optimizer), name
            messages[name] = str(refused.value)
    # the loop's last engine: two groups
    regularizers = prepare_regularizers(accelerator, engine, optimizer, dropgrad=dict(RATES, seed=SEED))
    _train(accelerator, engine, list(range(STEPS)), record=False)
    messages["two_groups"] = {"step_index": regularizers.step_index, "params": _final_params(engine)}
    return messages


def _plain(tensors: dict[str, torch.Tensor]) -> dict:
    # numpy, not tensors: a tensor sent through the result queue lives in this process's shared memory.
    return {name: tensor.detach().float().numpy().copy() for name, tensor in tensors.items()}


def _compare(results: list[dict], name: str, expected: tuple, bf16: bool | str, zero_class: str,
             options: dict | None = None) -> None:
    """Every rank's masked gradients per update and final parameters against the one-process run."""
    expected_grads, expected_params = expected
    dropgrad = (options or {}).get("dropgrad", {})
    tolerance = dict(rtol=2e-2, atol=2e-2) if bf16 else dict(rtol=1e-5, atol=1e-6)
    # DropGrad's steps (not the one DeepSpeed skips on overflow), and those the client optimizer updates on (not
    # DropGrad's skipped steps).
    counted = STEPS - ("overflow_at" in (options or {}))
    skips = DropGrad(torch.optim.SGD([torch.zeros(1)], lr=0.1), 0.5, seed=SEED, **dropgrad)
    updated = [t for t in range(counted) if not skips.should_skip_step(t)]
    assert len(expected_grads) == len(updated), name
    for rank_result in results:
        got = rank_result[name]
        assert got["step_index"] == counted, name
        assert got["optimizer"] == zero_class, name
        assert len(got["grads"]) == len(updated), (name, got["optimizer"])  # one update per step (one group)
        for t, grads, want in zip(updated, got["grads"], expected_grads):
            for key, grad in grads.items():
                if dropgrad.get("full_update_drop"):  # the gradient is whole; the update is masked
                    torch.testing.assert_close(torch.from_numpy(grad), want[key], **tolerance, msg=f"{name} {t}")
                    continue
                grad = torch.from_numpy(grad)
                rate = 0.3 if key == "0.weight" else 0.5
                kept = keep_mask(grad.numel(), seed=SEED, step=t, key=key, rate=rate)
                # Bitwise masks: every dropped coordinate is zero; in fp32 exactly those (the gradients are
                # dense here), in bf16 a kept coordinate may round to zero.
                assert (grad[~kept] == 0).all(), (name, t, key)
                assert bf16 or (grad[kept] != 0).all(), (name, t, key)
                torch.testing.assert_close(grad, want[key], **tolerance, msg=f"{name} step {t} {key}")
        for key, param in got["params"].items():
            torch.testing.assert_close(torch.from_numpy(param), expected_params[key], **tolerance,
                                       msg=f"{name} {key}")


def test_zero_partitions_are_masked_as_one_process_masks(tmp_path):
    results = run_on_ranks(_ranks_main, 2, str(tmp_path), timeout=400, pg_timeout=120)
    for name, _, bf16, optimizer_name, clip, zero_class, _, options in CONFIGS:
        _compare(results, name, reference(optimizer_name, clip, options=options), bf16, zero_class, options)
    for name, _, bf16, optimizer_name, clip, zero_class, gnp, _ in GNP_CONFIGS:
        _compare(results, name, reference(optimizer_name, clip, gnp), bf16, zero_class)
        penalized = GradientNormPenalty(torch.optim.SGD(make_model().parameters(), lr=0.1), **gnp)
        expected_penalty_steps = sum(penalized.penalizes(t) for t in range(STEPS))
        for rank_result in results:
            assert rank_result[name]["gnp_steps"] == (STEPS, expected_penalty_steps), name
            # DeepSpeed counts steps, not passes, and steps its LR schedule once per step
            assert rank_result[name]["engine_steps"] == (STEPS, STEPS, STEPS), name
            assert rank_result[name]["state_linked"], name
            assert rank_result["outside"] and rank_result["replayed"]
            for skipped in rank_result["skipped"].values():
                assert skipped == {"unchanged": [True] * 4, "counts": [0, 0, 0, 0], "same": True}

    for rank_result in results:
        for stage, resumed in rank_result["checkpoint"].items():
            for key, param in resumed["uninterrupted"].items():
                assert (param == resumed["resumed"][key]).all(), (stage, key)  # exact resume
            assert resumed["files"] == ["dropgrad_dist_state_0.json", "dropgrad_dist_state_0_rank0.safetensors",
                                        "dropgrad_dist_state_0_rank1.safetensors"], stage
        refusals = rank_result["refusals"]
        assert refusals["two_groups"]["step_index"] == STEPS
        expected = reference("sgd", None)[1]
        for key, param in refusals["two_groups"]["params"].items():
            torch.testing.assert_close(torch.from_numpy(param), expected[key], rtol=1e-5, atol=1e-6, msg=key)
        assert "gradient_clipping=1.0" in refusals["deepspeed_clipping"] and "set gradient_clipping to 0" in \
            refusals["deepspeed_clipping"]
        assert "gnp (gradient norm penalty / SAM) with several parameter groups (or ZeRO-3 sub-groups) under the " \
            "ZeRO optimizer is not supported" in refusals["gnp_groups"]
        assert "perturbation='local' is not supported" in refusals["gnp_local"]
        assert "clipping with several parameter groups (or ZeRO-3 sub-groups) under the ZeRO optimizer is not " \
            "supported: DeepSpeed updates one group after another" in refusals["clip_groups"]
        for losses in (rank_result["example"], rank_result["example_sam"]):
            assert len(losses) == 4 and losses[-1] < 0.3 * losses[0]  # the example learns (with --sam too)


def test_offload_layouts_stepped_outside_the_client_optimizer_are_refused():
    """NVMe offload and partial offload (ratio < 1) need ops not built on CPU: their refusal, on ZeRO-3's flags."""
    from types import SimpleNamespace

    from dropgrad_dist.integrations.deepspeed import _check_offload

    _check_offload(SimpleNamespace(offload_optimizer=True, swap_optimizer=False, partial_offload=1.0))  # supported
    with pytest.raises(ValueError, match="offload_optimizer to nvme is not supported: the partitions are swapped"):
        _check_offload(SimpleNamespace(offload_optimizer=True, swap_optimizer=True, partial_offload=1.0))
    with pytest.raises(ValueError, match="ratio=0.5 is not supported: DeepSpeed steps the sub-groups kept on the GPU"):
        _check_offload(SimpleNamespace(offload_optimizer=True, swap_optimizer=False, partial_offload=0.5))
