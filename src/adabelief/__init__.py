"""AdaBelief (Zhuang et al., NeurIPS 2020) for PyTorch.

``adabelief.AdaBelief`` is a drop-in replacement for ``torch.optim.Adam``. The Keras 3 optimizer
and the optax transform live in ``adabelief.keras`` and ``adabelief.optax`` and are imported only
on request; the experiment runner (``adabelief`` command) lives in ``adabelief.experiments``.
"""

from adabelief.backward_step import StepInBackwardError
from adabelief.optimizer import AdaBelief, adabelief
from adabelief.scalars import StepScalars, step_scalars

__all__ = [
    "AdaBelief",
    "StepInBackwardError",
    "StepScalars",
    "__version__",
    "adabelief",
    "step_scalars",
]
__version__ = "0.1.0"
