"""The per-step scalars: their type, shared by every front end, and their computation for the
array frameworks (Keras 3, JAX/optax), framework-free.

:class:`StepScalars` is what an element-wise kernel needs for one step: PyTorch's
:func:`adabelief.scalars.step_scalars` (Python floats or 0-dim tensors, float64) and
:func:`array_step_scalars` (arrays) both return it. It holds ``step_size``, ``sqrt_bias_correction2``
and ``adaptive``, built from ``bc1 = 1 - b1**t``, ``bc2 = 1 - b2**t`` and, with rectification,
``rho_inf = 2/(1 - b2) - 1``, ``rho_t = rho_inf - 2 t b2**t / bc2`` and ``r = sqrt((rho_t-4)
(rho_t-2) rho_inf / ((rho_inf-4)(rho_inf-2) rho_t))`` where ``rho_t >= 5`` (0 elsewhere).

:func:`array_step_scalars` is written once against a small namespace of array operations
(``keras.ops``, or an adapter of ``jax.numpy``): ``cast(x, dtype)``, ``log``, ``exp``, ``expm1``,
``sqrt``, ``minimum``, ``maximum``, ``clip``, ``where``, ``zeros_like``. Importing this module
imports no framework.

``rho_t`` is a small difference of two numbers near ``rho_inf`` (about 2000 for b2 = 0.999):
computed naively in float32 it is 0.7% off at step 6. So, with ``L = -log(b2)`` and ``u = t L``:
``b2**t = exp(-u)``, ``bc2 = -expm1(-u)`` and ``rho_t = (rho_inf - 2/L) + (2/L) h(u)`` with
``h(u) = 1 - u/expm1(u)``; the constants are float64 when the betas are Python numbers, and
``h`` is summed as a series where it cancels. Results are within float32 rounding of the float64
values that PyTorch computes.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, TypeGuard

# 1/k! for k = 10 .. 2: Horner coefficients of (e^u - 1 - u)/u^2 = sum_{k>=2} u^(k-2)/k!.
_EXPM1_TAIL_COEFFS = tuple(1.0 / math.factorial(k) for k in range(10, 1, -1))
_SERIES_CUTOFF = 0.5  # below it h(u) is summed as a series; its truncation error is < 1e-9
_OFFSET_SERIES_CUTOFF = 1.0

# Below this length of the approximated SMA the variance of the adaptive step is intractable and
# the rectified update falls back to SGD with momentum (Liu et al., 2020, RAdam).
RHO_THRESHOLD = 5.0


class StepScalars(NamedTuple):
    """What a kernel needs for one step of one parameter.

    Python floats and bools, or 0-dim tensors (PyTorch), or arrays (Keras, JAX), the same in
    every front end.

    Attributes:
        step_size: the positive multiplier of the update, learning rate included; the update is
            ``-step_size * m / denom`` when ``adaptive``, else ``-step_size * m`` (0: no update).
        sqrt_bias_correction2: divides ``sqrt(v)`` inside the denominator
            (``sqrt(1 - beta2**t)`` for the plain update, exactly 1 for the rectified one).
        adaptive: whether the update divides by the belief denominator
            ``sqrt(v) / sqrt_bias_correction2 + eps``.
    """

    step_size: Any
    sqrt_bias_correction2: Any
    adaptive: Any


class _StepTerms(NamedTuple):
    """The learning-rate-free terms of a step, arrays: bias corrections and rectification."""

    bc1: Any  # 1 - b1**t
    bc2: Any  # 1 - b2**t
    rho: Any  # rho_t = rho_inf - 2*t*b2**t / bc2 (rectification only)
    r: Any  # rectification factor r_t where rho_t >= 5, else 0 (rectification only)


class _Constants(NamedTuple):
    log_b1: Any
    big_l: Any  # -log(b2)
    rho_offset: Any  # rho_inf - 2/L = coth(L/2) - 2/L
    two_over_l: Any
    r_scale: Any  # rho_inf / ((rho_inf - 4)(rho_inf - 2)), 0 when rho_t can never reach 5


def is_number(x: object) -> TypeGuard[numbers.Real]:
    """A real Python (or NumPy) number, not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _float_constants(b1: float, b2: float) -> _Constants:
    big_l = -math.log(b2) if b2 > 0.0 else math.inf
    rho_inf = 2.0 / (1.0 - b2) - 1.0
    two_over_l = 2.0 / big_l
    return _Constants(
        log_b1=math.log(b1) if b1 > 0.0 else -math.inf,
        big_l=big_l,
        rho_offset=rho_inf - two_over_l,  # no harmful cancellation in float64
        two_over_l=two_over_l,
        r_scale=rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0)) if rho_inf > 5.0 else 0.0,
    )


