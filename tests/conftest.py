"""Shared fixtures and the test kinds.

Kinds (markers declared in ``pyproject.toml``):

- unit tests: one process, no marker; ``pytest -m "not distributed"`` runs only these.
- ``distributed``: the test starts several processes (gloo ranks through
  ``dropgrad_dist.testing.run_on_ranks``, or ``torchrun``/``accelerate launch``). A module whose
  tests all do so sets ``pytestmark = pytest.mark.distributed``; a mixed module marks those tests.
- ``integration``/``cuda``: builds or installs the package / needs a CUDA GPU.

Shared helpers stay importable modules, not fixtures, because spawned ranks unpickle the
functions they run by module path: ``dropgrad_dist.testing`` (``run_on_ranks``, ``free_port``),
``tests/nets.py`` (the small one-process ``Net``, ``seeded_net``), ``tests/fsdp_common.py``
(the FSDP tests' ``Tiny`` model, batches and one-process reference runs).
"""

from __future__ import annotations

import pytest

from dropgrad_dist import mask
from dropgrad_dist import testing as _testing


@pytest.fixture
def backend():
    """Run a test under a given mask backend (``backend("eager")``) and restore the previous one."""
    previous = mask.mask_backend()
    yield mask.set_mask_backend
    mask.set_mask_backend(previous)


@pytest.fixture(autouse=True)
def _unit_tests_start_no_ranks(request, monkeypatch):
    """A test without the ``distributed`` marker that starts ranks fails, naming the marker.

    ``run_on_ranks`` takes its port from ``free_port``: refusing that keeps the unit-test
    selection honest (module-scoped fixtures that spawn are set up before this one and are
    covered by the module's marker).
    """
    if request.node.get_closest_marker("distributed") is not None:
        return

    def refuse() -> int:
        raise RuntimeError(f"{request.node.nodeid} starts ranks: mark it @pytest.mark.distributed "
                           "(or its module: pytestmark = pytest.mark.distributed)")

    monkeypatch.setattr(_testing, "free_port", refuse)
