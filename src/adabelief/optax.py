"""AdaBelief for JAX as an optax gradient transformation.

The numerics follow :class:`adabelief.AdaBelief` (PyTorch) step for step. Per element, at step
``t = 1, 2, ...`` with learning rate ``lr`` and weight decay ``wd``::

    g = -g                                   (maximize only)
    theta *= 1 - lr*wd                       (weight_decouple; fixed_decay: 1 - wd)
    g = g + wd*theta                         (weight_decouple=False: L2 into the gradient)
    m = b1*m + (1 - b1)*g
    s = b2*s + (1 - b2)*(g - m)**2 + eps     (eps goes into the stored state)
    v = max(s_max, s) if amsgrad else s
    bc1 = 1 - b1**t,  bc2 = 1 - b2**t
    rectify=False:  theta -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)
    rectify=True:   rho_inf = 2/(1 - b2) - 1,  rho_t = rho_inf - 2*t*b2**t/bc2
        rho_t >= 5:           theta -= lr * r_t*sqrt(bc2)/bc1 * m / (sqrt(v) + eps)
        degenerated_to_sgd:   theta -= lr/bc1 * m
        otherwise:            theta unchanged (the state is still updated)

with ``r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))``.

As an optax chain, the decoupled decay becomes the additive update ``-lr*wd*theta`` (fixed:
``-wd*theta``), which is :func:`optax.apply_updates`-equivalent to multiplying ``theta`` first.
Parameters stored in float16/bfloat16 are handled in float32: the state is float32 and the
updates come back in float32, so that ``optax.apply_updates`` rounds to the parameter dtype once.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "ScaleByAdaBeliefState",
    "StepScalars",
    "adabelief",
    "add_scaled_params",
    "scale_by_adabelief",
    "step_scalars",
]

_HALF_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
# 1/k! for k = 10 .. 2: Horner coefficients of (e^u - 1 - u)/u^2 = sum_{k>=2} u^(k-2)/k!.
_EXPM1_TAIL_COEFFS = tuple(1.0 / math.factorial(k) for k in range(10, 1, -1))
_SERIES_CUTOFF = 0.5  # below it h(u) is summed as a series; its truncation error is < 1e-9
_OFFSET_SERIES_CUTOFF = 1.0


class StepScalars(NamedTuple):
    """Per-step scalars of AdaBelief (all arrays of the requested dtype)."""

    bc1: jax.Array  # 1 - b1**t
    bc2: jax.Array  # 1 - b2**t
    rho: jax.Array  # rho_t = rho_inf - 2*t*b2**t / bc2
    r: jax.Array  # rectification factor r_t where rho_t >= 5, else 0


class ScaleByAdaBeliefState(NamedTuple):
    """State of :func:`scale_by_adabelief`."""

    count: jax.Array  # type: ignore[assignment]  # updates done so far (int32); t = count + 1
    mu: optax.Updates  # m, "exp_avg"
    nu: optax.Updates  # s, "exp_avg_var" (eps included)
    nu_max: optax.Updates | None  # running max of s, "max_exp_avg_var" (amsgrad only)


def _compute_dtype(dtype: Any) -> jnp.dtype:
    """float32 for 16-bit floats, else the dtype itself."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype in _HALF_DTYPES else dtype


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_nonneg(name: str, value: Any) -> None:
    if _is_number(value) and not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"Invalid {name}: {value!r} (must be finite and >= 0)")


def _check_beta(name: str, value: Any) -> None:
    if _is_number(value) and not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {name}: {value!r} (must be in [0, 1))")


def _one_minus_u_over_expm1(u: jax.Array) -> jax.Array:
    """h(u) = 1 - u/(e^u - 1) for u > 0, to full relative precision.

    For small u the difference cancels, so there it is evaluated as (e^u - 1 - u)/(e^u - 1)
    with the numerator summed as a power series.
    """
    us = jnp.minimum(u, _SERIES_CUTOFF)
    poly = jnp.zeros_like(us)
    for coeff in _EXPM1_TAIL_COEFFS:
        poly = poly * us + coeff
    series = us * us * poly / jnp.expm1(us)
    # 1 - u e^-u / (1 - e^-u): no overflow for large u (clipped where h(u) == 1 in any precision).
    ul = jnp.clip(u, _SERIES_CUTOFF, 100.0)
    direct = 1.0 - ul * jnp.exp(-ul) / -jnp.expm1(-ul)
    return jnp.where(u < _SERIES_CUTOFF, series, direct)


