"""AdaBelief for Keras 3 (any backend), with the numerics of :class:`adabelief.AdaBelief`.

Importing this module registers the optimizer for Keras serialization (as
``"adabelief>AdaBelief"``), so that ``keras.saving.load_model`` restores a model compiled with
it without ``custom_objects``. ``import adabelief`` alone does not import Keras.

Per element, at step ``t = iterations + 1`` with learning rate ``lr`` and weight decay ``wd``::

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
Variables stored in float16/bfloat16 get float32 state and float32 math, rounded back once.
The moments and the step are :mod:`adabelief._array_update`, shared with the optax transform,
on ``keras.ops``.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from adabelief import _array_update
from adabelief._array_scalars import StepScalars, array_step_scalars, is_number
from adabelief._validation import check_beta1, check_beta2, check_eps, check_nonnegative

__all__ = ["AdaBelief", "StepScalars", "step_scalars"]

_HALF_DTYPES = ("float16", "bfloat16")


def step_scalars(
    step: Any,
    lr: Any,
    beta1: Any,
    beta2: Any,
    *,
    rectify: bool,
    degenerated_to_sgd: bool,
    dtype: str = "float32",
) -> StepScalars:
    """The :class:`~adabelief.StepScalars` of step ``step`` (1-based) for learning rate ``lr``,
    as :func:`adabelief.step_scalars` computes them, but as ``dtype`` tensors, graph-friendly and
    within float32 rounding of PyTorch's float64 values (see :mod:`adabelief._array_scalars`)."""
    return array_step_scalars(
        ops,
        step,
        lr,
        beta1,
        beta2,
        rectify=rectify,
        degenerated_to_sgd=degenerated_to_sgd,
        dtype=dtype,
    )


