"""The experiment runner behind the ``adabelief`` command: check the AdaBelief paper's claims.

The library core never imports this package.  Layout:

* :mod:`~adabelief.experiments.cli` - the ``adabelief`` command;
* :mod:`~adabelief.experiments.registry` - optimizers by name (``create_optimizer``);
* :mod:`~adabelief.experiments.presets` - each experiment's paper settings;
  :mod:`~adabelief.experiments.search` - fair mode's search spaces and quasi-random trials;
* :mod:`~adabelief.experiments.tasks` - ``toy``, ``classify``, ``lm``, ``transformer``,
  ``gan`` (each owns its task-specific figures and report lines);
  :mod:`~adabelief.experiments.usertask` - a user's own task (:func:`user_task`);
* :mod:`~adabelief.experiments.data`, :mod:`~adabelief.experiments.models`,
  :mod:`~adabelief.experiments.training`, :mod:`~adabelief.experiments.fid` - what tasks share;
* :mod:`~adabelief.experiments.runner` - planning, resumable execution;
  :mod:`~adabelief.experiments.executors` - this process, local workers, or Ray;
* :mod:`~adabelief.experiments.store`, :mod:`~adabelief.experiments.analysis`,
  :mod:`~adabelief.experiments.stats`, :mod:`~adabelief.experiments.verdicts` - the run folder
  and what is computed from it; :mod:`~adabelief.experiments.report`,
  :mod:`~adabelief.experiments.plots` - how it is shown.

Names are imported lazily, so that ``from adabelief.experiments import user_task`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "DEFAULT_OPTIMIZERS",
    "available_optimizers",
    "create_optimizer",
    "known_optimizers",
    "register_optimizer",
    "user_task",
]

_EXPORTS = {
    "DEFAULT_OPTIMIZERS": "adabelief.experiments.registry",
    "available_optimizers": "adabelief.experiments.registry",
    "create_optimizer": "adabelief.experiments.registry",
    "known_optimizers": "adabelief.experiments.registry",
    "register_optimizer": "adabelief.experiments.registry",
    "user_task": "adabelief.experiments.usertask",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'adabelief.experiments' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