def step_scalars(
    step: jax.typing.ArrayLike, b1: Any, b2: Any, dtype: Any = jnp.float32
) -> StepScalars:
    """Bias corrections and rectification terms of step ``step`` (1-based), jit-friendly.

    ``bc1 = 1 - b1**t``, ``bc2 = 1 - b2**t``, ``rho_t = rho_inf - 2 t b2**t / bc2`` with
    ``rho_inf = 2/(1 - b2) - 1``, and ``r = sqrt((rho_t-4)(rho_t-2) rho_inf /
    ((rho_inf-4)(rho_inf-2) rho_t))`` where ``rho_t >= 5`` (0 elsewhere).

    Evaluated without cancellation so that float32 results are within float32 rounding of the
    float64 values PyTorch computes: with ``L = -log(b2)`` and ``u = t L``,
    ``b2**t = exp(-u)``, ``bc2 = -expm1(-u)``, and
    ``rho_t = (rho_inf - 2/L) + (2/L) (1 - u/expm1(u))``, where ``rho_inf - 2/L`` and
    ``1 - u/expm1(u)`` are small differences computed from series where needed (``rho_t`` is
    itself a small difference of two numbers near ``rho_inf``). Constants are taken in float64
    when ``b1``/``b2`` are Python numbers, else (e.g. under ``optax.inject_hyperparams``) in
    ``dtype``.
    """
    dtype = jnp.dtype(dtype)
    t = jnp.asarray(step).astype(dtype)
    if _is_number(b1) and _is_number(b2):
        b1f, b2f = float(b1), float(b2)
        log_b1: Any = math.log(b1f) if b1f > 0.0 else -math.inf
        big_l: Any = -math.log(b2f) if b2f > 0.0 else math.inf
        rho_inf: Any = 2.0 / (1.0 - b2f) - 1.0
        two_over_l: Any = 2.0 / big_l
        rho_offset: Any = rho_inf - two_over_l  # coth(L/2) - 2/L, no harmful cancellation in f64
        r_scale: Any = rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0)) if rho_inf > 5.0 else 0.0
    else:
        b1a, b2a = jnp.asarray(b1, dtype), jnp.asarray(b2, dtype)
        log_b1 = jnp.log(b1a)
        big_l = -jnp.log(b2a)
        rho_inf = 2.0 / (1.0 - b2a) - 1.0
        two_over_l = 2.0 / big_l
        # coth(L/2) - 2/L = L/6 - L^3/360 + L^5/15120 - L^7/604800 + ...
        ls = jnp.minimum(big_l, _OFFSET_SERIES_CUTOFF)
        ls2 = ls * ls
        series = ls * (1.0 / 6.0 - ls2 * (1.0 / 360.0 - ls2 * (1.0 / 15120.0 - ls2 / 604800.0)))
        rho_offset = jnp.where(big_l < _OFFSET_SERIES_CUTOFF, series, rho_inf - two_over_l)
        r_scale = jnp.where(rho_inf > 5.0, rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0)), 0.0)
    u = t * jnp.asarray(big_l, dtype)
    bc1 = -jnp.expm1(t * jnp.asarray(log_b1, dtype))
    bc2 = -jnp.expm1(-u)
    rho = jnp.asarray(rho_offset, dtype) + jnp.asarray(two_over_l, dtype) * _one_minus_u_over_expm1(
        u
    )
    r2 = (rho - 4.0) * (rho - 2.0) * jnp.asarray(r_scale, dtype) / rho
    r = jnp.where(rho >= 5.0, jnp.sqrt(jnp.maximum(r2, 0.0)), 0.0).astype(dtype)
    return StepScalars(bc1=bc1, bc2=bc2, rho=rho, r=r)