@keras.saving.register_keras_serializable(package="adabelief")
class AdaBelief(keras.optimizers.Optimizer):
    """AdaBelief optimizer (Zhuang et al., NeurIPS 2020), numerically matching the PyTorch one.

    See the module docstring for the update rule. Defaults are those of the official
    ``adabelief-pytorch`` 0.2 (``epsilon=1e-16``, rectification and decoupled decay on).

    Args:
        learning_rate: a float, a ``keras.optimizers.schedules.LearningRateSchedule``, or a
            callable without arguments returning the learning rate. Defaults to ``0.001``.
        beta_1: decay rate of the first moment ``m``, in ``(0, 1)``. Defaults to ``0.9``. ``0``
            is refused: the belief ``(g - m)^2`` would be identically 0 and the step diverge
            (GANs: use ``0.5``).
        beta_2: decay rate of the belief ``s``, in ``[0, 1)``. Defaults to ``0.999``.
        epsilon: added to ``s`` every step and to the denominator; must be > 0 (``s`` can be
            exactly 0, so 0 would give 0/0). Defaults to ``1e-16``.
        weight_decay: decay coefficient; ``0.0`` or ``None`` disable it. Unlike Keras' own
            optimizers it follows ``weight_decouple``/``fixed_decay`` below, is applied before
            the moments with this step's learning rate, and honours
            ``exclude_from_weight_decay``, which, unlike in Keras' own optimizers, is saved
            with the optimizer (see :meth:`exclude_from_weight_decay`).
        amsgrad: use the running maximum of ``s`` (also in the rectified step).
        weight_decouple: decoupled decay ``theta *= 1 - lr*wd`` (AdamW style); ``False`` adds
            ``wd*theta`` to the gradient (L2).
        fixed_decay: with ``weight_decouple``, decay without the learning rate:
            ``theta *= 1 - wd``.
        rectify: RAdam-style rectification of the adaptive step.
        degenerated_to_sgd: while the rectification is undefined (``rho_t < 5``), take an SGD
            with momentum step ``lr/bc1 * m``; else no step.
        maximize: maximize the objective instead of minimizing it.
        clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum, ema_overwrite_frequency,
        loss_scale_factor, gradient_accumulation_steps, name: as for every
            ``keras.optimizers.Optimizer``.
    """

    def __init__(
        self,
        learning_rate: Any = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-16,
        weight_decay: float | None = 0.0,
        amsgrad: bool = False,
        weight_decouple: bool = True,
        fixed_decay: bool = False,
        rectify: bool = True,
        degenerated_to_sgd: bool = True,
        maximize: bool = False,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: int | None = None,
        loss_scale_factor: float | None = None,
        gradient_accumulation_steps: int | None = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        if is_number(learning_rate):
            learning_rate = check_nonnegative("learning_rate", learning_rate)
        if weight_decay is not None:
            weight_decay = check_nonnegative("weight_decay", weight_decay)
        # Newer base-class arguments are forwarded only when set (older Keras 3 lacks them).
        if loss_scale_factor is not None:
            kwargs["loss_scale_factor"] = loss_scale_factor
        if gradient_accumulation_steps is not None:
            kwargs["gradient_accumulation_steps"] = gradient_accumulation_steps
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            name=name,
            **kwargs,
        )
        self.beta_1 = check_beta1("beta_1", beta_1)
        self.beta_2 = check_beta2("beta_2", beta_2)
        self.epsilon = check_eps("epsilon", epsilon)
        self.amsgrad = bool(amsgrad)
        self.weight_decouple = bool(weight_decouple)
        self.fixed_decay = bool(fixed_decay)
        self.rectify = bool(rectify)
        self.degenerated_to_sgd = bool(degenerated_to_sgd)
        self.maximize = bool(maximize)
        # Per-step scalars by compute dtype, shared by the variables of one update (see
        # `_backend_update_step`); None outside an update.
        self._scalar_cache: dict[str, StepScalars] | None = None
        # What exclude_from_weight_decay was given, in the form get_config saves.
        self._excluded_names: list[str] = []
        self._excluded_paths: list[str] = []

    def exclude_from_weight_decay(
        self, var_list: list[Any] | None = None, var_names: list[str] | None = None
    ) -> None:
        """Exclude variables from weight decay, as Keras' own method (before the optimizer is
        built): ``var_list`` the variables themselves, ``var_names`` patterns searched in the
        variables' names. Unlike Keras' AdamW, both are kept by :meth:`get_config` (the
        variables as their paths, such as ``"sequential/dense/kernel"``), so a model saved to
        ``.keras`` and loaded again resumes with the same decay. A loaded model's paths may
        lack the outer model's name (``"dense/kernel"``), so a saved path matches a variable
        when one path ends with the other, component by component."""
        super().exclude_from_weight_decay(var_list=var_list, var_names=var_names)
        self._excluded_names = sorted(set(var_names or ()))
        self._excluded_paths = sorted({_variable_path(v) for v in var_list or ()})

    def _use_weight_decay(self, variable: Any) -> bool:
        path = _variable_path(variable).split("/")
        for excluded in self._excluded_paths:  # after loading there are no ids, only paths
            parts = excluded.split("/")
            n = min(len(parts), len(path))
            if parts[-n:] == path[-n:]:
                return False
        return bool(super()._use_weight_decay(variable))

    def _add_state(self, variable: Any, name: str) -> Any:
        """A zero state variable like ``variable``, float32 if ``variable`` is 16-bit."""
        dtype = keras.backend.standardize_dtype(variable.dtype)
        if dtype not in _HALF_DTYPES:
            return self.add_variable_from_reference(variable, name=name)
        prefix = getattr(variable, "path", None) or str(variable.name).replace(":", "_")
        kwargs: dict[str, Any] = {}
        layout = getattr(variable, "_layout", None)
        if layout is not None:
            kwargs["layout"] = layout
        return self.add_variable(
            shape=variable.shape,
            dtype="float32",
            name=f"{prefix.replace('/', '_')}_{name}",
            **kwargs,
        )

    def build(self, var_list: list[Any]) -> None:
        """Create ``exp_avg`` (m), ``exp_avg_var`` (s) and, for amsgrad, ``max_exp_avg_var``."""
        if self.built:
            return
        super().build(var_list)
        self._exp_avgs: list[Any] = []
        self._exp_avg_vars: list[Any] = []
        self._max_exp_avg_vars: list[Any] = []
        for variable in var_list:
            if getattr(variable, "overwrite_with_gradient", False):
                # Overwritten directly by the base class; no state needed.
                self._exp_avgs.append(None)
                self._exp_avg_vars.append(None)
                self._max_exp_avg_vars.append(None)
                continue
            self._exp_avgs.append(self._add_state(variable, "exp_avg"))
            self._exp_avg_vars.append(self._add_state(variable, "exp_avg_var"))
            self._max_exp_avg_vars.append(
                self._add_state(variable, "max_exp_avg_var") if self.amsgrad else None
            )

    def _backend_update_step(
        self, grads: Any, trainable_variables: Any, learning_rate: Any
    ) -> None:
        # Compute the per-step scalars once per update instead of once per variable (eager
        # backends would otherwise launch ~30 scalar ops per variable); the backend's own
        # dispatch (e.g. tf.distribute) is kept.
        self._scalar_cache = {}
        try:
            super()._backend_update_step(grads, trainable_variables, learning_rate)
        finally:
            self._scalar_cache = None

    def _step_scalars(self, learning_rate: Any, dtype: str) -> StepScalars:
        """The scalars of this update; ``learning_rate`` is the same for all its variables."""
        cache = self._scalar_cache
        if cache is not None and dtype in cache:
            return cache[dtype]
        scalars = step_scalars(
            ops.add(self.iterations, 1),
            learning_rate,
            self.beta_1,
            self.beta_2,
            rectify=self.rectify,
            degenerated_to_sgd=self.degenerated_to_sgd,
            dtype=dtype,
        )
        if cache is not None:
            cache[dtype] = scalars
        return scalars

    def _apply_weight_decay(self, variables: list[Any]) -> None:
        # Weight decay is part of `update_step` (its placement and form differ from Keras').
        return

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """One AdaBelief step on ``variable`` (see the module docstring)."""
        var_dtype = keras.backend.standardize_dtype(variable.dtype)
        dtype = "float32" if var_dtype in _HALF_DTYPES else var_dtype
        index = self._get_variable_index(variable)
        exp_avg, exp_avg_var = self._exp_avgs[index], self._exp_avg_vars[index]
        b1, b2, eps = self.beta_1, self.beta_2, self.epsilon

        lr = ops.cast(learning_rate, dtype)
        g = ops.cast(gradient, dtype)
        p = ops.cast(variable, dtype)
        if self.maximize:
            g = ops.negative(g)
        wd = self.weight_decay
        if wd and self._use_weight_decay(variable):
            if not self.weight_decouple:
                g = g + wd * p
            elif self.fixed_decay:  # a step at lr == 0 changes nothing, as in PyTorch
                p = p * (1.0 - wd * ops.cast(ops.not_equal(lr, 0.0), dtype))
            else:
                p = p * (1.0 - lr * wd)

        m = _array_update.first_moment(exp_avg, g, b1)
        s = _array_update.belief(ops, exp_avg_var, g, m, b2, eps)
        self.assign(exp_avg, m)
        self.assign(exp_avg_var, s)
        v = s
        if self.amsgrad:
            v = ops.maximum(self._max_exp_avg_vars[index], s)
            self.assign(self._max_exp_avg_vars[index], v)

        step = _array_update.parameter_step(ops, m, v, self._step_scalars(lr, dtype), eps)
        self.assign(variable, ops.cast(p - step, var_dtype))

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "amsgrad": self.amsgrad,
                "weight_decouple": self.weight_decouple,
                "fixed_decay": self.fixed_decay,
                "rectify": self.rectify,
                "degenerated_to_sgd": self.degenerated_to_sgd,
                "maximize": self.maximize,
            }
        )
        if self._excluded_names or self._excluded_paths:
            config["exclude_from_weight_decay"] = {
                "var_names": list(self._excluded_names),
                "var_paths": list(self._excluded_paths),
            }
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> AdaBelief:
        """The optimizer of :meth:`get_config`, with its ``exclude_from_weight_decay``."""
        config = dict(config)
        excluded = config.pop("exclude_from_weight_decay", None)
        optimizer = super().from_config(config, custom_objects=custom_objects)
        if excluded:
            optimizer.exclude_from_weight_decay(var_names=excluded.get("var_names") or None)
            optimizer._excluded_paths = sorted(excluded.get("var_paths", ()))
        return optimizer


def _variable_path(variable: Any) -> str:
    """A variable's path (``"dense/kernel"``), which survives saving; its name if it has none."""
    return str(getattr(variable, "path", None) or variable.name)
