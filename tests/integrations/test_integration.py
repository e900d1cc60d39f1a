"""prepare_dropgrad in one process: the mode it picks, its handle, and the setups it refuses."""

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from dropgrad_dist import DropGrad, prepare_dropgrad


def _prepared():
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    return accelerator, model, optimizer


def test_single_process_gets_the_step_wrapper_and_a_checkpointable_handle():
    accelerator, model, optimizer = _prepared()
    handle = prepare_dropgrad(accelerator, model, optimizer, drop_rate=0.25, params={"2.bias": 0.0}, seed=7)
    assert handle.mode == "wrapper" and isinstance(optimizer.optimizer, DropGrad)
    for _ in range(2):
        accelerator.backward(model(torch.randn(5, 4)).square().mean())
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    assert handle.step_index == 2
    assert handle.metrics() == {"drop_rate": 0.25, "kept_fraction": 0.75}
    saved = handle.state_dict()
    handle.target.step_index = 0
    handle.load_state_dict(saved)
    assert handle.step_index == 2 and saved["dropgrad"]["config"]["seed"] == 7


def test_refuses_unprepared_optimizers_and_unsupported_setups(monkeypatch):
    accelerator, model, optimizer = _prepared()
    with pytest.raises(TypeError, match="optimizer must be the optimizer returned by accelerator.prepare"):
        prepare_dropgrad(accelerator, model, optimizer.optimizer, drop_rate=0.1)
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.MEGATRON_LM))
    with pytest.raises(ValueError, match="does not support Accelerate's .*MEGATRON_LM"):
        prepare_dropgrad(accelerator, model, optimizer, drop_rate=0.1)
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.DEEPSPEED))
    with pytest.raises(ValueError, match="model must be the DeepSpeedEngine"):
        prepare_dropgrad(accelerator, model, optimizer, drop_rate=0.1)


def test_checkpoint_from_another_mode_is_refused():
    accelerator, model, optimizer = _prepared()
    handle = prepare_dropgrad(accelerator, model, optimizer, drop_rate=0.1)
    with pytest.raises(ValueError, match="saved with DropGrad as 'ddp_hook'"):
        handle.load_state_dict({"mode": "ddp_hook", "state": {}})


def test_one_entry_point_masks_then_clips_then_steps_then_restarts(tmp_path):
    """prepare_regularizers in one process equals the hand-built chain DropGrad(Clipped(Restarting(opt)))."""
    from dropgrad_dist import ClippedOptimizer, GradientClipper, Restarter, RestartingOptimizer, prepare_regularizers

    accelerator, model, optimizer = _prepared()
    handle = prepare_regularizers(accelerator, model, optimizer, dropgrad=dict(drop_rate=0.3, seed=2),
                                  clipping=dict(method="auto_clip", p_autoclip=0.5),
                                  restarts=dict(first_restart_steps=3))
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    base = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    chain = DropGrad(ClippedOptimizer(RestartingOptimizer(base, Restarter(3), reference),
                                      GradientClipper("auto_clip", p_autoclip=0.5)), 0.3, seed=2, model=reference)
    for step in range(8):  # restarts after steps 3 and 7; one snapshot summed since
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(step))
        accelerator.backward(model(x).square().mean())
        optimizer.step()
        optimizer.zero_grad()
        reference(x).square().mean().backward()
        chain.step()
        chain.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    assert handle.metrics()["restarts"] == 2.0 and handle.clipper.step_index == 8
    with pytest.raises(RuntimeError, match="accelerator.clip_grad_norm_ would clip a second time"):
        accelerator.clip_grad_norm_(model.parameters(), 1.0)

    accelerator.save_state(str(tmp_path / "ckpt"))
    written = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("dropgrad_dist"))
    assert written == ["dropgrad_dist_state_0.json", "dropgrad_dist_state_0_rank0.safetensors"]
    before = (handle.clipper.state_dict(), handle.restarter.count, [s.clone() for s in handle.restarter._sums])
    handle.clipper.history.append(123.0)
    handle.restarter.count = 0
    accelerator.load_state(str(tmp_path / "ckpt"))
    assert handle.clipper.state_dict() == before[0] and handle.restarter.count == before[1]
    assert all(torch.equal(a, b) for a, b in zip(handle.restarter._sums, before[2]))

    marker = tmp_path / "pwned"
    payload = __import__("pickle").dumps(_Payload(str(marker)))
    for name in written:  # every file the regularizers write
        original = (tmp_path / "ckpt" / name).read_bytes()
        (tmp_path / "ckpt" / name).write_bytes(payload)
        with pytest.raises(ValueError, match="is not a (JSON|safetensors) checkpoint"):
            accelerator.load_state(str(tmp_path / "ckpt"))
        assert not marker.exists()
        (tmp_path / "ckpt" / name).write_bytes(original)


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_prepare_regularizers_refuses_unknown_options():
    from dropgrad_dist import prepare_regularizers

    accelerator, model, optimizer = _prepared()
    with pytest.raises(ValueError, match="dropgrad: unknown option\\(s\\) \\['rate'\\]"):
        prepare_regularizers(accelerator, model, optimizer, dropgrad=dict(rate=0.1))
    with pytest.raises(ValueError, match="method \\(clipping_type\\) must be one of"):
        prepare_regularizers(accelerator, model, optimizer, clipping=dict(method="gradient"))


