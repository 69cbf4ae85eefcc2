"""The single-tensor path: one parameter at a time, in place, with Python-float scalars.

The reference every other path matches (the formulas: docs/algorithm.md). Moments are float32
here; the dispatcher decodes compressed ones around this kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from adabelief import master_weights
from adabelief._hyper import LOW_PRECISION_DTYPES, Hyperparameters
from adabelief.kernels.lists import GroupTensors
from adabelief.scalars import StepScalars, step_scalars


def single_tensor_step(tensors: GroupTensors, hp: Hyperparameters) -> None:
    """Update each parameter and its float32 moments in place; ``hp.lr`` is a float."""
    exp_avgs, exp_avg_vars, max_exp_avg_vars = tensors.float_moments()
    for i, param in enumerate(tensors.params):
        step_t = tensors.state_steps[i]
        step_t += 1
        scalars = step_scalars(
            step_t.item(),
            hp.lr,
            hp.beta1,
            hp.beta2,
            rectify=hp.rectify,
            degenerated_to_sgd=hp.degenerated_to_sgd,
        )
        update_one(
            param,
            tensors.grads[i],
            exp_avgs[i],
            exp_avg_vars[i],
            max_exp_avg_vars[i] if hp.amsgrad else None,
            scalars,
            hp,
            master=tensors.master_of(i),
            step=step_t,
        )


def update_one(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_var: Tensor,
    max_exp_avg_var: Tensor | None,
    scalars: StepScalars,
    hp: Hyperparameters,
    *,
    master: Tensor | None = None,
    step: int | Tensor = 0,
) -> None:
    """One AdaBelief step of one parameter, in place, with float ``scalars``.

    The gradient is never written to. 16-bit parameters are updated through a float32 copy;
    their state is float32 already. Their copy is the master (``master``, with
    ``hp.master_weights``: :mod:`adabelief.master_weights`), split back after the update, with
    the dither of the new ``step``. Complex tensors are updated as their real views.
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
        work, grad = master_weights.load_local(param, master), grad.float()

    if hp.weight_decay != 0:
        if hp.weight_decouple:
            work.mul_(hp.decay_factor())
        else:
            grad = grad.add(work, alpha=hp.weight_decay)

    exp_avg.mul_(hp.beta1).add_(grad, alpha=1 - hp.beta1)
    residual = grad - exp_avg
    exp_avg_var.mul_(hp.beta2).addcmul_(residual, residual, value=1 - hp.beta2).add_(hp.eps)
    belief = exp_avg_var
    if max_exp_avg_var is not None:
        torch.maximum(max_exp_avg_var, exp_avg_var, out=max_exp_avg_var)
        belief = max_exp_avg_var

    step_size, sqrt_bc2, adaptive = scalars
    if adaptive:
        denom = belief.sqrt()
        if sqrt_bc2 != 1.0:
            denom.div_(sqrt_bc2)
        work.addcdiv_(exp_avg, denom.add_(hp.eps), value=-float(step_size))
    elif step_size != 0:
        work.add_(exp_avg, alpha=-float(step_size))

    if work is not param:
        master_weights.store_(param, master, work, hp.master_weights, step)
