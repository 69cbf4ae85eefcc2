"""The hyperparameters of one parameter group, as the kernels receive them."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

#: Parameter dtypes whose update is computed in float32 with float32 state.
LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)


class Hyperparameters(NamedTuple):
    """One group's options. ``lr`` is a float, or a 0-dim tensor on the tensor-math paths."""

    lr: float | Tensor
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    weight_decouple: bool
    fixed_decay: bool
    rectify: bool
    degenerated_to_sgd: bool
    amsgrad: bool
    maximize: bool
    #: ``master_weights`` (:mod:`adabelief.master_weights`): how 16-bit weights keep updates.
    master_weights: str = "round"

    @classmethod
    def from_group(cls, group: dict[str, Any], lr: float | Tensor) -> Hyperparameters:
        beta1, beta2 = group["betas"]
        return cls(
            lr=lr,
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            weight_decouple=bool(group["weight_decouple"]),
            fixed_decay=bool(group["fixed_decay"]),
            rectify=bool(group["rectify"]),
            degenerated_to_sgd=bool(group["degenerated_to_sgd"]),
            amsgrad=bool(group["amsgrad"]),
            maximize=bool(group["maximize"]),
            master_weights=str(group.get("master_weights", "round")),
        )

    def decay_factor(self) -> float | Tensor:
        """The factor that decoupled weight decay multiplies the parameter by: ``1 - lr*wd``,
        or ``1 - wd`` with ``fixed_decay`` -- except at ``lr == 0``, where a step changes nothing
        (torch.distributed.checkpoint initializes optimizer state with such a step)."""
        if self.fixed_decay:
            if isinstance(self.lr, Tensor):
                return 1.0 - self.weight_decay * (self.lr != 0)
            return 1.0 - self.weight_decay if self.lr != 0 else 1.0
        return 1.0 - self.lr * self.weight_decay
