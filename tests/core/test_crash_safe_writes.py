"""Crash-safe checkpoint files: a process killed mid-save leaves the previous checkpoint whole and loadable;
a file cut short is refused, naming it (``dropgrad_dist.core.checkpoint.write_atomically``)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dropgrad_dist.core import checkpoint as ckpt
from tests.core.test_checkpoint_files import JSON_NAME, SUMS_NAME, _nudge, _same, _snapshot, _trained

ROOT = Path(__file__).resolve().parents[2]


def test_a_process_killed_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "core" / "kill_mid_save.py"), str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, f"expected death by SIGKILL, got {done.returncode}: {done.stderr[-2000:]}"
    folder, first = tmp_path / "ckpt", tmp_path / "first"
    for name in (JSON_NAME, SUMS_NAME):
        assert (folder / name).read_bytes() == (first / name).read_bytes(), f"{name} changed by the killed save"
    accelerator, model, optimizer, handle = _trained(tmp_path / "fresh")
    expected = ckpt.read_json(first / JSON_NAME, "test")
    _nudge(model, optimizer, handle)
    accelerator.load_state(str(folder))
    assert handle.state_dict() == expected
    strays = [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert strays and strays[0].startswith(f".{JSON_NAME}."), strays  # the kill came while writing our JSON


@pytest.mark.parametrize("name", [JSON_NAME, SUMS_NAME])
def test_a_truncated_file_is_refused_naming_it(name, tmp_path):
    accelerator, model, optimizer, handle = _trained(tmp_path)
    path = tmp_path / "ckpt" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    before = _snapshot(model, optimizer, handle)
    with pytest.raises(ValueError, match=f"{name}.*refusing to load it"):
        accelerator.load_state(str(tmp_path / "ckpt"))
    assert _same(_snapshot(model, optimizer, handle), before)


def test_write_atomically_replaces_whole_files_only(tmp_path):
    path = tmp_path / "state.json"
    ckpt.write_atomically(path, b"old")
    ckpt.write_atomically(path, b"new")
    assert path.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    assert (path.stat().st_mode & 0o777) == (0o666 & ~ckpt._UMASK)
    with pytest.raises(OSError):
        ckpt.write_atomically(tmp_path / "missing" / "x.json", b"x")
