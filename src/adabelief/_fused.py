"""The fused single-pass kernel (not implemented yet: ``fused=True`` raises)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from adabelief._hyper import Hyperparameters


def check_available() -> None:
    """Raise ``ValueError`` when ``fused=True`` cannot be honoured."""
    raise ValueError("fused=True is not available yet in this version of adabelief")


def is_default_for(params: list[Tensor], group: Mapping[str, Any]) -> bool:
    """Whether the default path (fused=None, foreach=None) should use the fused kernel."""
    return False


def fused_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_vars: list[Tensor],
    max_exp_avg_vars: list[Tensor],
    state_steps: list[Tensor],
    hp: Hyperparameters,
    *,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    check_available()
