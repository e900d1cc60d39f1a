"""What every regularizer shares: the machinery below DropGrad, clipping and GNP/SAM.

- :mod:`.checks`: argument checks (one wording, one rule per kind of argument);
- :mod:`.checkpoint`: state rules (plain data, validated before anything changes);
- :mod:`.collectives`, :mod:`.agreement`: launching collectives safely; the one cross-rank agreement check;
- :mod:`.forward_check`: the agreement check each training forward launches;
- :mod:`.steps`: counting the optimizer steps that ran (skipped ``GradScaler`` steps do not count);
- :mod:`.ownership`: which regularizer masks which gradients;
- :mod:`.wrapper`: the base of every optimizer step wrapper.

Imports only :mod:`dropgrad_dist.layout` below it (checked by import-linter: ``pyproject.toml``).
"""
