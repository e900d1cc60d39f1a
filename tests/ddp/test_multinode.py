"""Multi-node launch on one machine: two "nodes" (two launchers, one process each) on 127.0.0.1.

- ``launch/cpu_ddp.sh`` run twice with ``NUM_MACHINES=2 MACHINE_RANK=0/1 MAIN_PROCESS_IP
  MAIN_PROCESS_PORT`` (``accelerate launch --num_machines 2``, static rendezvous): the ViT
  script trains across the node boundary and both nodes end with the same parameters.
- ``torchrun --nnodes 2 --node_rank 0/1`` of ``examples/ddp_comm_hook.py`` with a different
  ``--seed`` per node (its ``--seed`` is DropGrad's seed only: data and model do not depend on
  it): both nodes fail in the first step with DropGrad's ``RankDisagreement`` naming 'seed'.
- The launch scripts refuse an incomplete multi-node setup before starting anything.

Each node's launcher runs in its own session and is stopped (with its workers) if the test
fails or a node outlives the timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dropgrad_dist.testing import free_port

from ..project.test_launch import TINY

pytestmark = pytest.mark.distributed  # every test here starts several processes

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 150  # seconds for both nodes together; a hang would otherwise last gloo's 30-minute timeout


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ,
            # This checkout and this interpreter's scripts (accelerate), whatever the caller's PATH.
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            "OMP_NUM_THREADS": "1", "DROPGRAD_MASK_BACKEND": "eager", **extra}


def _descendants(pid: int) -> list[int]:
    """Processes started (transitively) by ``pid``: torchrun puts its workers in their own sessions."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stop(proc: subprocess.Popen) -> None:
    """Stop a node: its launcher's group gets SIGTERM (torchrun then stops its workers), then SIGKILL."""
    if proc.poll() is not None:
        return
    workers = _descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    for pid in [proc.pid, *workers]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _run_nodes(commands: list[list[str]], envs: list[dict[str, str]], logs: Path) -> list[tuple[int, str, float]]:
    """Start one launcher per node, wait for all; ``[(exit code, output, seconds)]`` per node."""
    procs: list[subprocess.Popen] = []
    ended: dict[int, float] = {}
    start = time.monotonic()
    try:
        for node, (command, env) in enumerate(zip(commands, envs)):
            with open(logs / f"node{node}.log", "w") as log:  # files, not pipes: a full pipe would block a node
                procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        while len(ended) < len(procs):
            for node, proc in enumerate(procs):
                if node not in ended and proc.poll() is not None:
                    ended[node] = time.monotonic() - start
            if time.monotonic() - start > TIMEOUT:
                raise TimeoutError(f"nodes {sorted(set(range(len(procs))) - set(ended))} still running after "
                                   f"{TIMEOUT} s:\n" + "\n".join((logs / f"node{n}.log").read_text()[-3000:]
                                                                  for n in range(len(procs))))
            time.sleep(0.2)
    finally:
        for proc in procs:
            _stop(proc)
    return [(proc.returncode, (logs / f"node{node}.log").read_text(), ended[node]) for node, proc in enumerate(procs)]


def _multinode_env(node: int, port: int) -> dict[str, str]:
    return _env(NUM_MACHINES="2", MACHINE_RANK=str(node), MAIN_PROCESS_IP="127.0.0.1", MAIN_PROCESS_PORT=str(port))


def test_two_nodes_through_launch_script_train_to_identical_parameters(tmp_path):
    port = free_port()
    outs = [tmp_path / f"out{node}" for node in range(2)]
    # TINY: DropGrad (compact DDP hook), GNP and GradientClipper, each checking agreement every step.
    commands = [["bash", str(ROOT / "launch" / "cpu_ddp.sh"), *TINY, "--max_steps", "3", "--communication", "compact",
                 "--output_dir", str(out)] for out in outs]
    nodes = _run_nodes(commands, [_multinode_env(node, port) for node in range(2)], tmp_path)
    for node, (code, output, _) in enumerate(nodes):
        assert code == 0, f"node {node}:\n{output[-4000:]}"
        # The script passed the variables to accelerate launch; accelerate started 1 process per node.
        assert (f"--num_machines 2 --machine_rank {node} --main_process_ip 127.0.0.1 --main_process_port {port} "
                in output), output[:2000]
        assert "done: test accuracy" in output  # each node's local main process finished
    records = [json.loads(line) for line in (outs[0] / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["processes"] == 2 and records[0]["distributed_type"] == "DistributedType.MULTI_CPU"
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3]
    digests = records[-1]["rank_param_digests"]
    assert len(digests) == 2 and digests[0] == digests[1], digests  # rank 0 (node 0) == rank 1 (node 1)
    assert not (outs[1] / "metrics.jsonl").exists()  # only the global main process (node 0) writes


def test_two_nodes_with_different_dropgrad_seeds_fail_in_the_first_step_on_both(tmp_path):
    port = free_port()
    commands = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                 "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                 str(ROOT / "examples" / "ddp_comm_hook.py"), "--steps", "3", "--seed", str(node)]
                for node in range(2)]
    nodes = _run_nodes(commands, [_env(), _env()], tmp_path)
    for node, (code, output, seconds) in enumerate(nodes):
        assert code != 0, f"node {node} succeeded:\n{output[-3000:]}"
        expected = ("RankDisagreement: DropGradHookState: ranks disagree on 'seed' (ranks [0] vs [1]); "
                    f"rank {node} has seed={node}")
        assert expected in output, f"node {node} ({seconds:.1f} s):\n{output[-4000:]}"
    assert "step   0" not in nodes[0][1]  # raised in the first backward, before any optimizer step


@pytest.mark.parametrize("variables, message", [
    ({"NUM_MACHINES": "2", "MAIN_PROCESS_IP": "127.0.0.1"}, "needs MACHINE_RANK set on every machine"),
    ({"NUM_MACHINES": "2", "MACHINE_RANK": "1"}, "needs MAIN_PROCESS_IP set on every machine"),
    ({"NUM_MACHINES": "2", "MACHINE_RANK": "2", "MAIN_PROCESS_IP": "127.0.0.1"}, "MACHINE_RANK must be in 0..1"),
    ({"NUM_MACHINES": "2", "MACHINE_RANK": "0", "MAIN_PROCESS_IP": "127.0.0.1", "NUM_PROCESSES": "3"},
     "NUM_PROCESSES is the total over all machines"),
], ids=["no_machine_rank", "no_main_ip", "rank_out_of_range", "processes_not_divisible"])
def test_launch_script_refuses_incomplete_multinode_setup(variables, message):
    env = {k: v for k, v in _env(**variables).items()
           if k not in {"NUM_MACHINES", "MACHINE_RANK", "MAIN_PROCESS_IP", "NUM_PROCESSES"} - set(variables)}
    done = subprocess.run(["bash", str(ROOT / "launch" / "cpu_ddp.sh")], env=env, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "--config_file" not in done.stdout  # nothing was started
