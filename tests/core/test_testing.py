"""The rank launcher used by the multi-process tests really runs collectives across processes."""

import pytest
import torch
import torch.distributed as dist

from dropgrad_dist.testing import run_on_ranks

pytestmark = pytest.mark.distributed  # every test here starts several processes


def _sum_ranks(rank: int, world_size: int, offset: int) -> tuple[int, float]:
    value = torch.tensor([float(rank + offset)])
    dist.all_reduce(value)
    return dist.get_rank(), value.item()


def _fail_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom on rank one")


def test_run_on_ranks_all_reduces_across_real_processes():
    assert run_on_ranks(_sum_ranks, 2, 10) == [(0, 21.0), (1, 21.0)]


def test_run_on_ranks_reports_the_failing_rank():
    with pytest.raises(RuntimeError, match="rank 1 of 2 failed(.|\n)*boom on rank one"):
        run_on_ranks(_fail_on_rank_one, 2, timeout=60)
