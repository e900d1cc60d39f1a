"""A rank killed by SIGKILL mid-training: torchrun restarts the group, which resumes from its last DCP
checkpoint and ends bitwise where an uninterrupted run ends (DDP hook and FSDP2 wrapper chains)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.distributed
def test_torchrun_restart_after_a_killed_rank_resumes_bitwise(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "ELASTIC_KILL_STEP": "5", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--max-restarts", "1", "--monitor-interval", "0.5",
               str(ROOT / "tests" / "integrations" / "elastic_train.py"), str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert (tmp_path / "killed").exists() and result["attempt"] == 1, result  # killed once, restarted once
    assert result["resumed_from"] == {"ddp": 3, "fsdp": 3}, result
    assert result["equal"] == {"ddp": True, "fsdp": True}, result
