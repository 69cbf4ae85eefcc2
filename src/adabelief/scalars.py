"""Per-step scalars of AdaBelief, shared by every kernel (single-tensor, foreach, fused).

One pure function, :func:`step_scalars`, turns a step count and the group's hyperparameters into
the three numbers an element-wise kernel needs. It works on Python floats (the eager default: the
step count is read from the host once per tensor) and on 0-dim tensors (``capturable``,
``torch.compile``, tensor learning rates: no host synchronisation, no branch on data), with the
same formulas in the same order, so every path rounds alike.

With ``t`` the step (1 for the first update), ``bc1 = 1 - beta1**t`` and ``bc2 = 1 - beta2**t``:

* plain (``rectify=False``)::

      theta -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)

* rectified (RAdam's variance warm-up), ``rho_inf = 2 / (1 - beta2) - 1`` and
  ``rho_t = rho_inf - 2 t beta2**t / bc2``. While ``rho_t >= 5``::

      r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
      theta -= lr * r_t * sqrt(bc2) / bc1 * m / (sqrt(v) + eps)

  before that, SGD with momentum ``theta -= lr / bc1 * m`` when ``degenerated_to_sgd``,
  otherwise no change to ``theta`` (the moments are still updated).

``v`` is ``exp_avg_var`` (or its running maximum with AMSGrad), which already holds the ``eps``
added at every step.

:class:`StepScalars` is defined framework-free in :mod:`adabelief._array_scalars`: the Keras
and optax front ends compute the same three scalars as arrays
(``adabelief.keras.step_scalars``, ``adabelief.optax.step_scalars``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from adabelief._array_scalars import RHO_THRESHOLD, StepScalars

__all__ = ["RHO_THRESHOLD", "Scalar", "StepScalars", "rho_infinity", "step_scalars"]

#: A step count or learning rate: a Python number, or a 0-dim tensor.
Scalar = float | Tensor


def rho_infinity(beta2: float) -> float:
    """The maximum length of the approximated simple moving average, ``2 / (1 - beta2) - 1``."""
    return 2.0 / (1.0 - beta2) - 1.0


def step_scalars(
    step: Scalar,
    lr: Scalar,
    beta1: float,
    beta2: float,
    *,
    rectify: bool,
    degenerated_to_sgd: bool,
) -> StepScalars:
    """The scalars of step ``step`` (1-based) for learning rate ``lr``.

    ``step`` and ``lr`` may be Python numbers (the result is made of floats and bools) or 0-dim
    tensors (the result is made of tensors, computed without leaving the device).
    """
    bias_correction1 = 1 - beta1**step
    beta2_t = beta2**step
    bias_correction2 = 1 - beta2_t
    if not rectify:
        return StepScalars(lr / bias_correction1, bias_correction2**0.5, True)

    rho_inf = rho_infinity(beta2)
    rho_t = rho_inf - 2 * step * beta2_t / bias_correction2
    fallback_coefficient = 1.0 if degenerated_to_sgd else 0.0

    if not isinstance(rho_t, Tensor):
        if rho_t >= RHO_THRESHOLD:
            rectified = (
                math.sqrt(
                    bias_correction2
                    * (rho_t - 4)
                    / (rho_inf - 4)
                    * (rho_t - 2)
                    / rho_t
                    * rho_inf
                    / (rho_inf - 2)
                )
                / bias_correction1
            )
            return StepScalars(rectified * lr, 1.0, True)
        return StepScalars(fallback_coefficient / bias_correction1 * lr, 1.0, False)

    adaptive = rho_t >= RHO_THRESHOLD
    # Clamped so that the branch not taken (rho_t < 5, possibly rho_inf <= 4) stays finite.
    variance_ratio = (
        bias_correction2
        * (rho_t - 4)
        / (rho_inf - 4 if rho_inf != 4 else math.inf)
        * (rho_t - 2)
        / rho_t.clamp(min=RHO_THRESHOLD)
        * rho_inf
        / (rho_inf - 2 if rho_inf != 2 else math.inf)
    ).clamp(min=0)
    rectified_t = variance_ratio.sqrt() / bias_correction1
    fallback_t = fallback_coefficient / bias_correction1
    step_size = torch.where(adaptive, rectified_t, fallback_t) * lr
    return StepScalars(step_size, torch.ones_like(rho_t), adaptive)
