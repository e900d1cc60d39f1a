"""Run a function on several local ranks (real processes, gloo by default).

Used by the test suite and by the multi-process benchmarks: ``run_on_ranks(fn, 2, *args)``
spawns ``world_size`` processes on a free localhost port, initialises the process group in
each, calls ``fn(rank, world_size, *args)`` and returns the per-rank results in rank order.
An exception on any rank is re-raised here with that rank's traceback; a hang is killed
after ``timeout`` seconds.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["free_port", "run_on_ranks"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, backend: str, threads: int, pg_timeout: float | None,
               results: Any, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    try:
        timeout = None if pg_timeout is None else datetime.timedelta(seconds=pg_timeout)
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
        if backend == "gloo":
            # gloo's mesh is complete on one rank before the others: a rank whose fn returns at once
            # would close its sockets under a peer still connecting ("Connection closed by peer").
            dist.barrier()
        try:
            results.put((rank, True, fn(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # report every failure, the parent re-raises it
        results.put((rank, False, traceback.format_exc()))


_POLL = 0.5  # seconds between checks for ranks that died without a result


def _raise_if_stuck(procs: list, outcomes: dict, deadline: float, timeout: float) -> None:
    """Raise for a rank that died without reporting (a crash, a backend abort), or past the deadline."""
    for rank, proc in enumerate(procs):
        if rank not in outcomes and proc.exitcode not in (None, 0):
            raise RuntimeError(f"rank {rank} of {len(procs)} died with exit code {proc.exitcode} without a "
                               "result (killed by a signal when negative, e.g. -6: SIGABRT from the backend)")
    if time.monotonic() > deadline:
        raise TimeoutError(f"ranks {sorted(set(range(len(procs))) - set(outcomes))} "
                           f"gave no result within {timeout:.0f} s")


def run_on_ranks(fn: Callable[..., Any], world_size: int = 2, *args: Any, backend: str = "gloo",
                 timeout: float = 180.0, threads_per_rank: int = 1, pg_timeout: float | None = None) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return their results.

    ``fn`` and its results must be picklable (``fn`` defined at module level). ``pg_timeout``
    (seconds) is the process group's collective timeout (default: torch's, 30 minutes).
    """
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    procs = [
        context.Process(target=_rank_main, args=(rank, world_size, port, backend, threads_per_rank, pg_timeout,
                                                 results, fn, args), daemon=True)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    outcomes: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcomes) < world_size:
            try:
                rank, ok, value = results.get(timeout=_POLL)
            except queue.Empty:
                _raise_if_stuck(procs, outcomes, deadline, timeout)
                continue
            outcomes[rank] = (ok, value)
            if not ok:
                break
    finally:
        for proc in procs:
            proc.join(timeout=5 if len(outcomes) == world_size else 0.1)
            if proc.is_alive():
                proc.kill()
    failed = {rank: value for rank, (ok, value) in outcomes.items() if not ok}
    if failed:
        rank, trace = next(iter(sorted(failed.items())))
        raise RuntimeError(f"rank {rank} of {world_size} failed:\n{trace}")
    return [outcomes[rank][1] for rank in range(world_size)]
