"""The tensors of one step, as every kernel receives them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from torch import Tensor

from adabelief.compressed_state import FP32, Moment, StorageFormat


class GroupTensors(NamedTuple):
    """Parallel lists, one entry per parameter that has a gradient.

    ``exp_avgs``/``exp_avg_vars``/``max_exp_avg_vars`` hold the moments as stored, each one
    :class:`~adabelief.compressed_state.Moment` (its codes, its scales and its format); all the
    moments of one parameter share a format. ``max_exp_avg_vars`` is empty unless AMSGrad.
    """

    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Moment]
    exp_avg_vars: list[Moment]
    max_exp_avg_vars: list[Moment]
    state_steps: list[Tensor]
    #: Each 16-bit parameter's master (``master_weights``): int8 residual codes, a float32
    #: master, or None; empty when no parameter has one (see :mod:`adabelief.master_weights`).
    masters: Sequence[Tensor | None] = ()

    def master_of(self, i: int) -> Tensor | None:
        """Parameter ``i``'s master (:mod:`adabelief.master_weights`), or None."""
        return self.masters[i] if self.masters else None

    def format_of(self, i: int) -> StorageFormat:
        """How parameter ``i``'s moments are stored."""
        return self.exp_avgs[i].format

    def select(self, index: Sequence[int]) -> GroupTensors:
        """The entries at ``index``, in that order."""

        def pick(column: list) -> list:
            return [column[i] for i in index] if column else []

        return GroupTensors(
            pick(self.params),
            pick(self.grads),
            pick(self.exp_avgs),
            pick(self.exp_avg_vars),
            pick(self.max_exp_avg_vars),
            pick(self.state_steps),
            [self.masters[i] for i in index] if self.masters else (),
        )

    def float_moments(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """(exp_avgs, exp_avg_vars, max_exp_avg_vars) as the tensors the single-tensor and
        foreach kernels update in place: the moments must be ``"fp32"`` (the dispatcher decodes
        compressed ones around these kernels)."""
        if any(m.format is not FP32 for m in self.exp_avgs):
            raise ValueError("the single-tensor and foreach kernels take fp32 moments only")
        return (
            [m.codes for m in self.exp_avgs],
            [m.codes for m in self.exp_avg_vars],
            [m.codes for m in self.max_exp_avg_vars],
        )
