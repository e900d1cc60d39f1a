"""Every gradient is masked exactly once, on its final value, with the rate last assigned (one process).

The multi-rank halves (the DDP hook's routes, accumulation and rates under DDP) are in
``test_mask_once_dist.py``.
"""

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from dropgrad_dist import (
    ClippedOptimizer,
    DropGrad,
    DropGradHookState,
    GradientClipper,
    GradientNormPenalty,
    Restarter,
    RestartingOptimizer,
    keep_mask,
    prepare_regularizers,
)

from ..nets import seeded_net

N = 64  # coordinates of the test parameter: enough that a wrong mask cannot pass by chance


class Weights(nn.Module):
    """``loss = sum(w * x)``: the gradient is ``x`` exactly, so masks are read off the gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(N))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight * x).sum()


def expected_grad(rate: float, step: int = 0, seed: int = 0, value: float = 1.0) -> torch.Tensor:
    """The gradient ``value`` (every coordinate) masked once: ``keep * value / (1 - p)``."""
    keep = keep_mask(N, seed=seed, step=step, key="weight", rate=rate)
    return torch.where(keep, value / (1.0 - rate), 0.0)


# -- item 1: a second DropGrad on the same gradients is refused, whatever wraps the first --------

def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize("middle", ["clipping", "gnp", "restarts", "nothing"])
def test_dropgrad_around_a_chain_holding_dropgrad_is_refused(middle):
    model = seeded_net()
    inner = DropGrad(_sgd(model), 0.5, model=model, seed=1)
    chain = {"clipping": lambda: ClippedOptimizer(inner, GradientClipper("norm", 1.0)),
             "gnp": lambda: GradientNormPenalty(inner, 0.5, 0.1, model=model),
             "restarts": lambda: RestartingOptimizer(inner, Restarter(first_restart_steps=2), model),
             "nothing": lambda: inner}[middle]()
    with pytest.raises(ValueError, match="already a DropGrad: its gradients would be masked twice"):
        DropGrad(chain, 0.5, model=model, seed=2)


def _accelerated(gradient_accumulation_steps: int = 1, model: nn.Module | None = None):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=gradient_accumulation_steps)
    accelerator.free_memory()
    model = model if model is not None else seeded_net()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))
    return accelerator, model, optimizer


@pytest.fixture
def restore_accelerator():
    yield
    Accelerator(cpu=True, gradient_accumulation_steps=1)  # the shared GradientState: back to no accumulation


def test_prepare_regularizers_twice_and_dropgrad_around_the_accelerated_optimizer_are_refused():
    accelerator, model, optimizer = _accelerated()
    prepare_regularizers(accelerator, model, optimizer, dropgrad=dict(drop_rate=0.5),
                         clipping=dict(method="norm"))
    with pytest.raises(ValueError, match="prepare_regularizers was already applied to this optimizer"):
        prepare_regularizers(accelerator, model, optimizer, dropgrad=dict(drop_rate=0.5), clipping=dict(method="norm"))
    with pytest.raises(ValueError, match="already a DropGrad"):  # AcceleratedOptimizer > Clipped > DropGrad
        DropGrad(optimizer, 0.5, model=model)


# -- item 2: accumulated micro-batches are masked once, on the final gradient -------------------

@pytest.mark.parametrize("between", ["clip_grad_norm_", "gradient_norm"])
def test_accelerate_accumulation_masks_the_final_gradient_once(between, restore_accelerator):
    """Two micro-batches of gradient 1 (Accelerate divides each by 2), a masking call after each:
    the step sees ``keep * 1 / (1 - p)``, i.e. {0, 2.0} at p = 0.5, not {0.5, 1.5}."""
    accelerator, model, optimizer = _accelerated(2, Weights())
    regularizers = prepare_regularizers(accelerator, model, optimizer, dropgrad=dict(drop_rate=0.5))
    stepped = None
    for _ in range(2):
        with accelerator.accumulate(model):
            accelerator.backward(model(torch.ones(N)))
            if between == "clip_grad_norm_":
                accelerator.clip_grad_norm_(model.parameters(), 1e9)  # never clips: only the masking matters
            else:
                regularizers.gradient_norm()
            optimizer.step()
            if accelerator.sync_gradients:
                stepped = model.weight.grad.clone()
            optimizer.zero_grad()
    assert regularizers.step_index == 1
    torch.testing.assert_close(stepped, expected_grad(0.5), rtol=0, atol=1e-6)


def test_one_process_no_accumulation_reference_gives_the_same_gradient():
    model = Weights()
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.0), 0.5, model=model)
    model(torch.ones(N)).backward()
    opt.step()
    torch.testing.assert_close(model.weight.grad, expected_grad(0.5), rtol=0, atol=1e-6)


def test_a_backward_into_an_already_masked_gradient_raises_at_the_step():
    """Plain DropGrad: mask_gradients_() between micro-batches cannot be undone, so the step refuses."""
    model = Weights()
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.0), 0.5, model=model)
    model(torch.ones(N)).backward()
    opt.mask_gradients_()
    model(torch.ones(N)).backward()  # accumulates into the masked gradient
    with pytest.raises(RuntimeError, match="accumulated into the gradient of 'weight' after mask_gradients_"):
        opt.step()
    opt.zero_grad()
    model(torch.ones(N)).backward()
    opt.mask_gradients_()  # after the last backward: fine
    opt.step()
    assert opt.step_index == 1  # the refused step did not count
    torch.testing.assert_close(model.weight.grad, expected_grad(0.5, step=0), rtol=0, atol=1e-6)


# -- item 3: drop_rate is assignable, validated, and used from the next step, in every layout --------

def test_drop_rate_assigned_on_the_accelerated_optimizer_reaches_dropgrad():
    accelerator, model, optimizer = _accelerated(1, Weights())
    regularizers = prepare_regularizers(accelerator, model, optimizer, dropgrad=dict(drop_rate=0.1))
    optimizer.drop_rate = 0.9
    assert optimizer.drop_rate == 0.9 and regularizers.dropgrad.drop_rate == 0.9
    accelerator.backward(model(torch.ones(N)))
    optimizer.step()
    torch.testing.assert_close(model.weight.grad, expected_grad(0.9), rtol=0, atol=1e-5)
    optimizer.zero_grad()
    regularizers.drop_rate = 0.5
    accelerator.backward(model(torch.ones(N)))
    optimizer.step()
    torch.testing.assert_close(model.weight.grad, expected_grad(0.5, step=1), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="drop_rate must be a number in \\[0, 1\\]"):
        optimizer.drop_rate = 1.5
    assert optimizer.drop_rate == 0.5


def test_hook_state_drop_rate_is_assignable_and_validated():
    state = DropGradHookState(Weights(), 0.5)
    state.drop_rate = 0.25
    assert state.drop_rate == 0.25 and state.agreement_fields("dropgrad_hook")["rates"]["drop_rate"] == 0.25
    with pytest.raises(ValueError, match="drop_rate must be a number in \\[0, 1\\]"):
        state.drop_rate = -0.1
    assert state.drop_rate == 0.25


def test_a_second_hook_state_claiming_masked_parameters_is_refused():
    """The registry behind the hook's claims: a live owner keeps its parameters; a gone one frees them."""
    from dropgrad_dist.core.ownership import claim_for_hook, hook_state_masking

    class Owner:  # the one method the registry asks of a DropGradHookState
        def __init__(self, live: bool) -> None:
            self.live = live

        def masks_in_ddp(self) -> bool:
            return self.live

    param = nn.Parameter(torch.zeros(3))
    first, second = Owner(True), Owner(True)
    claim_for_hook([param], first)
    claim_for_hook([param], first)  # claiming again (every bucket of the first round) is fine
    assert hook_state_masking([param]) is first
    with pytest.raises(RuntimeError, match="already masked by another DropGradHookState"):
        claim_for_hook([param], second)
    first.live = False  # e.g. its DDP model is gone
    claim_for_hook([param], second)
    assert hook_state_masking([param]) is second
