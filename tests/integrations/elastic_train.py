"""Elastic training under ``torchrun --nproc_per_node 2 --max-restarts 1``, run by ``test_elastic.py``.

``python -m torch.distributed.run ... tests/integrations/elastic_train.py OUT``. Two runs advance step by
step side by side: the DDP hook under ``GNP(ClippedOptimizer(AdamW, AutoClip))`` and the FSDP2 wrapper
chain ``GNP(DropGrad(ClippedOptimizer(RestartingOptimizer(AdamW), AutoClip)))``. Every ``EVERY`` steps
each saves a DCP checkpoint (model, optimizer, ``RegularizerState``) into ``OUT/<layout>/step_<n>``; at
start each resumes from its newest complete checkpoint (one with DCP's ``.metadata``). With
``ELASTIC_KILL_STEP=k`` rank 1 kills itself with SIGKILL after step ``k`` in the first attempt only
(``OUT/killed`` marks it), and torchrun restarts the group. At the end every rank trains the same
runs again uninterrupted and rank 0 writes ``OUT/result.json``: whether the final parameters are
bitwise equal, per layout, and which attempt finished.
"""

import json
import os
import signal
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from dropgrad_dist import set_mask_backend
from dropgrad_dist.bench.checkpoint import TrainState
from tests.integrations.dcp_common import build, full_params, train

STEPS, EVERY = 8, 3
LAYOUTS = ("ddp", "fsdp")


def _latest(folder: str) -> int:
    done = [int(name.split("_")[1]) for name in os.listdir(folder) if name.startswith("step_")
            and os.path.exists(os.path.join(folder, name, ".metadata"))] if os.path.isdir(folder) else []
    return max(done, default=0)


def main(out: str) -> None:
    # Each attempt's keys under their own prefix: the next attempt never reads the killed one's addresses.
    store, rank, world = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt_{attempt}", store), rank=rank, world_size=world)
    torch.set_num_threads(1)
    set_mask_backend("eager")
    kill_step = int(os.environ.get("ELASTIC_KILL_STEP", "0"))
    marker = os.path.join(out, "killed")
    runs = {}
    for layout in LAYOUTS:
        model, chain, regularizers, _ = build(layout)
        app = {"train": TrainState(model, chain), "regularizers": regularizers}
        start = _latest(os.path.join(out, layout))
        if start:
            dcp.load(app, checkpoint_id=os.path.join(out, layout, f"step_{start}"))
        runs[layout] = (model, chain, app, start)
    for step in range(min(run[3] for run in runs.values()), STEPS):
        for layout, (model, chain, app, start) in runs.items():
            if step < start:
                continue
            train(model, chain, step, 1)
            if (step + 1) % EVERY == 0:
                dcp.save(app, checkpoint_id=os.path.join(out, layout, f"step_{step + 1}"))
        if step + 1 == kill_step and rank == 1 and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
    equal = {}
    for layout, (model, *_rest) in runs.items():
        reference, chain, _, _ = build(layout)
        train(reference, chain, 0, STEPS)
        resumed, expected = full_params(model), full_params(reference)
        equal[layout] = all(torch.equal(resumed[k], expected[k]) for k in expected)
    if rank == 0:
        with open(os.path.join(out, "result.json"), "w") as file:
            json.dump({"equal": equal, "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
                       "resumed_from": {layout: run[3] for layout, run in runs.items()}}, file)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # Everything is written and the process group destroyed; a restarted attempt still aborted at exit in
    # CI (guarantees §8: a worker thread taking the GIL during finalization), so skip finalization.
    from dropgrad_dist.core.collectives import exit_skipping_finalization

    exit_skipping_finalization(0)
