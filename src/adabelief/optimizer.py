"""``adabelief.AdaBelief``: the optimizer class (validation, groups, state).

Each step hands every group's tensors to :func:`adabelief.kernels.dispatch.run`, which picks
the path (fused CPU, compiled, tensor math, foreach, single-tensor) and calls it once. The
per-step scalars are :mod:`adabelief.scalars`; loading other layouts is
:mod:`adabelief.checkpoint`; the storage of the moments is :mod:`adabelief.compressed_state`;
the step inside backward (``step_in_backward=True``) is :mod:`adabelief.backward_step`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import (
    Optimizer,
    ParamsT,
    _get_fused_kernels_supported_devices,
    _use_grad_for_differentiable,
)

from adabelief import _validation as validation
from adabelief import compressed_state
from adabelief import master_weights as _master_weights
from adabelief.backward_step import BackwardStep, check_group
from adabelief.checkpoint import migrate_state_dict, restore_moment_dtypes, saved_moments
from adabelief.kernels import GroupTensors, cpu, dispatch
from adabelief.kernels.dispatch import adabelief

__all__ = ["AdaBelief", "adabelief"]

#: Options every group carries, with the constructor's defaults. Each is a per-group setting.
OPTION_DEFAULTS: dict[str, Any] = {
    "amsgrad": False,
    "weight_decouple": True,
    "fixed_decay": False,
    "rectify": True,
    "degenerated_to_sgd": True,
    "maximize": False,
    "foreach": None,
    "fused": None,
    "capturable": False,
    "differentiable": False,
    "state_precision": "fp32",
    "step_in_backward": False,
    "master_weights": "round",
}


#: Options that must be bools; ``foreach`` and ``fused`` may also be None (chosen per device).
BOOL_OPTIONS = (
    "amsgrad",
    "weight_decouple",
    "fixed_decay",
    "rectify",
    "degenerated_to_sgd",
    "maximize",
    "capturable",
    "differentiable",
)
OPTIONAL_BOOL_OPTIONS = ("foreach", "fused")


def _check_fused_param(p: Tensor) -> None:
    """``RuntimeError``, as torch's fused optimizers raise it, unless ``p`` is a floating (or
    complex) tensor on a device with a fused path."""
    supported = _get_fused_kernels_supported_devices()
    if p.device.type not in supported or not (p.is_floating_point() or p.is_complex()):
        raise RuntimeError(
            "`fused=True` requires all the params to be floating point Tensors of "
            f"supported devices: {supported} but {p.dtype} and {p.device.type}"
        )


class AdaBelief(Optimizer):
    r"""AdaBelief (Zhuang et al., NeurIPS 2020): Adam whose second moment is the belief
    ``s_t = EMA((g_t - m_t)^2) + eps`` in the gradient rather than ``EMA(g_t^2)``.

    Per element, at step ``t`` (see :mod:`adabelief.scalars` for the rectified form)::

        theta *= 1 - lr*wd          (weight_decouple; 1 - wd with fixed_decay)
        g     += wd * theta         (weight_decouple=False: L2 in the gradient, never in p.grad)
        m      = beta1*m + (1 - beta1)*g
        s      = beta2*s + (1 - beta2)*(g - m)^2 + eps
        theta -= lr/(1 - beta1^t) * m / (sqrt(s)/sqrt(1 - beta2^t) + eps)

    Defaults are those of the official ``adabelief-pytorch`` 0.2.x, so migrating from it only
    changes the import. The paper's own experiments used eps=1e-8 without decoupling or
    rectification (package version 0.0.5).

    Args:
        params: an iterable of tensors or of parameter-group dicts.
        lr: learning rate (float or 1-element tensor). Default 1e-3.
        betas: decay rates of the first moment and of the belief. Default (0.9, 0.999).
        eps: added to the belief state at every step and to the denominator; must be > 0 (the
            belief can be exactly 0, and eps = 0 would give 0/0 = NaN). Default 1e-16.
        weight_decay: weight decay coefficient. Default 0.
        amsgrad: use the running maximum of the belief (also in the rectified update).
        weight_decouple: decoupled (AdamW-style) decay if True, L2 in the gradient if False.
        fixed_decay: decoupled decay by ``wd`` per step, independent of ``lr``.
        rectify: RAdam's variance warm-up.
        degenerated_to_sgd: during the warm-up, take SGD-with-momentum steps (else no step).
        maximize: maximize the objective.
        foreach: use the multi-tensor kernel (None: chosen per device).
        fused: use the fused single-pass kernel (None: chosen where it is correct and faster).
        capturable: keep the step count on the parameters' device, with no host synchronisation
            (CUDA graphs).
        differentiable: let autograd run through the step (single-tensor kernel).
        state_precision: how the moments are stored between steps: ``"fp32"`` (default, 8 bytes
            per parameter), ``"bf16"`` (4 bytes, stochastic rounding), ``"int8"`` (about 2
            bytes, block-wise quantized, tensors of 4096 elements or more) or ``"int4"`` (about
            1.06 bytes, two 4-bit codes per byte; int8 where it does not apply); the math is
            float32 in every case. See :mod:`adabelief.compressed_state`.
        step_in_backward: update each parameter inside ``loss.backward()`` as soon as its
            gradient is accumulated, and set its ``.grad`` to None at once, so the gradients of
            the model are never all held (saves up to 4 bytes per float32 parameter). The same
            kernel as an ordinary step, with the group's current options. ``step()`` and
            ``zero_grad()`` then only end the optimizer step for these parameters: each steps
            at most once between two calls of either (a second backward pass raises); mark
            the backward passes that only accumulate with :meth:`accumulating`. Not with
            anything that needs every gradient before any step (global gradient-norm clipping,
            GradScaler, DDP), nor with reentrant activation checkpointing, nor with a second
            optimizer on the same parameters; see :mod:`adabelief.backward_step` and
            docs/step-in-backward.md.
        master_weights: how a float16 or bfloat16 parameter keeps the updates it is too coarse
            to hold (float32, float64 and complex parameters have their master already: the
            option does nothing for them). ``"round"`` (default): the float32 result is
            rounded to nearest, as torch's optimizers do; no state, but updates under half a
            unit in the last place (ulp) are lost, which stalls training at small learning
            rates. ``"residual"``: 1 byte per parameter, an int8 code of the float32 master's
            difference from the weight in 1/256 ulp (rounded stochastically, with the
            deterministic dither of the moments): trains as float32 master weights do.
            ``"fp32"``: 4 bytes, the float32 master itself. ``"stochastic"``: no state, the
            weight rounded stochastically (kept in expectation, noisier). The default keeps
            the behaviour, the state and the checkpoints of earlier versions (and of
            ``adabelief-pytorch``) unchanged; pick ``"residual"`` for 16-bit training. See
            :mod:`adabelief.master_weights` and docs/mixed-precision.md.

    State per parameter: ``step`` (0-dim tensor), ``exp_avg``, ``exp_avg_var`` and, with AMSGrad,
    ``max_exp_avg_var``; the moments are float32 for float16 and bfloat16 parameters (with
    ``state_precision="int8"`` or ``"int4"`` also ``exp_avg_scale``, ``exp_avg_var_scale``, ...
    per block).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-16,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        weight_decouple: bool = True,
        fixed_decay: bool = False,
        rectify: bool = True,
        degenerated_to_sgd: bool = True,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        state_precision: str = "fp32",
        step_in_backward: bool = False,
        master_weights: str = "round",
    ) -> None:
        validation.check_nonnegative("lr", lr)
        _master_weights.check_master_weights(master_weights)
        compressed_state.check_state_precision(state_precision)
        validation.check_eps("eps", eps)
        validation.check_nonnegative("weight_decay", weight_decay)
        betas = validation.check_betas(betas)
        if isinstance(lr, Tensor) and lr.dim() != 0:
            lr = lr.reshape(())
        defaults = dict(
            OPTION_DEFAULTS,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            weight_decouple=weight_decouple,
            fixed_decay=fixed_decay,
            rectify=rectify,
            degenerated_to_sgd=degenerated_to_sgd,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            differentiable=differentiable,
            state_precision=state_precision,
            step_in_backward=step_in_backward,
            master_weights=master_weights,
        )
        self._backward = self._new_backward_step()
        super().__init__(params, defaults)  # add_param_group validates the options
        _master_weights.keep_masters_on_load(self)
        if fused:
            reason = cpu.kernel_error()
            if reason is not None:
                dispatch.warn_fallback(reason)
            # GradScaler hands the fused kernel the scaled gradients with grad_scale/found_inf.
            self._step_supports_amp_scaling = True

    def _new_backward_step(self) -> BackwardStep:
        backward = BackwardStep(self)
        weakref.finalize(self, backward.remove)  # no hook outlives its optimizer
        return backward

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in OPTION_DEFAULTS.items():
                group.setdefault(key, value)
        if "_backward" not in self.__dict__:  # unpickled or deep-copied: hook its own params
            self._backward = self._new_backward_step()
            _master_weights.keep_masters_on_load(self)
        self._backward.sync()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for name in ("lr", "weight_decay"):
            if name in param_group:
                validation.check_nonnegative(name, param_group[name])
        if "eps" in param_group:
            validation.check_eps("eps", param_group["eps"])
        if "betas" in param_group:
            param_group["betas"] = validation.check_betas(param_group["betas"])
        if "state_precision" in param_group:
            compressed_state.check_state_precision(param_group["state_precision"])
        if "master_weights" in param_group:
            _master_weights.check_master_weights(param_group["master_weights"])
        merged = {**self.defaults, **param_group}
        for name in BOOL_OPTIONS:
            validation.check_bool(name, merged[name])
        for name in OPTIONAL_BOOL_OPTIONS:
            validation.check_bool(name, merged[name], allow_none=True)
        check_group(merged)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        # As torch's fused optimizers: RuntimeError for what no fused path implements.
        if group["fused"]:
            if group["foreach"]:
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
            if group["differentiable"]:
                raise RuntimeError("`fused` does not support `differentiable`")
            # As torch: parameters on "meta" (a model built there, materialised later) are
            # checked when first stepped (_param_state).
            for p in group["params"]:
                if not p.is_meta:
                    _check_fused_param(p)
        if group["step_in_backward"]:
            self._backward.sync()
            # So that GradScaler hands step() grad_scale/found_inf, which it refuses.
            self._step_supports_amp_scaling = True

    # Eager under torch.compile: traced, its guards would hold each step's new gradients by
    # identity and recompile every step (torch intercepts _init_group only with list arguments).
    @torch._disable_dynamo
    def _init_group(
        self,
        group: dict[str, Any],
        tensors: GroupTensors,
        params: Iterable[Tensor] | None = None,
    ) -> None:
        """Append the group's parameters that have a gradient (``params``, default all of the
        group's), with their state (created on first use, converted when ``state_precision``
        changed), to the lists of ``tensors``, each moment as one
        :class:`~adabelief.compressed_state.Moment` of the state's tensors.

        torch's convention (``torch.compile`` runs this method eagerly, not traced)."""
        amsgrad, differentiable = group["amsgrad"], group["differentiable"]
        masters = tensors.masters if isinstance(tensors.masters, list) else None  # _step_params
        master_weights = group["master_weights"]
        for p in group["params"] if params is None else params:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise ValueError(
                    f"AdaBelief does not support sparse gradients (parameter of shape "
                    f"{tuple(p.shape)}); use torch.optim.SparseAdam for sparse embeddings"
                )
            state, fmt = self._param_state_and_format(group, p)
            if differentiable and state["step"].requires_grad:
                raise ValueError(
                    "`requires_grad` is not supported for `step` in differentiable mode"
                )
            tensors.params.append(p)
            tensors.grads.append(grad)
            exp_avg, exp_avg_var, max_exp_avg_var = compressed_state.step_moments(
                state, fmt, amsgrad
            )
            tensors.exp_avgs.append(exp_avg)
            tensors.exp_avg_vars.append(exp_avg_var)
            if max_exp_avg_var is not None:
                tensors.max_exp_avg_vars.append(max_exp_avg_var)
            tensors.state_steps.append(state["step"])
            if masters is not None:
                masters.append(_master_weights.sync_state_(state, p, master_weights))

    def _param_state(self, group: dict[str, Any], p: Tensor) -> dict[str, Any]:
        """``p``'s state, created on first use (step 0, zero moments in the group's
        ``state_precision``), converted when ``state_precision`` changed, with the AMSGrad
        maximum when ``amsgrad``."""
        return self._param_state_and_format(group, p)[0]

    def _param_state_and_format(
        self, group: dict[str, Any], p: Tensor
    ) -> tuple[dict[str, Any], compressed_state.StorageFormat]:
        """:meth:`_param_state`, and the format its moments are stored in."""
        state = self.state[p]
        fmt = compressed_state.storage_format(p, group["state_precision"])
        if len(state) == 0:
            if group["fused"]:
                _check_fused_param(p)
            on_device_step = group["capturable"] or bool(group["fused"])
            step_device = p.device if on_device_step else torch.device("cpu")
            state["step"] = torch.zeros((), dtype=_step_dtype(on_device_step), device=step_device)
            state.update(compressed_state.new_moment(p, "exp_avg", fmt))
            state.update(compressed_state.new_moment(p, "exp_avg_var", fmt))
            compressed_state.warn_layout_fallback(p, group["state_precision"], fmt)
        elif compressed_state.format_of(state) != fmt:
            # state_precision changed (by the user, or by loading a checkpoint): convert.
            compressed_state.replace_moments_(state, dict(state), p, fmt)
            compressed_state.warn_layout_fallback(p, group["state_precision"], fmt)
        if group["amsgrad"] and "max_exp_avg_var" not in state:
            state.update(compressed_state.new_moment(p, "max_exp_avg_var", fmt))
        return state, compressed_state.FORMATS[fmt]

    def _step_params(
        self,
        group: dict[str, Any],
        params: Iterable[Tensor] | None = None,
        grad_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
    ) -> None:
        """Step ``params`` of ``group`` (default all; those without a gradient are skipped)."""
        tensors = GroupTensors([], [], [], [], [], [], masters=[])
        self._init_group(group, tensors, params)
        if all(master is None for master in tensors.masters):
            tensors = tensors._replace(masters=())
        dispatch.run(tensors, group, grad_scale=grad_scale, found_inf=found_inf)

    @_use_grad_for_differentiable
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the
        loss.

        Groups with ``step_in_backward=True`` were stepped inside backward (the closure's, if
        given: it runs first, as always), so here only parameters that had no hook during that
        backward are stepped: they did not require grad when the hooks were registered, or were
        added to the group or switched to it since; they are hooked from now on.

        Raises:
            StepInBackwardError: with ``step_in_backward``, under GradScaler, when a hooked
                parameter holds a gradient (accumulated under :meth:`accumulating` and not
                applied, or written after its in-backward step, as DDP does), for a closure
                inside :meth:`accumulating`, and under a training framework that clips the
                gradients (``transformers.Trainer``'s ``max_grad_norm``, Lightning's
                ``gradient_clip_val``); for an ordinary group, when another live optimizer steps
                one of its parameters in backward.
        """
        loss = None
        if closure is not None:
            self._backward.check_closure()
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        in_backward = any(group["step_in_backward"] for group in self.param_groups)
        if in_backward or self._backward.active:  # an ordinary optimizer skips this
            newly_hooked = self._backward.sync()
            if in_backward:
                self._backward.check_step(grad_scale, found_inf, newly_hooked)
        self._backward.check_shared()
        for group in self.param_groups:
            if not group["step_in_backward"]:
                self._step_params(group, grad_scale=grad_scale, found_inf=found_inf)
                continue
            unhooked = [p for p in group["params"] if p.grad is not None]
            if unhooked:  # check_step left only the parameters without a hook in backward
                self._step_params(group, unhooked)
                for p in unhooked:
                    p.grad = None
        self._backward.end_window()  # each parameter may step in backward once more
        return loss

    @torch._disable_dynamo  # as torch.optim.Optimizer.zero_grad
    def zero_grad(self, set_to_none: bool = True) -> None:
        """As :meth:`torch.optim.Optimizer.zero_grad`; it also ends the optimizer step for the
        in-backward groups, as :meth:`step` does (each parameter steps in backward at most once
        between two calls of either)."""
        super().zero_grad(set_to_none)
        self._backward.end_window()

    def accumulating(self, enabled: bool = True) -> AbstractContextManager[None]:
        """A context in which backward passes only accumulate gradients, for groups with
        ``step_in_backward=True``: their hooks leave ``.grad`` in place, and the next backward
        outside it steps with the accumulated sum (then releases it). ``enabled=False`` makes it
        a no-op, for ``with optimizer.accumulating(micro < n - 1):``. Groups with the ordinary
        step are not affected (their backward always accumulates).

        Example (``n`` micro-batches per step)::

            for micro, (x, y) in enumerate(micro_batches):
                with optimizer.accumulating(micro < n - 1):
                    (loss_fn(model(x), y) / n).backward()  # the last one steps
        """
        return self._backward.accumulating(enabled)

    def remove_backward_hooks(self) -> None:
        """Remove the hooks of ``step_in_backward=True`` and set that option to False in every
        group: backward then only accumulates, and ``step()`` steps every group the ordinary
        way. (The hooks are also removed when the optimizer is garbage collected.)"""
        for group in self.param_groups:
            group["step_in_backward"] = False
        self._backward.remove()

    def state_dict(self) -> dict[str, Any]:
        """torch's state_dict, with the storage format version of the moments
        (``"state_format_version"``: :data:`adabelief.compressed_state.FORMAT_VERSION`)."""
        saved = super().state_dict()
        saved[compressed_state.FORMAT_VERSION_KEY] = compressed_state.FORMAT_VERSION
        return saved

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state_dict of this optimizer or of ``adabelief-pytorch`` (see
        :func:`adabelief.checkpoint.migrate_state_dict`), keeping the moments of 16-bit
        parameters in float32.

        ``step_in_backward`` is how this optimizer is wired to its parameters, not training
        state: each group keeps its own, so a checkpoint of an ordinary AdaBelief loads into an
        in-backward one and back. So is ``state_precision``, the storage the user chose: each
        group keeps its own, and moments saved in another format are converted to it on load
        (decoded to float32, then encoded as a step would), so an int8 optimizer stays int8."""
        migrated = migrate_state_dict(state_dict, self.param_groups)
        for saved, current in zip(migrated["param_groups"], self.param_groups, strict=True):
            saved["step_in_backward"] = current["step_in_backward"]
            saved["state_precision"] = current["state_precision"]
        # Every moment is checked against its parameter before anything changes.
        moments = saved_moments(migrated["state"], migrated["param_groups"], self.param_groups)
        super().load_state_dict(migrated)
        restore_moment_dtypes(self.state, moments)


def _step_dtype(on_device: bool) -> torch.dtype:
    if on_device:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