def scale_by_adabelief(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-16,
    *,
    amsgrad: bool = False,
    rectify: bool = True,
    degenerated_to_sgd: bool = True,
) -> optax.GradientTransformation:
    """The AdaBelief direction ``d`` (to be scaled by ``-lr``), without weight decay.

    ``m = b1 m + (1-b1) g``, ``s = b2 s + (1-b2)(g-m)^2 + eps``, ``v = s`` (amsgrad:
    ``max(s_max, s)``), then ``d = m/bc1 / (sqrt(v)/sqrt(bc2) + eps)`` without rectification,
    else ``d = r sqrt(bc2)/bc1 * m/(sqrt(v) + eps)`` where ``rho_t >= 5``, and ``m/bc1``
    (``degenerated_to_sgd``) or ``0`` before that. Moments are float32 for 16-bit inputs.
    """
    _check_beta("b1", b1)
    _check_beta("b2", b2)
    _check_nonneg("eps", eps)

    def init_fn(params: optax.Params) -> ScaleByAdaBeliefState:
        def zeros(p: jax.Array) -> jax.Array:
            return jnp.zeros(jnp.shape(p), _compute_dtype(jnp.result_type(p)))

        mu = jax.tree.map(zeros, params)
        nu = jax.tree.map(zeros, params)
        nu_max = jax.tree.map(zeros, params) if amsgrad else None
        return ScaleByAdaBeliefState(jnp.zeros([], jnp.int32), mu, nu, nu_max)

    def update_fn(
        updates: optax.Updates, state: ScaleByAdaBeliefState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, ScaleByAdaBeliefState]:
        del params
        count = optax.safe_int32_increment(state.count)
        scalars: dict[jnp.dtype, StepScalars] = {}

        def scalars_for(dtype: jnp.dtype) -> StepScalars:
            if dtype not in scalars:  # once per compute dtype
                scalars[dtype] = step_scalars(count, b1, b2, dtype)
            return scalars[dtype]

        def direction(m: jax.Array, v: jax.Array) -> jax.Array:
            sc = scalars_for(m.dtype)
            if not rectify:
                return m / sc.bc1 / (jnp.sqrt(v) / jnp.sqrt(sc.bc2) + eps)
            adaptive = m * (sc.r * jnp.sqrt(sc.bc2) / sc.bc1) / (jnp.sqrt(v) + eps)
            fallback = m / sc.bc1 if degenerated_to_sgd else jnp.zeros_like(m)
            return jnp.where(sc.rho >= 5.0, adaptive, fallback)

        grads = jax.tree.map(lambda g, m: g.astype(m.dtype), updates, state.mu)
        mu = jax.tree.map(lambda g, m: b1 * m + (1.0 - b1) * g, grads, state.mu)
        nu = jax.tree.map(
            lambda g, m, s: b2 * s + (1.0 - b2) * jnp.square(g - m) + eps, grads, mu, state.nu
        )
        nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu) if amsgrad else None
        new_updates = jax.tree.map(direction, mu, nu_max if amsgrad else nu)
        return new_updates, ScaleByAdaBeliefState(count, mu, nu, nu_max)

    return optax.GradientTransformation(init_fn, update_fn)


def add_scaled_params(scale: Any) -> optax.GradientTransformation:
    """``updates + scale * params``, computed in float32 for 16-bit leaves.

    Unlike :func:`optax.add_decayed_weights`, ``scale * params`` is not rounded to a 16-bit
    parameter dtype first, matching PyTorch's float32 math for half-precision parameters.
    """

    def init_fn(params: optax.Params) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(
        updates: optax.Updates, state: optax.EmptyState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, optax.EmptyState]:
        if params is None:
            raise ValueError(
                "adabelief weight decay needs the params: call update(g, state, params)"
            )

        def leaf(u: jax.Array, p: jax.Array) -> jax.Array:
            dtype = jnp.promote_types(
                _compute_dtype(jnp.result_type(u)), _compute_dtype(jnp.result_type(p))
            )
            return u.astype(dtype) + scale * p.astype(dtype)

        return jax.tree.map(leaf, updates, params), state

    return optax.GradientTransformation(init_fn, update_fn)


