"""Under Accelerate's DDP (the hook layout, 2 gloo ranks) accumulation and rate changes give what one process gives.

One spawn runs every configuration; each rank returns the gradients it stepped on, compared here
with the one-process values of ``test_mask_once.py``.
"""

import pytest
import torch
from torch import nn

from dropgrad_dist import prepare_regularizers
from dropgrad_dist.testing import run_on_ranks

from .test_mask_once import N, Weights, expected_grad

pytestmark = pytest.mark.distributed  # every test here starts several processes


def _accelerated(gradient_accumulation_steps: int):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=gradient_accumulation_steps)
    assert accelerator.distributed_type == DistributedType.MULTI_CPU
    accelerator.free_memory()
    model = Weights()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))
    return accelerator, model, optimizer


def _weight(model: nn.Module) -> torch.Tensor:
    return model.module.weight if hasattr(model, "module") else model.weight


def _accumulated(between: str) -> torch.Tensor:
    """Two micro-batches of gradient 1 with a masking call after each; the gradient at the step."""
    accelerator, model, optimizer = _accelerated(2)
    regularizers = prepare_regularizers(accelerator, model, optimizer, dropgrad=dict(drop_rate=0.5))
    assert regularizers.mode == "ddp_hook"
    stepped = None
    for _ in range(2):
        with accelerator.accumulate(model):
            accelerator.backward(model(torch.ones(N)))
            if between == "clip_grad_norm_":
                accelerator.clip_grad_norm_(model.parameters(), 1e9)
            else:
                regularizers.gradient_norm()
            optimizer.step()
            if accelerator.sync_gradients:
                stepped = _weight(model).grad.clone()
            optimizer.zero_grad()
    return stepped


def _rate_assigned_on_the_accelerated_optimizer() -> list[torch.Tensor]:
    accelerator, model, optimizer = _accelerated(1)
    regularizers = prepare_regularizers(accelerator, model, optimizer, dropgrad=dict(drop_rate=0.1))
    stepped = []
    for rate in (0.9, 0.5):
        if rate == 0.9:
            optimizer.drop_rate = rate  # the README's assignment
        else:
            regularizers.dropgrad.drop_rate = rate  # the hook state's own setter
        accelerator.backward(model(torch.ones(N)))
        optimizer.step()
        stepped.append(_weight(model).grad.clone())
        optimizer.zero_grad()
    return stepped


def _all(rank: int, world_size: int) -> dict:
    # Plain lists: tensors would travel through shared memory that the exiting rank releases.
    return {"clip_grad_norm_": _accumulated("clip_grad_norm_").tolist(),
            "gradient_norm": _accumulated("gradient_norm").tolist(),
            "rates": [grad.tolist() for grad in _rate_assigned_on_the_accelerated_optimizer()]}


def test_hook_layout_accumulation_and_assigned_rates_match_one_process():
    results = run_on_ranks(_all, 2, timeout=180, pg_timeout=60)
    for result in results:
        for between in ("clip_grad_norm_", "gradient_norm"):  # {0, 2.0}: masked once, on the final gradient
            torch.testing.assert_close(torch.tensor(result[between]), expected_grad(0.5), rtol=0, atol=1e-6)
        first, second = map(torch.tensor, result["rates"])
        torch.testing.assert_close(first, expected_grad(0.9), rtol=0, atol=1e-5)
        torch.testing.assert_close(second, expected_grad(0.5, step=1), rtol=0, atol=1e-6)
