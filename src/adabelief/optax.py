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
The moments and the direction are :mod:`adabelief._array_update`, shared with the Keras optimizer,
on ``jax.numpy``.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adabelief import _array_update
from adabelief._array_scalars import StepScalars, array_step_scalars, is_number
from adabelief._validation import check_beta1, check_beta2, check_eps, check_nonnegative

__all__ = [
    "ScaleByAdaBeliefState",
    "StepScalars",
    "adabelief",
    "add_scaled_params",
    "check_hyperparams",
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


def _check(check: Callable[[str, Any], float], name: str, value: Any) -> None:
    """Validate a hyperparameter unless it is traced (e.g. by ``optax.inject_hyperparams`` under
    ``jax.jit``): its value is then unknown until the step runs."""
    if not isinstance(value, jax.core.Tracer):
        check(name, value)


#: The check of each hyperparameter that optax.inject_hyperparams may inject, by name.
_HYPERPARAMETER_CHECKS: dict[str, Callable[[str, Any], float]] = {
    "learning_rate": check_nonnegative,
    "b1": check_beta1,
    "b2": check_beta2,
    "eps": check_eps,
    "weight_decay": check_nonnegative,
}


def check_hyperparams(state: optax.OptState) -> None:
    """Validate the hyperparameters that :func:`optax.inject_hyperparams` keeps in ``state``
    (found anywhere in it, e.g. inside an :func:`optax.chain`), with the checks of
    :func:`adabelief`.

    The factories validate every concrete value, but under :func:`jax.jit` they see tracers,
    whose values are unknown until the step runs, so an injected value (set in
    ``state.hyperparams``, or computed by a schedule) is not checked there. Between jitted
    steps the state's values are concrete: call this there, for example after changing one.
    Traced values are skipped.

    Raises:
        ValueError: naming the hyperparameter and its value, as the factories do.
    """
    hyperparams = getattr(state, "hyperparams", None)
    if isinstance(hyperparams, dict):
        for name, check in _HYPERPARAMETER_CHECKS.items():
            if name in hyperparams:
                _check(check, name, hyperparams[name])
    if isinstance(state, (tuple, list)):
        for child in state:
            check_hyperparams(child)


#: jax.numpy as the array namespace of :mod:`adabelief._array_scalars` and
#: :mod:`adabelief._array_update`.
_JNP_OPS = SimpleNamespace(
    cast=lambda x, dtype: jnp.asarray(x).astype(dtype),
    log=jnp.log,
    exp=jnp.exp,
    expm1=jnp.expm1,
    sqrt=jnp.sqrt,
    square=jnp.square,
    minimum=jnp.minimum,
    maximum=jnp.maximum,
    clip=jnp.clip,
    where=jnp.where,
    zeros_like=jnp.zeros_like,
)


def step_scalars(
    step: jax.typing.ArrayLike,
    lr: Any,
    beta1: Any,
    beta2: Any,
    *,
    rectify: bool,
    degenerated_to_sgd: bool,
    dtype: Any = jnp.float32,
) -> StepScalars:
    """The :class:`~adabelief.StepScalars` of step ``step`` (1-based) for learning rate ``lr``,
    as :func:`adabelief.step_scalars` computes them, but as ``dtype`` arrays, jit-friendly and
    within float32 rounding of PyTorch's float64 values (see :mod:`adabelief._array_scalars`).
    The constants are float64 when the betas are Python numbers, else (e.g. under
    ``optax.inject_hyperparams``) computed in ``dtype``. :func:`scale_by_adabelief` uses
    ``lr = 1``."""
    return array_step_scalars(
        _JNP_OPS,
        step,
        lr,
        beta1,
        beta2,
        rectify=rectify,
        degenerated_to_sgd=degenerated_to_sgd,
        dtype=jnp.dtype(dtype),
    )


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
    ``b1 = 0`` is refused (see :func:`adabelief`).
    """
    _check(check_beta1, "b1", b1)
    _check(check_beta2, "b2", b2)
    _check(check_eps, "eps", eps)

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
                scalars[dtype] = step_scalars(
                    count,
                    1.0,
                    b1,
                    b2,
                    rectify=rectify,
                    degenerated_to_sgd=degenerated_to_sgd,
                    dtype=dtype,
                )
            return scalars[dtype]

        def direction(m: jax.Array, v: jax.Array) -> jax.Array:
            return _array_update.parameter_step(_JNP_OPS, m, v, scalars_for(m.dtype), eps)

        grads = jax.tree.map(lambda g, m: g.astype(m.dtype), updates, state.mu)
        mu = jax.tree.map(lambda g, m: _array_update.first_moment(m, g, b1), grads, state.mu)
        nu = jax.tree.map(
            lambda g, m, s: _array_update.belief(_JNP_OPS, s, g, m, b2, eps), grads, mu, state.nu
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
        b1, b2: decay rates of the first moment and of the belief ``s``; ``b1`` in ``(0, 1)``,
            ``b2`` in ``[0, 1)``. ``b1 = 0`` is refused: the belief ``(g - m)^2`` would be
            identically 0 and the step diverge (GANs: use ``0.5``).
        eps: added to ``s`` each step and to the denominator; must be > 0 (``s`` can be
            exactly 0, so 0 would give 0/0).
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
    if not callable(learning_rate):
        _check(check_nonnegative, "learning_rate", learning_rate)
    _check(check_beta1, "b1", b1)
    _check(check_beta2, "b2", b2)
    _check(check_eps, "eps", eps)
    _check(check_nonnegative, "weight_decay", weight_decay)
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
