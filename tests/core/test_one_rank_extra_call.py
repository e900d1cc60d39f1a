"""One rank calling the optimizer step or a clip once more than the others: handled, or an error within seconds.

A rank that clips the same gradients twice sends nothing more (the repeated clip returns the first
result), so the ranks neither abort nor diverge. A rank that steps a ``DropGrad`` twice on the same
gradients raises at once, before any collective, instead of leaving the others waiting for the
process-group timeout.
"""

import time

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dropgrad_dist import DropGrad, GradientClipper
from dropgrad_dist.testing import run_on_ranks

from ..nets import seeded_net

PG_TIMEOUT = 30.0  # seconds; every outcome must arrive well inside it


def _batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(100 * step + rank))


def _layout(name: str) -> nn.Module:
    model = seeded_net()
    if name == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
        return model
    return DDP(model)


def _full(model: nn.Module) -> list[float]:
    values = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]
    return torch.cat([v.reshape(-1) for v in values]).tolist()


def _clip_twice_on_one_rank(rank: int, world_size: int) -> dict:
    out = {}
    for layout in ("ddp", "fsdp2"):
        for method in ("norm", "auto_clip"):
            model = _layout(layout)
            clipper = GradientClipper(method, 0.05, model=model)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            stats = []
            for step in range(3):
                model(_batch(rank, step)).square().mean().backward()
                stats.append(clipper.clip_(model.parameters()))
                if (rank, step) == (1, 1):  # one rank clips the same gradients again
                    assert clipper.clip_(model.parameters()) == stats[-1]
                opt.step()
                opt.zero_grad()
            out[f"{layout} {method}"] = {"params": _full(model), "norms": [s["norm"] for s in stats],
                                         "steps": clipper.step_index}
    return out


@pytest.mark.distributed
def test_a_rank_clipping_twice_neither_aborts_nor_diverges():
    start = time.perf_counter()
    results = run_on_ranks(_clip_twice_on_one_rank, 2, timeout=120, pg_timeout=PG_TIMEOUT)
    assert time.perf_counter() - start < 4 * PG_TIMEOUT
    assert results[0] == results[1] and len(results[0]) == 4
    assert all(result["steps"] == 3 for result in results[0].values())


def _dropgrad_double_step(rank: int, world_size: int, layout: str) -> None:
    model = _layout(layout)
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), 0.5, model=model)
    for step in range(3):
        model(_batch(rank, step)).square().mean().backward()
        opt.step()
        if (rank, step) == (1, 0):  # this rank steps the same gradients again
            opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("layout", ["fsdp2", "ddp"])
@pytest.mark.distributed
def test_a_rank_stepping_dropgrad_twice_raises_within_seconds(layout):
    # The wall time includes spawning both ranks (seconds on a loaded machine): a long process-group
    # timeout keeps "the error came well before the timeout" meaningful and the bound robust.
    pg_timeout = 120.0
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="rank 1 of 2 failed:(.|\n)*DropGrad.step\\(\\) called again \\(step 1\\) "
                                           "on the gradients that step 0 already masked"):
        run_on_ranks(_dropgrad_double_step, 2, layout, timeout=240, pg_timeout=pg_timeout)
    assert time.perf_counter() - start < pg_timeout / 2


def test_one_process_double_step_raises_and_a_new_backward_clears_it():
    model = seeded_net()
    opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), 0.5, model=model)
    x = torch.randn(4, 6)
    model(x).square().mean().backward()
    opt.step()
    with pytest.raises(RuntimeError, match="called again"):
        opt.step()
    assert opt.step_index == 1
    model(x).square().mean().backward()  # accumulates: new gradient values, a new step
    opt.step()
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
    assert opt.step_index == 3


def _skip_or_double(rank: int, world_size: int) -> dict:
    """One rank skips one step; the check launched by every rank's forward meets its stale step count."""
    out = {}
    for layout in ("fsdp2", "ddp"):
        for accumulate in (1, 2):
            model = _layout(layout)
            opt = DropGrad(torch.optim.SGD(model.parameters(), lr=0.1), 0.5, model=model)
            start = time.perf_counter()
            try:
                for step in range(4):
                    for micro in range(accumulate):
                        model(_batch(rank, 10 * step + micro)).square().mean().backward()
                    if (rank, step) != (1, 1):
                        opt.step()
                    opt.zero_grad()
                error = None
            except Exception as err:  # noqa: BLE001 - the expected error, or a wrong one the test names
                error = f"{type(err).__name__}: {err}"
            out[f"{layout} x{accumulate}"] = (error, time.perf_counter() - start)
    out["ddp: clip_ again after changing the gradients"] = _clip_again_after_a_change(rank)
    return out


def _clip_again_after_a_change(rank: int) -> tuple[str | None, float]:
    """Under DDP clip_ sends nothing with model=: one rank's extra clip is named at the next forward."""
    model = _layout("ddp")
    clipper = GradientClipper("norm", 0.05, model=model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    start = time.perf_counter()
    try:
        for step in range(3):
            model(_batch(rank, step)).square().mean().backward()
            clipper.clip_(model.parameters())
            if (rank, step) == (1, 0):
                for param in model.parameters():
                    param.grad.mul_(0.5)  # a changed gradient: clipping it again is real work
                clipper.clip_(model.parameters())
            opt.step()
            opt.zero_grad()
    except Exception as err:  # noqa: BLE001 - the expected error, or a wrong one the test names
        return f"{type(err).__name__}: {err}", time.perf_counter() - start
    return None, time.perf_counter() - start


@pytest.mark.distributed
def test_a_skipped_step_or_an_extra_clip_on_one_rank_is_named_on_every_rank_within_seconds():
    results = run_on_ranks(_skip_or_double, 2, timeout=180, pg_timeout=PG_TIMEOUT)
    for rank, result in enumerate(results):
        assert len(result) == 5
        for config, (error, seconds) in result.items():
            expected = ("RankDisagreement: GradientClipper: ranks disagree on 'clip_() calls since the last forward' "
                        "(ranks [0] vs [1])" if "clip_" in config else
                        "RankDisagreement: DropGrad: ranks disagree on 'step_index' (ranks [0] vs [1])")
            assert error is not None and error.startswith(expected), (rank, config, error)
            assert seconds < PG_TIMEOUT / 4, (rank, config, seconds)
