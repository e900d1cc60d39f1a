"""Runs a short 2-rank gloo DDP script many times and reports how each rank's process exited.

Usage: ``python exit_runs.py RUNS HOOK...`` (HOOK: ``dense``, ``compact`` or ``none``; run ``i`` uses
``HOOKS[i % len(HOOKS)]``); prints one JSON line ``{"codes": [[rank0, rank1], ...]}`` (negative:
killed by that signal).

The script is issue 28's: a 12->33->5 MLP, 3 SGD steps, ``DropGradHookState(ddp, drop_rate=0.5,
seed=7).register()``, then one more backward and a plain end of script (no
``destroy_process_group``). torch is imported once; every run forks its two ranks, and each rank
ends with a normal interpreter exit.

The race is forced instead of waited for (a loaded machine loses it about one run in thirty):
each rank's threads share one CPU with a busy process, and before the last backward gloo's worker
threads drop to nice 19 and the switch interval grows, so the worker that completes the last
bucket is starved while the main thread ends the script right after that backward (its last
statement) and enters finalization. Without the exit wait in ``core/collectives.py``, 3 runs in 8 aborted so.
"""

import gc
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time

import torch
import torch._dynamo  # noqa: F401  (DDP imports it on first use: once here, not in every forked rank)
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from dropgrad_dist import DropGradHookState


def _starve_other_threads() -> None:
    # A thread waiting for the GIL then never asks the main thread to drop it.
    sys.setswitchinterval(1000.0)
    main = threading.get_native_id()
    for tid in os.listdir("/proc/self/task"):
        if int(tid) != main:
            os.setpriority(os.PRIO_PROCESS, int(tid), 19)


_SCRIPT_GLOBALS: list[object] = []  # what a script's module globals hold until finalization


def _rank(rank: int, store: str, hook: str) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[rank % len(cpus)]})  # threads created from now on inherit it
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)
    ddp = DDP(torch.nn.Sequential(torch.nn.Linear(12, 33), torch.nn.ReLU(), torch.nn.Linear(33, 5)))
    if hook != "none":
        DropGradHookState(ddp, drop_rate=0.5, seed=7, communication=hook).register()
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    _SCRIPT_GLOBALS.extend([ddp, optimizer])
    for _ in range(3):
        ddp(torch.randn(8, 12)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    _starve_other_threads()
    ddp(torch.randn(8, 12)).square().mean().backward()  # the script's last statement


def _spin(cpu: int) -> int:
    """A process busy on ``cpu`` until killed (a minute at most): it takes the CPU whenever a rank waits."""
    pid = os.fork()
    if pid == 0:
        os.sched_setaffinity(0, {cpu})
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            pass
        os._exit(0)
    return pid


def main(runs: int, hooks: list[str]) -> None:
    torch.set_num_threads(1)
    gc.freeze()  # the ranks' finalization then leaves the parent's objects (and their pages) alone
    codes = []
    for run in range(runs):
        hook = hooks[run % len(hooks)]
        folder = tempfile.mkdtemp()
        store, pids = os.path.join(folder, "store"), []
        spinners = [_spin(cpu) for cpu in sorted(os.sched_getaffinity(0))[:2]]
        for rank in range(2):
            pid = os.fork()
            if pid == 0:
                _rank(rank, store, hook)
                return  # the rank's process ends here: a normal interpreter exit
            pids.append(pid)
        codes.append([os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids])
        for spinner in spinners:
            os.kill(spinner, signal.SIGKILL)
            os.waitpid(spinner, 0)
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps({"codes": codes}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])
