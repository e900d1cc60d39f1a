"""The shell side of `launch/`: what is installed for which command, threads per CPU process, flags refused early.

Nothing here starts a training run: the scripts are run up to the point where they decide.
"""

import os
import signal
import subprocess
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"


def _fake_venv(tmp_path: Path) -> tuple[Path, Path]:
    """A venv whose python records its arguments instead of installing anything."""
    venv, calls = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{calls}"\n')
    python.chmod(0o755)
    return venv, calls


def _setup(venv: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / "setup_env.sh"), *extra], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DROPGRAD_VENV": str(venv)})


def _installs(calls: Path) -> list[str]:
    lines = calls.read_text().splitlines() if calls.exists() else []
    return [line.split("-e ", 1)[1] for line in lines if "pip install --quiet -e" in line]


def test_the_demo_installs_its_extra_the_tests_dev_and_each_install_is_remembered(tmp_path):
    venv, calls = _fake_venv(tmp_path)
    for script, extra in (("demo.sh", "vit"), ("study_cpu.sh", "vit"), ("test.sh", "dev")):
        assert f'launch/setup_env.sh" {extra}' in (LAUNCH / script).read_text(), script
    assert _setup(venv, "vit").returncode == 0
    assert _installs(calls) == [f"{ROOT}[vit]"]
    assert _setup(venv, "vit").returncode == 0  # remembered: no second install
    assert _setup(venv).returncode == 0  # no argument: dev
    assert _installs(calls) == [f"{ROOT}[vit]", f"{ROOT}[dev]"]
    (venv / ".dropgrad-installed-vit").unlink()
    assert _setup(venv, "vit").returncode == 0  # dev holds every extra
    assert len(_installs(calls)) == 2
    for stamp in (".dropgrad-installed", ".dropgrad-installed-vit"):
        (venv / stamp).write_text("an older pyproject.toml\n")
    assert _setup(venv, "vit").returncode == 0  # pyproject.toml changed since: install again
    assert _installs(calls)[-1] == f"{ROOT}[vit]" and len(_installs(calls)) == 3


def test_dev_holds_every_other_extra_and_an_unknown_extra_is_refused(tmp_path):
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    included = {name for requirement in extras["dev"] if requirement.startswith("dropgrad-dist[")
                for name in requirement[len("dropgrad-dist["):-1].split(",")}
    assert included == set(extras) - {"dev"}, extras["dev"]
    venv, calls = _fake_venv(tmp_path)
    done = _setup(venv, "vit_extras")
    assert done.returncode == 2 and "unknown extra 'vit_extras'; pyproject.toml declares: vit" in done.stderr
    assert _installs(calls) == []


def _thread_defaults(config: str, **variables: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "NUM_PROCESSES")}
    done = subprocess.run(["bash", "-c", f'source "{LAUNCH}/_accelerate.sh"; cpu_thread_defaults {config}; '
                           'echo "${OMP_NUM_THREADS:-unset} ${OMP_WAIT_POLICY:-unset}"'],
                          capture_output=True, text=True, timeout=30, env={**env, **variables})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_cpu_launches_give_each_process_its_share_of_the_cores_and_sleeping_waits():
    cores = len(os.sched_getaffinity(0))
    assert _thread_defaults("cpu_single.yaml") == f"{cores} PASSIVE"
    assert _thread_defaults("cpu_ddp.yaml") == f"{max(1, cores // 2)} PASSIVE"  # its config: 2 processes
    assert _thread_defaults("cpu_ddp.yaml", NUM_PROCESSES=str(4 * cores)) == "1 PASSIVE"
    assert _thread_defaults("cpu_ddp.yaml", NUM_PROCESSES="4", NUM_MACHINES="2") == f"{max(1, cores // 2)} PASSIVE"
    assert _thread_defaults("cpu_ddp.yaml", OMP_NUM_THREADS="3", OMP_WAIT_POLICY="ACTIVE") == "3 ACTIVE"  # kept
    assert _thread_defaults("gpu_ddp.yaml") == "unset unset"  # GPU runs: the launcher's own defaults


@pytest.mark.parametrize("flags, message", [
    (["--num_processes", "4"], "--num_processes is a launcher setting, not a train.py flag: run NUM_PROCESSES=4 bash "
                               "launch/cpu_ddp.sh"),
    (["--drop_rate", "0.1", "--main_process_port=29600"], "run MAIN_PROCESS_PORT=29600 bash launch/cpu_ddp.sh"),
])
def test_a_launcher_flag_given_to_a_launch_script_is_refused_naming_its_variable(flags, message):
    # Its own session: a script that did start training is stopped with its ranks.
    process = subprocess.Popen(["bash", str(LAUNCH / "cpu_ddp.sh"), *flags], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 2 and message in err, err[-2000:]
    assert len(err.strip().splitlines()) == 1 and "--config_file" not in out  # nothing started
