"""The tensors of one step, as every kernel receives them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from torch import Tensor

from adabelief.compressed_state import moment_format

#: The int8 block scales of a parameter's (exp_avg, exp_avg_var, max_exp_avg_var), or Nones.
MomentScales = tuple[Tensor | None, Tensor | None, Tensor | None]
NO_SCALES: MomentScales = (None, None, None)


class GroupTensors(NamedTuple):
    """Parallel lists, one entry per parameter that has a gradient.

    ``exp_avgs``/``exp_avg_vars``/``max_exp_avg_vars`` hold the moments as stored: float32 (the
    parameter's dtype for float64 and complex), bfloat16 codes, or int8/uint8 codes whose block
    scales are in ``scales``. ``max_exp_avg_vars`` is empty unless AMSGrad; ``scales`` is empty
    when no moment is int8.
    """

    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_vars: list[Tensor]
    max_exp_avg_vars: list[Tensor]
    state_steps: list[Tensor]
    scales: Sequence[MomentScales] = ()

    def scales_of(self, i: int) -> MomentScales:
        return self.scales[i] if self.scales else NO_SCALES

    def format_of(self, i: int) -> str:
        """``"fp32"``, ``"bf16"`` or ``"int8"``: how parameter ``i``'s moments are stored."""
        return moment_format(self.exp_avgs[i], self.scales_of(i)[0])

    def select(self, index: Sequence[int]) -> GroupTensors:
        """The entries at ``index``, in that order."""

        def pick(column: list[Tensor]) -> list[Tensor]:
            return [column[i] for i in index] if column else []

        return GroupTensors(
            pick(self.params),
            pick(self.grads),
            pick(self.exp_avgs),
            pick(self.exp_avg_vars),
            pick(self.max_exp_avg_vars),
            pick(self.state_steps),
            [self.scales[i] for i in index] if self.scales else (),
        )

    def columns(self) -> list[list[Tensor]]:
        """(params, grads, exp_avgs, exp_avg_vars, max_exp_avg_vars): the element-wise operands."""
        return [self.params, self.grads, self.exp_avgs, self.exp_avg_vars, self.max_exp_avg_vars]
