"""A failed accelerator.load_state changes nothing, on every rank, in every distributed type.

Accelerate loads an FSDP model and optimizer before its load pre-hooks run, and under DDP one
rank's bad restart sums would stop that rank while the others load: the regularizers' files are
validated on every rank, and the ranks agree, before Accelerate loads anything.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from torch import nn

from dropgrad_dist import enable_fsdp_on_cpu, prepare_regularizers, set_mask_backend
from dropgrad_dist.layout.shards import local_tensor
from dropgrad_dist.testing import run_on_ranks

from ..fsdp_common import batch, make_model

pytestmark = pytest.mark.distributed  # every test here starts several processes

PG_TIMEOUT = 30.0  # seconds: an error must arrive well inside it, not as a collective timeout


def _accelerator(kind: str):
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    accelerator = Accelerator(cpu=True)
    if kind == "fsdp2":
        enable_fsdp_on_cpu(accelerator, FullyShardedDataParallelPlugin(fsdp_version=2))
    return accelerator


def _step(accelerator, model, optimizer, step: int, rank: int, world_size: int) -> None:
    x, y = batch(step)
    per = x.shape[0] // world_size
    loss = nn.functional.mse_loss(model(x[rank * per:(rank + 1) * per]), y[rank * per:(rank + 1) * per])
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()


def _snapshot(model, optimizer, handle) -> list:
    params = [local_tensor(p.detach()).clone() for p in model.parameters()]
    moments = [local_tensor(value).clone() for state in optimizer.optimizer.state.values()
               for value in state.values() if torch.is_tensor(value)]
    sums = [t.clone() for t in handle.restart_sums().values()]
    return [params, moments, sums, json.dumps(handle.state_dict(), sort_keys=True)]


def _same(a: list, b: list) -> bool:
    tensors_equal = all(len(x) == len(y) and all(torch.equal(s, t) for s, t in zip(x, y)) for x, y in zip(a[:3], b[:3]))
    return tensors_equal and a[3] == b[3]


def _corrupt_and_load(rank: int, world_size: int, kind: str, ckpt_dir: str, corrupt: str) -> dict:
    import torch.distributed as dist

    set_mask_backend("eager")
    accelerator = _accelerator(kind)
    model = make_model()
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=0.01))
    handle = prepare_regularizers(accelerator, model, optimizer, dropgrad=dict(drop_rate=0.3, seed=3),
                                  clipping=dict(method="auto_clip", p_autoclip=0.5),
                                  restarts=dict(first_restart_steps=4, restart_coeff=2.0, max_steps=100))
    for step in range(2):
        _step(accelerator, model, optimizer, step, rank, world_size)
    accelerator.save_state(ckpt_dir)
    accelerator.wait_for_everyone()
    _step(accelerator, model, optimizer, 2, rank, world_size)  # now every state differs from the checkpoint
    if corrupt == "json" and rank == 0:
        path = os.path.join(ckpt_dir, "dropgrad_dist_state_0.json")
        state = json.loads(open(path).read())
        state["dropgrad"]["step_index"] = -1
        open(path, "w").write(json.dumps(state))
    if corrupt == "rank1_sums" and rank == 1:
        from safetensors.torch import load_file, save_file

        path = os.path.join(ckpt_dir, "dropgrad_dist_state_0_rank1.safetensors")
        save_file({k: v.to(torch.int64) for k, v in load_file(path).items()}, path)
    dist.barrier()
    before = _snapshot(model, optimizer, handle)
    start = time.monotonic()
    try:
        accelerator.load_state(ckpt_dir)
        error = None
    except ValueError as err:
        error = str(err)
    elapsed = time.monotonic() - start
    unchanged = _same(_snapshot(model, optimizer, handle), before)
    # The run goes on after a refused load: one more step runs on every rank (no rank left behind).
    _step(accelerator, model, optimizer, 3, rank, world_size)
    return {"error": error, "unchanged": unchanged, "seconds": elapsed, "type": str(accelerator.distributed_type)}


@pytest.mark.parametrize("kind, corrupt, wants", [
    ("fsdp2", "json", ["field 'step_index' must be an int", "field 'step_index' must be an int"]),
    ("ddp", "rank1_sums", ["another rank refused", "dtype torch.int64"]),
], ids=["fsdp2-json", "ddp-one-ranks-sums"])
def test_a_refused_checkpoint_changes_nothing_on_any_rank(kind, corrupt, wants, tmp_path):
    results = run_on_ranks(_corrupt_and_load, 2, kind, str(tmp_path / "ckpt"), corrupt, pg_timeout=PG_TIMEOUT,
                           timeout=240)
    want_type = "DistributedType.FSDP" if kind == "fsdp2" else "DistributedType.MULTI_CPU"
    for rank, (result, want) in enumerate(zip(results, wants)):
        assert result["type"] == want_type
        assert result["error"] is not None and want in result["error"], (rank, result)
        assert result["unchanged"], (rank, result)  # params, AdamW moments, restart sums, regularizer state
        assert result["seconds"] < PG_TIMEOUT / 3, (rank, result)
