"""Run by ``test_crash_safe_writes``: save a checkpoint, keep training, then die by SIGKILL in the middle of
writing the next save's first regularizer file into the same folder.

``python tests/core/kill_mid_save.py FOLDER``: ``FOLDER/ckpt`` is the checkpoint, ``FOLDER/first`` a copy of
it as the first save left it. The kill comes from a wrapped ``os.fdopen``: the file object it returns
writes half of the first buffer, flushes it, and kills the process.
"""

import os
import shutil
import signal
import sys

import torch

from tests.core.test_checkpoint_files import _trained


class _HalfThenDie:
    def __init__(self, file):
        self._file = file

    def write(self, data):
        self._file.write(bytes(data)[: len(data) // 2])
        self._file.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._file.__exit__(*exc)


def main(folder: str) -> None:
    from pathlib import Path

    accelerator, model, optimizer, handle = _trained(Path(folder))  # saved into FOLDER/ckpt
    shutil.copytree(os.path.join(folder, "ckpt"), os.path.join(folder, "first"))
    accelerator.backward(model(torch.randn(5, 4)).square().mean())
    optimizer.step()
    optimizer.zero_grad()
    fdopen = os.fdopen
    os.fdopen = lambda *args, **kwargs: _HalfThenDie(fdopen(*args, **kwargs))
    accelerator.save_state(os.path.join(folder, "ckpt"))
    raise SystemExit("the save completed: the kill did not happen")


if __name__ == "__main__":
    main(sys.argv[1])