def test_gnp_through_the_entry_point_accumulates_inside_its_closure(tmp_path):
    """regularizers.step(closure) with micro-batches (no_sync on all but the last) equals the whole-batch chain."""
    from dropgrad_dist import ClippedOptimizer, GradientClipper, GradientNormPenalty, prepare_regularizers

    accelerator, model, optimizer = _prepared()
    handle = prepare_regularizers(accelerator, model, optimizer, dropgrad=dict(drop_rate=0.3, seed=2),
                                  clipping=dict(method="norm", clipping_level=0.5),
                                  gnp=dict(alpha=0.7, r=0.05, warmup="lambda", warmup_steps=2))
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    chain = GradientNormPenalty(
        DropGrad(ClippedOptimizer(torch.optim.AdamW(reference.parameters(), lr=1e-2), GradientClipper("norm", 0.5)),
                 0.3, seed=2, model=reference), alpha=0.7, r=0.05, warmup="lambda", warmup_steps=2, model=reference)
    for step in range(4):
        x = torch.randn(6, 4, generator=torch.Generator().manual_seed(step))

        def micro_batches():
            with accelerator.no_sync(model):
                accelerator.backward(model(x[:3]).square().mean() / 2)
            accelerator.backward(model(x[3:]).square().mean() / 2)
            return torch.tensor(0.0)

        def whole():
            loss = reference(x).square().mean()
            loss.backward()
            return loss

        handle.step(micro_batches)
        optimizer.zero_grad()
        chain.step(whole)
        chain.zero_grad()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert handle.gnp.step_index == 4 and handle.metrics()["gnp_alpha"] == 0.7
    with pytest.raises(ValueError, match=r"needs a closure .* regularizers\.step\(closure\)"):
        optimizer.step()  # the AcceleratedOptimizer's bare step: the message names the call to make
    accelerator.save_state(str(tmp_path / "ckpt"))
    handle.gnp.step_index = 0
    accelerator.load_state(str(tmp_path / "ckpt"))
    assert handle.gnp.step_index == 4


def test_full_update_drop_and_layer_wise_clipping_through_the_entry_point_or_refused_under_ddp(monkeypatch):
    """One process: the wrapper's full update drop and step skipping with layer-wise clipping equal the
    hand-built chain bitwise. Under DDP the hook masks inside the all-reduce, so both are refused."""
    from dropgrad_dist import ClippedOptimizer, GradientClipper, prepare_regularizers

    options = dict(drop_rate=0.3, full_update_drop=True, step_skip_rate=0.3, seed=4)
    accelerator, model, optimizer = _prepared()
    prepare_regularizers(accelerator, model, optimizer, dropgrad=options,
                         clipping=dict(method="layer_wise", clipping_level=0.05))
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    chain = DropGrad(ClippedOptimizer(torch.optim.AdamW(reference.parameters(), lr=1e-2),
                                      GradientClipper("layer_wise", 0.05)), **options, model=reference)
    plain = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    plain.load_state_dict(reference.state_dict())
    plain_optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    for step in range(6):
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(step))
        accelerator.backward(model(x).square().mean())
        optimizer.step()
        optimizer.zero_grad()
        for net, stepper in ((reference, chain), (plain, plain_optimizer)):
            net(x).square().mean().backward()
            stepper.step()
            stepper.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))

    accelerator, model, optimizer = _prepared()
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.MULTI_CPU))
    for option in (dict(full_update_drop=True), dict(step_skip_rate=0.2)):
        with pytest.raises(ValueError, match="full_update_drop and step_skip_rate need the step wrapper; under DDP"):
            prepare_regularizers(accelerator, model, optimizer, dropgrad=dict(drop_rate=0.1, **option))
