"""The tensor-math path: the update out of place, every scalar a 0-dim tensor on the device.

No host synchronisation and no branch on data, so it serves every case where the step must stay
on the device or be traced: ``capturable`` (CUDA graphs), ``differentiable`` (autograd records
it), inside the caller's ``torch.compile`` (traced as is), and ``fused=True`` on CUDA and other
devices, where :func:`compiled_step` compiles it with ``torch.compile(dynamic=True,
fullgraph=True)`` into one generated kernel per group. Compressed moments
(:mod:`adabelief.compressed_state`) are decoded and encoded inside the same graph.

:func:`belief_update` is the one place the per-element update is written in tensor operations
(the formulas: docs/algorithm.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from adabelief import master_weights
from adabelief._hyper import LOW_PRECISION_DTYPES, Hyperparameters
from adabelief.kernels.lists import GroupTensors
from adabelief.scalars import StepScalars, step_scalars

__all__ = ["CompileFailed", "belief_update", "compiled_step", "tensor_step"]


def belief_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_var: Tensor,
    max_exp_avg_var: Tensor | None,
    scalars: StepScalars,
    hp: Hyperparameters,
    grad_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """One AdaBelief step of one tensor, out of place: the new (param, exp_avg, exp_avg_var,
    max_exp_avg_var) in the working dtype (float32 for 16-bit parameters). ``scalars`` are 0-dim
    tensors (the tensor branch of :func:`step_scalars`); ``grad_scale`` divides the gradient."""
    work = param.float() if param.dtype in LOW_PRECISION_DTYPES else param
    grad = grad.float() if grad.dtype in LOW_PRECISION_DTYPES else grad
    if grad_scale is not None:
        grad = grad / grad_scale
    if hp.maximize:
        grad = -grad
    if hp.weight_decay != 0:
        if hp.weight_decouple:
            work = work * hp.decay_factor()
        else:
            grad = grad + hp.weight_decay * work
    avg = exp_avg * hp.beta1 + (1 - hp.beta1) * grad
    residual = grad - avg
    var = exp_avg_var * hp.beta2 + (1 - hp.beta2) * residual * residual + hp.eps
    belief = var
    new_max = None
    if max_exp_avg_var is not None:
        # Under autograd (differentiable=True) the maximum saves its inputs, and the caller
        # overwrites the state afterwards: give it a copy.
        previous = max_exp_avg_var.clone() if torch.is_grad_enabled() else max_exp_avg_var
        new_max = torch.maximum(previous, var)
        belief = new_max
    step_size, sqrt_bc2, adaptive = scalars
    update = avg / (belief.sqrt() / sqrt_bc2 + hp.eps)
    if isinstance(adaptive, Tensor):
        update = torch.where(adaptive, update, avg)
    work = work - update * step_size
    return work, avg, var, new_max


def _as_real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if torch.is_complex(t) else t


def tensor_step(
    tensors: GroupTensors,
    hp: Hyperparameters,
    *,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """Step every tensor of a group in place, with the step count, ``hp.lr`` (a float or a 0-dim
    tensor), ``grad_scale`` and ``found_inf`` as device tensors. With ``found_inf`` nonzero every
    tensor keeps its value, step counts included."""
    skip = None if found_inf is None else found_inf != 0
    for i, param in enumerate(tensors.params):
        step_t = tensors.state_steps[i]
        new_step = step_t + 1
        scalars = step_scalars(
            new_step.to(torch.float64) if new_step.device.type != "mps" else new_step,
            hp.lr,
            hp.beta1,
            hp.beta2,
            rectify=hp.rectify,
            degenerated_to_sgd=hp.degenerated_to_sgd,
        )
        stored = [tensors.exp_avgs[i], tensors.exp_avg_vars[i]]
        if hp.amsgrad:
            stored.append(tensors.max_exp_avg_vars[i])
        # Decoded in the graph; "fp32" moments are the stored tensors themselves.
        moments = [_as_real(m.decode()) for m in stored]
        master = tensors.master_of(i)
        split = param.dtype in LOW_PRECISION_DTYPES and (
            master is not None or hp.master_weights == "stochastic"
        )
        new = belief_update(
            master_weights.load(param, master) if split else _as_real(param),
            _as_real(tensors.grads[i]),
            moments[0],
            moments[1],
            moments[2] if hp.amsgrad else None,
            scalars,
            hp,
            grad_scale,
        )
        targets: list[Tensor] = [_as_real(param), step_t]
        values: list[Tensor] = [new[0], new_step]
        if split:  # the float32 result split into the weight and its master (master_weights)
            weight, kept = master_weights.store(
                param, master, new[0], hp.master_weights, new_step.to(torch.int64)
            )
            values[0] = weight
            if master is not None and kept is not None:
                targets.append(master)
                values.append(kept)
        new_moments = [m for m in new[1:] if m is not None]
        encoded = tensors.format_of(i).encode(new_moments, new_step.to(torch.int64))
        for m, (codes, scale) in zip(stored, encoded, strict=True):
            targets.append(_as_real(m.codes))
            values.append(codes)
            if m.scale is not None and scale is not None:
                targets.append(m.scale)
                values.append(scale)
        for target, value in zip(targets, values, strict=True):
            if skip is not None:
                value = torch.where(skip, target, value.to(target.dtype))
            target.copy_(value)


class CompileFailed(RuntimeError):
    """``torch.compile`` could not compile :func:`tensor_step` here (the reason is the message)."""


_compiled: Callable[..., None] | None = None
_compile_error: str | None = None
_lr_tensors: dict[torch.device, Tensor] = {}


def compiled_step(
    tensors: GroupTensors,
    hp: Hyperparameters,
    *,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """:func:`tensor_step` compiled (``dynamic=True, fullgraph=True``): one generated kernel per
    distinct group (length, dtypes, formats, options). The learning rate goes in as a 0-dim
    float64 tensor on the device, so that a scheduler does not recompile.

    Raises:
        CompileFailed: the compiler is missing or failed before anything ran (the caller runs
            :func:`tensor_step` instead).
    """
    global _compiled, _compile_error
    if _compile_error is not None:
        raise CompileFailed(_compile_error)
    device = tensors.params[0].device
    lr = hp.lr
    if isinstance(lr, Tensor):
        lr = lr.to(device=device, dtype=torch.float64, non_blocking=True)
    else:
        if device not in _lr_tensors:
            _lr_tensors[device] = torch.zeros((), dtype=torch.float64, device=device)
        lr = _lr_tensors[device].fill_(lr)
    hp = hp._replace(lr=lr)
    if grad_scale is not None:
        grad_scale = grad_scale.to(device, non_blocking=True)
    if found_inf is not None:
        found_inf = found_inf.to(device, non_blocking=True)
    if _compiled is None:
        _compiled = torch.compile(tensor_step, dynamic=True, fullgraph=True)
    try:
        with torch._dynamo.config.patch(recompile_limit=64):
            _compiled(tensors, hp, grad_scale=grad_scale, found_inf=found_inf)
    except (torch._dynamo.exc.TorchDynamoException, ImportError, OSError) as error:
        _compile_error = f"torch.compile failed: {type(error).__name__}: {error}"
        raise CompileFailed(_compile_error) from error
