"""A finished DDP run with the hook exits 0 (issue 28, item 5): no gloo worker thread is left holding
a callback of the hook when the interpreter finalizes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
RUNS = 6  # each run of the forced race aborted 3 times in 8 without the exit wait


def _exit_codes(runs: int, *hooks: str) -> list[list[int]]:
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("exit_runs.py")), str(runs), *hooks],
                          capture_output=True, text=True, timeout=240, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["codes"]


@pytest.mark.distributed
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="the forced race pins each rank to its own CPU (Linux, 2 CPUs)")
def test_finished_ddp_runs_with_the_hook_exit_0_when_the_last_worker_is_starved():
    codes = _exit_codes(RUNS, "dense")
    aborted = [run for run, pair in enumerate(codes) if pair != [0, 0]]
    assert not aborted, f"runs {aborted} of {RUNS} did not exit 0 (-6: SIGABRT at interpreter exit): {codes}"


def test_then_waits_at_exit_for_callbacks_whose_future_completed():
    # A completed future's callback runs inline; one whose future never completes is not waited for.
    from dropgrad_dist.core.collectives import _Chains
    chains = _Chains()
    done, never = torch.futures.Future(), torch.futures.Future()
    done.set_result(torch.ones(2))
    assert torch.equal(chains.add(done, lambda fut: fut.value() * 2).wait(), torch.full((2,), 2.0))
    pending = chains.add(never, lambda fut: fut.value())
    assert chains.pending() == 0  # the first was released where it ran; the second's future is not done
    chains.wait_for_workers(timeout=0.05)  # returns at once: nothing completed is held
    never.set_result(torch.zeros(1))
    assert pending.done() and chains.pending() == 0
