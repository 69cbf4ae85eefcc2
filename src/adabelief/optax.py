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
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adabelief._array_scalars import StepScalars, array_step_scalars, is_number

__all__ = [
    "ScaleByAdaBeliefState",
    "StepScalars",
    "adabelief",
    "add_scaled_params",
    "scale_by_adabelief",
    "step_scalars",
]

_HALF_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


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


def _check_nonneg(name: str, value: Any) -> None:
    if is_number(value) and not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"Invalid {name}: {value!r} (must be finite and >= 0)")


def _check_beta(name: str, value: Any) -> None:
    if is_number(value) and not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {name}: {value!r} (must be in [0, 1))")


#: jax.numpy as the operations namespace of :func:`adabelief._array_scalars.array_step_scalars`.
_JNP_OPS = SimpleNamespace(
    cast=lambda x, dtype: jnp.asarray(x).astype(dtype),
    log=jnp.log,
    exp=jnp.exp,
    expm1=jnp.expm1,
    sqrt=jnp.sqrt,
    minimum=jnp.minimum,
    maximum=jnp.maximum,
    clip=jnp.clip,
    where=jnp.where,
    zeros_like=jnp.zeros_like,
)


def step_scalars(
    step: jax.typing.ArrayLike, b1: Any, b2: Any, dtype: Any = jnp.float32
) -> StepScalars:
    """Bias corrections and rectification terms of step ``step`` (1-based), jit-friendly, within
    float32 rounding of PyTorch's float64 values (see :mod:`adabelief._array_scalars`). The
    constants are float64 when ``b1``/``b2`` are Python numbers, else (e.g. under
    ``optax.inject_hyperparams``) computed in ``dtype``."""
    return array_step_scalars(_JNP_OPS, step, b1, b2, jnp.dtype(dtype))


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
    if is_number(learning_rate):
        _check_nonneg("learning_rate", learning_rate)
    _check_beta("b1", b1)
    _check_beta("b2", b2)
    _check_nonneg("eps", eps)
    _check_nonneg("weight_decay", weight_decay)
    decay = not (is_number(weight_decay) and weight_decay == 0.0)

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
