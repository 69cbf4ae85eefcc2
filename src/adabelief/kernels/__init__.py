"""The kernel layer: one module per path, and the dispatcher that picks one per group.

* :mod:`~adabelief.kernels.dispatch`: :func:`~adabelief.kernels.dispatch.adabelief`, the
  functional step; it chooses the path for a group and calls it once.
* :mod:`~adabelief.kernels.single_tensor`: one parameter at a time, in place, float scalars
  (the reference every other path matches).
* :mod:`~adabelief.kernels.foreach`: the same operations with ``torch._foreach_*``.
* :mod:`~adabelief.kernels.tensor_math`: the update out of place with 0-dim tensor scalars,
  eager (capturable, differentiable, inside ``torch.compile``) or compiled per group (fused on
  CUDA and other devices).
* :mod:`~adabelief.kernels.cpu`: the fused C++/OpenMP kernel (``adabelief_cpu.cpp``).

Every path computes the update of docs/algorithm.md with the per-step scalars of
:func:`adabelief.scalars.step_scalars`; the moments may be stored compressed
(:mod:`adabelief.compressed_state`), which the fused CPU kernel and the tensor-math path decode
and encode inside their single pass.
"""

from adabelief.compressed_state import Moment
from adabelief.kernels.lists import GroupTensors

__all__ = ["GroupTensors", "Moment"]