def _array_constants(ops: Any, b1: Any, b2: Any) -> _Constants:
    """The constants from betas that are arrays (e.g. under optax.inject_hyperparams)."""
    big_l = -ops.log(b2)
    rho_inf = 2.0 / (1.0 - b2) - 1.0
    two_over_l = 2.0 / big_l
    # coth(L/2) - 2/L = L/6 - L^3/360 + L^5/15120 - L^7/604800 + ...
    ls = ops.minimum(big_l, _OFFSET_SERIES_CUTOFF)
    ls2 = ls * ls
    series = ls * (1.0 / 6.0 - ls2 * (1.0 / 360.0 - ls2 * (1.0 / 15120.0 - ls2 / 604800.0)))
    return _Constants(
        log_b1=ops.log(b1),
        big_l=big_l,
        rho_offset=ops.where(big_l < _OFFSET_SERIES_CUTOFF, series, rho_inf - two_over_l),
        two_over_l=two_over_l,
        r_scale=ops.where(
            rho_inf > 5.0, rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0)), ops.zeros_like(rho_inf)
        ),
    )


def _one_minus_u_over_expm1(ops: Any, u: Any) -> Any:
    """h(u) = 1 - u/(e^u - 1) for u > 0, to full relative precision: for small u as
    (e^u - 1 - u)/(e^u - 1) with the numerator summed as a power series."""
    us = ops.minimum(u, _SERIES_CUTOFF)
    poly = ops.zeros_like(us)
    for coeff in _EXPM1_TAIL_COEFFS:
        poly = poly * us + coeff
    series = us * us * poly / ops.expm1(us)
    # 1 - u e^-u / (1 - e^-u): no overflow for large u (clipped where h(u) == 1 in any precision).
    ul = ops.clip(u, _SERIES_CUTOFF, 100.0)
    direct = 1.0 - ul * ops.exp(-ul) / -ops.expm1(-ul)
    return ops.where(u < _SERIES_CUTOFF, series, direct)


def _step_terms(
    ops: Any, step: Any, beta1: Any, beta2: Any, dtype: Any, *, rectify: bool
) -> _StepTerms:
    """The terms of step ``step`` in ``dtype``; ``rho`` and ``r`` are None without ``rectify``."""
    t = ops.cast(step, dtype)
    if is_number(beta1) and is_number(beta2):
        c = _float_constants(float(beta1), float(beta2))
    else:
        c = _array_constants(ops, ops.cast(beta1, dtype), ops.cast(beta2, dtype))
    u = t * ops.cast(c.big_l, dtype)
    bc1 = -ops.expm1(t * ops.cast(c.log_b1, dtype))
    bc2 = -ops.expm1(-u)
    if not rectify:
        return _StepTerms(bc1=bc1, bc2=bc2, rho=None, r=None)
    rho = ops.cast(c.rho_offset, dtype) + ops.cast(c.two_over_l, dtype) * _one_minus_u_over_expm1(
        ops, u
    )
    r2 = (rho - 4.0) * (rho - 2.0) * ops.cast(c.r_scale, dtype) / rho
    r = ops.where(rho >= RHO_THRESHOLD, ops.sqrt(ops.maximum(r2, 0.0)), ops.zeros_like(rho))
    return _StepTerms(bc1=bc1, bc2=bc2, rho=rho, r=r)


def array_step_scalars(
    ops: Any,
    step: Any,
    lr: Any,
    beta1: Any,
    beta2: Any,
    *,
    rectify: bool,
    degenerated_to_sgd: bool,
    dtype: Any,
) -> StepScalars:
    """The scalars of step ``step`` (1-based, an array or number) for learning rate ``lr``, arrays
    of ``dtype``, graph- and jit-friendly (no branch on array values).

    Without ``rectify``: ``step_size = lr/bc1``, ``sqrt_bias_correction2 = sqrt(bc2)``,
    ``adaptive = True``. With it: ``sqrt_bias_correction2 = 1.0``, ``adaptive = rho_t >= 5``
    and ``step_size = lr * (r sqrt(bc2)/bc1)`` where adaptive, else ``lr/bc1``
    (``degenerated_to_sgd``) or 0.
    """
    terms = _step_terms(ops, step, beta1, beta2, dtype, rectify=rectify)
    if not rectify:
        return StepScalars(lr / terms.bc1, ops.sqrt(terms.bc2), True)
    adaptive = terms.rho >= RHO_THRESHOLD
    rectified = lr * (terms.r * ops.sqrt(terms.bc2) / terms.bc1)
    fallback = lr / terms.bc1 if degenerated_to_sgd else ops.zeros_like(rectified)
    return StepScalars(ops.where(adaptive, rectified, fallback), 1.0, adaptive)