def add_fixed_decay(
    weight_decay: Any, learning_rate: float | optax.Schedule
) -> optax.GradientTransformation:
    """``updates - wd * params`` (fixed decoupled decay), except at a step whose learning rate
    is 0, which changes nothing, as in :class:`adabelief.AdaBelief`."""

    def init_fn(params: optax.Params) -> optax.ScaleByScheduleState:
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(
        updates: optax.Updates,
        state: optax.ScaleByScheduleState,
        params: optax.Params | None = None,
    ) -> tuple[optax.Updates, optax.ScaleByScheduleState]:
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        scale = jnp.where(jnp.asarray(lr) != 0, -weight_decay, 0.0)
        updates, _ = add_scaled_params(scale).update(updates, optax.EmptyState(), params)
        return updates, optax.ScaleByScheduleState(count=state.count + 1)

    return optax.GradientTransformation(init_fn, update_fn)


def adabelief(
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-16,
    weight_decay: float = 0.0,
    *,
    amsgrad: bool = False,
    weight_decouple: bool = True,
    fixed_decay: bool = False,
    rectify: bool = True,
    degenerated_to_sgd: bool = True,
    maximize: bool = False,
    mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """AdaBelief (Zhuang et al., 2020) with the numerics of :class:`adabelief.AdaBelief`.

    Defaults are those of the official ``adabelief-pytorch`` 0.2 (``eps=1e-16``, rectification
    and decoupled weight decay on). See the module docstring for the update rule.

    Args:
        learning_rate: a float, or an optax schedule (a callable of the update count, from 0).
        b1, b2: decay rates of the first moment and of the belief ``s``; in ``[0, 1)``.
        eps: added to ``s`` each step and to the denominator.
        weight_decay: decoupled (``theta *= 1 - lr*wd``) or, with ``weight_decouple=False``,
            L2 added to the gradient before the moments.
        amsgrad: use the running maximum of ``s``.
        weight_decouple: see ``weight_decay``.
        fixed_decay: decoupled decay without the learning rate: ``theta *= 1 - wd``.
        rectify: RAdam-style rectification of the adaptive step.
        degenerated_to_sgd: while the rectification is undefined (``rho_t < 5``) take an SGD
            with momentum step ``lr/bc1 * m``; else no step.
        maximize: maximize the objective (negate the gradients first).
        mask: a pytree of bools (or a callable of the params returning one) with the params'
            structure; only ``True`` leaves get weight decay, as in :func:`optax.adamw`.

    Returns:
        A gradient transformation; its ``update(grads, state, params)`` gives updates for
        :func:`optax.apply_updates` (params are needed when ``weight_decay != 0``).
    """
    if _is_number(learning_rate):
        _check_nonneg("learning_rate", learning_rate)
    _check_beta("b1", b1)
    _check_beta("b2", b2)
    _check_nonneg("eps", eps)
    _check_nonneg("weight_decay", weight_decay)
    decay = not (_is_number(weight_decay) and weight_decay == 0.0)

    def decay_step(scale: Any) -> optax.GradientTransformation:
        tx = add_scaled_params(scale)
        return tx if mask is None else optax.masked(tx, mask)

    parts: list[optax.GradientTransformation] = []
    if maximize:
        parts.append(optax.scale(-1.0))
    if decay and not weight_decouple:
        parts.append(decay_step(weight_decay))  # L2: g + wd*theta, before the moments
    parts.append(
        scale_by_adabelief(
            b1, b2, eps, amsgrad=amsgrad, rectify=rectify, degenerated_to_sgd=degenerated_to_sgd
        )
    )
    if decay and weight_decouple and not fixed_decay:
        parts.append(decay_step(weight_decay))  # -lr*(d + wd*theta)
    parts.append(optax.scale_by_learning_rate(learning_rate))
    if decay and weight_decouple and fixed_decay:
        fixed = add_fixed_decay(weight_decay, learning_rate)  # -lr*d - wd*theta
        parts.append(fixed if mask is None else optax.masked(fixed, mask))
    return optax.chain(*parts)
