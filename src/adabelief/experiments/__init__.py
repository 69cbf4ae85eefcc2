"""The experiment runner behind the ``adabelief`` command: check the AdaBelief paper's claims.

The library core never imports this package.  Layout:

* :mod:`~adabelief.experiments.registry` - optimizers by name (``create_optimizer``);
* :mod:`~adabelief.experiments.presets` - each experiment's paper settings, the fair-mode grid;
* :mod:`~adabelief.experiments.tasks` - ``toy``, ``classify``, ``lm``, ``gan``;
* :mod:`~adabelief.experiments.data`, :mod:`~adabelief.experiments.models`,
  :mod:`~adabelief.experiments.training`, :mod:`~adabelief.experiments.fid` - what tasks share;
* :mod:`~adabelief.experiments.runner` - planning, resumable parallel execution;
* :mod:`~adabelief.experiments.store`, :mod:`~adabelief.experiments.analysis`,
  :mod:`~adabelief.experiments.stats`, :mod:`~adabelief.experiments.report`,
  :mod:`~adabelief.experiments.plots` - the run folder and what is computed from it.
"""

from __future__ import annotations

from adabelief.experiments.registry import (
    DEFAULT_OPTIMIZERS,
    available_optimizers,
    create_optimizer,
    known_optimizers,
    register_optimizer,
)

__all__ = [
    "DEFAULT_OPTIMIZERS",
    "available_optimizers",
    "create_optimizer",
    "known_optimizers",
    "register_optimizer",
]
