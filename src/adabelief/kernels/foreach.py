"""The multi-tensor (foreach) path: the update of :mod:`adabelief.kernels.single_tensor`,
operation for operation, with ``torch._foreach_*`` over the tensors of one device and dtype,
with Python-float scalars and float32 moments."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from adabelief import master_weights
from adabelief._hyper import LOW_PRECISION_DTYPES, Hyperparameters
from adabelief.kernels.lists import GroupTensors
from adabelief.scalars import StepScalars, step_scalars


def group_by_device_and_dtype(params: list[Tensor]) -> dict[tuple[str, torch.dtype], list[int]]:
    """Indices of ``params`` grouped by (device, dtype), in their original order."""
    groups: dict[tuple[str, torch.dtype], list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        groups[(str(p.device), p.dtype)].append(i)
    return groups


def _real(tensors: list[Tensor]) -> list[Tensor]:
    return [torch.view_as_real(t) if torch.is_complex(t) else t for t in tensors]


def foreach_step(tensors: GroupTensors, hp: Hyperparameters) -> None:
    """Update all parameters and their float32 moments in place, one foreach launch per
    operation and (device, dtype); ``hp.lr`` is a float."""
    for (_, dtype), index in group_by_device_and_dtype(tensors.params).items():
        part = tensors.select(index)
        exp_avgs, exp_avg_vars, max_exp_avg_vars = part.float_moments()
        _foreach_group(
            _real(part.params),
            _real(part.grads),
            _real(exp_avgs),
            _real(exp_avg_vars),
            _real(max_exp_avg_vars),
            part.state_steps,
            hp,
            low_precision=dtype in LOW_PRECISION_DTYPES,
            masters=[part.master_of(j) for j in range(len(index))],
        )


def _foreach_group(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_vars: list[Tensor],
    max_exp_avg_vars: list[Tensor],
    state_steps: list[Tensor],
    hp: Hyperparameters,
    *,
    low_precision: bool,
    masters: list[Tensor | None],
) -> None:
    torch._foreach_add_(state_steps, 1)
    cache: dict[float, StepScalars] = {}
    scalars = []
    for step_t in state_steps:
        step = step_t.item()
        if step not in cache:
            cache[step] = step_scalars(
                step,
                hp.lr,
                hp.beta1,
                hp.beta2,
                rectify=hp.rectify,
                degenerated_to_sgd=hp.degenerated_to_sgd,
            )
        scalars.append(cache[step])

    if hp.maximize:
        grads = list(torch._foreach_neg(grads))
    work = params
    if low_precision:
        work = [master_weights.load_local(p, m) for p, m in zip(params, masters, strict=True)]
        grads = [g.float() for g in grads]

    if hp.weight_decay != 0:
        if hp.weight_decouple:
            torch._foreach_mul_(work, hp.decay_factor())
        else:
            grads = list(torch._foreach_add(grads, work, alpha=hp.weight_decay))

    torch._foreach_mul_(exp_avgs, hp.beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - hp.beta1)
    residuals = torch._foreach_sub(grads, exp_avgs)
    torch._foreach_mul_(exp_avg_vars, hp.beta2)
    torch._foreach_addcmul_(exp_avg_vars, residuals, residuals, value=1 - hp.beta2)
    del residuals
    torch._foreach_add_(exp_avg_vars, hp.eps)
    beliefs = exp_avg_vars
    if hp.amsgrad:
        torch._foreach_maximum_(max_exp_avg_vars, exp_avg_vars)
        beliefs = max_exp_avg_vars

    adaptive = [j for j, s in enumerate(scalars) if s.adaptive]
    if adaptive:
        denoms = torch._foreach_sqrt([beliefs[j] for j in adaptive])
        if not hp.rectify:
            torch._foreach_div_(denoms, [float(scalars[j].sqrt_bias_correction2) for j in adaptive])
        torch._foreach_add_(denoms, hp.eps)
        torch._foreach_addcdiv_(
            [work[j] for j in adaptive],
            [exp_avgs[j] for j in adaptive],
            denoms,
            [-float(scalars[j].step_size) for j in adaptive],
        )
    # SGD-with-momentum steps of the rectified warm-up, one launch per distinct step size.
    momentum_steps: dict[float, list[int]] = defaultdict(list)
    for j, s in enumerate(scalars):
        if not s.adaptive and s.step_size != 0:
            momentum_steps[float(s.step_size)].append(j)
    for step_size, index in momentum_steps.items():
        torch._foreach_add_(
            [work[j] for j in index], [exp_avgs[j] for j in index], alpha=-step_size
        )

    if low_precision and (hp.master_weights == "stochastic" or any(m is not None for m in masters)):
        # The master's split is element-wise: one parameter at a time (see master_weights).
        for param, master, param_work, step_t in zip(
            params, masters, work, state_steps, strict=True
        ):
            master_weights.store_(param, master, param_work, hp.master_weights, step_t)
    elif low_precision:
        if all(type(p) in (Tensor, torch.nn.Parameter) for p in params):
            torch._foreach_copy_(params, work)
        else:  # DTensor (FSDP2) has no sharding strategy for aten._foreach_copy_
            for param, param_work in zip(params, work, strict=True):
                param.copy_(param_work)
