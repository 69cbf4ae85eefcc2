"""The single-tensor kernel: one parameter at a time, the reference every other path matches."""

from __future__ import annotations

import torch
from torch import Tensor

from adabelief._hyper import LOW_PRECISION_DTYPES, Hyperparameters
from adabelief.scalars import StepScalars, step_scalars


def single_tensor_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_vars: list[Tensor],
    max_exp_avg_vars: list[Tensor],
    state_steps: list[Tensor],
    hp: Hyperparameters,
    *,
    tensor_math: bool,
) -> None:
    """Update each parameter and its state in place.

    ``tensor_math`` keeps the step count and the scalars on the device as 0-dim tensors
    (``capturable``, ``differentiable``, ``torch.compile``); otherwise they are Python floats.
    ``max_exp_avg_vars`` is empty unless ``hp.amsgrad``.
    """
    for i, param in enumerate(params):
        step_t = state_steps[i]
        step_t += 1
        # Tensor scalars in float64: float32 would put a 1e-5 relative error into 1 - beta2**t.
        step = _as_float64(step_t) if tensor_math else step_t.item()
        scalars = step_scalars(
            step,
            hp.lr,
            hp.beta1,
            hp.beta2,
            rectify=hp.rectify,
            degenerated_to_sgd=hp.degenerated_to_sgd,
        )
        update_one(
            param,
            grads[i],
            exp_avgs[i],
            exp_avg_vars[i],
            max_exp_avg_vars[i] if hp.amsgrad else None,
            scalars,
            hp,
        )


def _as_float64(step_t: Tensor) -> Tensor:
    return step_t if step_t.device.type == "mps" else step_t.to(torch.float64)


def update_one(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_var: Tensor,
    max_exp_avg_var: Tensor | None,
    scalars: StepScalars,
    hp: Hyperparameters,
) -> None:
    """One AdaBelief step of one parameter (see :mod:`adabelief.scalars` for the formulas).

    The gradient is never written to. 16-bit parameters are updated through a float32 copy;
    their state is float32 already. Complex tensors are updated as their real views.
    """
    if torch.is_complex(param):
        param, grad = torch.view_as_real(param), torch.view_as_real(grad)
        exp_avg, exp_avg_var = torch.view_as_real(exp_avg), torch.view_as_real(exp_avg_var)
        if max_exp_avg_var is not None:
            max_exp_avg_var = torch.view_as_real(max_exp_avg_var)
    if hp.maximize:
        grad = -grad
    work = param
    if param.dtype in LOW_PRECISION_DTYPES:
        work, grad = param.float(), grad.float()

    if hp.weight_decay != 0:
        if hp.weight_decouple:
            work.mul_(hp.decay_factor())
        else:
            grad = grad.add(work, alpha=hp.weight_decay)

    exp_avg.mul_(hp.beta1).add_(grad, alpha=1 - hp.beta1)
    residual = grad - exp_avg
    exp_avg_var.mul_(hp.beta2).addcmul_(residual, residual, value=1 - hp.beta2).add_(hp.eps)
    belief = exp_avg_var
    # differentiable=True: autograd records the step, so no out= and nothing it saved is
    # modified in place afterwards.
    recording = torch.is_grad_enabled()
    if max_exp_avg_var is not None:
        if recording:
            max_exp_avg_var.copy_(torch.maximum(max_exp_avg_var.clone(), exp_avg_var))
        else:
            torch.maximum(max_exp_avg_var, exp_avg_var, out=max_exp_avg_var)
        belief = max_exp_avg_var

    step_size, sqrt_bc2, adaptive = scalars
    if isinstance(step_size, Tensor):
        denom = belief.sqrt().div(sqrt_bc2).add_(hp.eps)
        update = (exp_avg.clone() if recording else exp_avg) / denom
        if isinstance(adaptive, Tensor):
            update = torch.where(adaptive, update, exp_avg)
        work.sub_(update.mul_(step_size))
    elif adaptive:
        denom = belief.sqrt()
        if sqrt_bc2 != 1.0:
            denom.div_(sqrt_bc2)
        work.addcdiv_(exp_avg, denom.add_(hp.eps), value=-step_size)
    elif step_size != 0:
        work.add_(exp_avg, alpha=-step_size)

    if work is not param:
        param.copy_(work)
