"""The per-element AdaBelief update for the array frameworks (Keras 3, JAX/optax), framework-free.

Written once against the array namespace of :mod:`adabelief._array_scalars` (``keras.ops``, or
the adapter of ``jax.numpy`` in :mod:`adabelief.optax`), of which it uses ``square``, ``sqrt``
and ``where``; importing it imports no framework. Per element, with the gradient ``g`` after
maximize and L2 decay, and the :class:`~adabelief._array_scalars.StepScalars` of the step::

    m = b1*m + (1 - b1)*g
    s = b2*s + (1 - b2)*(g - m)**2 + eps     (eps goes into the stored state)
    v = max(s_max, s) with AMSGrad, else s
    step = step_size * m / (sqrt(v)/sqrt_bias_correction2 + eps)   where adaptive
           step_size * m                                           elsewhere

and ``theta -= step``. Keras folds the learning rate into ``step_size``; optax computes the
scalars with ``lr = 1`` and scales the direction by ``-lr`` afterwards.
"""

from __future__ import annotations

from typing import Any

from adabelief._array_scalars import StepScalars, is_number

__all__ = ["belief", "first_moment", "parameter_step"]


def first_moment(exp_avg: Any, grad: Any, beta1: Any) -> Any:
    """The new first moment ``m = b1*m + (1 - b1)*g``."""
    return beta1 * exp_avg + (1.0 - beta1) * grad


def belief(ops: Any, exp_avg_var: Any, grad: Any, exp_avg: Any, beta2: Any, eps: Any) -> Any:
    """The new belief ``s = b2*s + (1 - b2)*(g - m)**2 + eps``, ``exp_avg`` the new ``m``."""
    return beta2 * exp_avg_var + (1.0 - beta2) * ops.square(grad - exp_avg) + eps


def parameter_step(
    ops: Any, exp_avg: Any, denominator_state: Any, scalars: StepScalars, eps: Any
) -> Any:
    """What is subtracted from the parameters: ``step_size * m / (sqrt(v)/sqrt_bc2 + eps)``
    where ``adaptive``, else ``step_size * m``; ``denominator_state`` is ``v`` (``s``, or its
    running maximum with AMSGrad)."""
    step_size, sqrt_bc2, adaptive = scalars
    denom = ops.sqrt(denominator_state)
    if not (is_number(sqrt_bc2) and sqrt_bc2 == 1.0):  # exactly 1 when rectified
        denom = denom / sqrt_bc2
    adaptive_step = step_size * exp_avg / (denom + eps)
    if adaptive is True:
        return adaptive_step
    return ops.where(adaptive, adaptive_step, step_size * exp_avg)
