"""The dispatcher: which path steps a group, and the one call to it.

:func:`choose_path` decides from the group's options and its tensors:

=============  ==============================================================================
``"cpu"``      the fused C++/OpenMP kernel (:mod:`~adabelief.kernels.cpu`): ``fused=True``, or
               the default, on plain CPU tensors (compressed moments in the same pass)
``"compiled"`` :func:`~adabelief.kernels.tensor_math.compiled_step`: ``fused=True`` on CUDA and
               other devices, or with ``capturable=True``
``"tensor"``   :func:`~adabelief.kernels.tensor_math.tensor_step` eagerly: ``differentiable``,
               ``capturable`` without ``fused``, inside ``torch.compile`` (traced into the
               caller's graph), tensor subclasses the fused paths cannot unwrap, and on
               ``"cpu"`` the parameters whose storage format the kernel has no code for
               (none of the built-in ones: a format defined outside the kernel),
               silently: the rest of the group stays on the kernel
``"foreach"``  :mod:`~adabelief.kernels.foreach`: ``foreach=True``, or the default on CUDA
``"single"``   :mod:`~adabelief.kernels.single_tensor`: ``foreach=False``, or the default
               elsewhere
=============  ==============================================================================

:func:`adabelief` runs it. The single-tensor and foreach kernels work on float32 moments, so
compressed ones are decoded for them here, one parameter at a time (the float32 work copies never
exceed one tensor), and encoded back: the reference the single-pass paths are tested against.
A fused path that cannot run here (no C++ compiler, a compiler error) falls back to foreach, or
to the eager tensor step; so does the default on CPU, whose fast path is the fused kernel. Either
way one :class:`FusedFallbackWarning` per process says so, and why.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast

import torch
from torch import Tensor

from adabelief._hyper import Hyperparameters
from adabelief.compressed_state import FP32, Moment, as_moment, encode_
from adabelief.kernels import cpu, tensor_math
from adabelief.kernels.foreach import foreach_step
from adabelief.kernels.lists import GroupTensors
from adabelief.kernels.single_tensor import single_tensor_step
from adabelief.master_weights import check_master_weights

__all__ = ["FusedFallbackWarning", "Path", "adabelief", "choose_path", "fused_is_default", "run"]

Path = Literal["cpu", "compiled", "tensor", "foreach", "single"]


class FusedFallbackWarning(UserWarning):
    """The fused kernel (asked for with ``fused=True``, or the default on CPU) is unavailable
    and a slower path runs instead (issued once per process)."""


_warned = False


def warn_fallback(reason: str) -> None:
    """Warn (once per process) that the fused kernel is unavailable, and why."""
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"adabelief: the fused kernel is unavailable ({reason}); AdaBelief steps with a slower "
        "unfused path instead (this warning is shown once per process)",
        FusedFallbackWarning,
        stacklevel=5,
    )


def fused_is_default(params: Sequence[Tensor], group: Mapping[str, Any]) -> bool:
    """Whether the default (``fused=None, foreach=None``) uses the fused CPU kernel: plain CPU
    tensors of supported dtypes, outside ``torch.compile``, not differentiable, and a kernel that
    builds here with OpenMP (or a single torch thread). It was faster than foreach and
    single-tensor at every size measured (see BENCHMARKS.md). CUDA keeps the foreach default
    until the compiled path is measured on a GPU. The first call may build the kernel (seconds,
    once per machine); a kernel that cannot be built is a :class:`FusedFallbackWarning`."""
    if group.get("differentiable") or group.get("capturable") or not params:
        return False
    if torch.compiler.is_compiling() or not cpu.supports(params):
        return False
    lib = cpu.kernel()
    if lib is None:
        warn_fallback(cpu.kernel_error() or "unknown error")
        return False
    # A kernel built without OpenMP (e.g. Apple clang) is single-threaded: unmeasured against
    # torch's multi-threaded kernels, so not the default there.
    return lib is not None and (lib.openmp or torch.get_num_threads() == 1)


def choose_path(params: Sequence[Tensor], group: Mapping[str, Any]) -> Path:
    """The path that steps ``params`` (of one device) with ``group``'s options."""
    fused, foreach = group["fused"], group["foreach"]
    if group["differentiable"] or torch.compiler.is_compiling():
        return "tensor"
    if fused is None and foreach is None:
        if fused_is_default(params, group):
            return "cpu"
        if group["capturable"]:
            return "tensor"
        plain_cuda = all(type(p) in cpu.PLAIN_TYPES and p.device.type == "cuda" for p in params)
        return "foreach" if plain_cuda else "single"
    if fused:
        if group["capturable"] or not all(p.is_cpu for p in params):
            return "compiled"
        return "cpu"
    if group["capturable"]:
        return "tensor"
    return "foreach" if foreach else "single"


def adabelief(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: Sequence[Tensor | Moment],
    exp_avg_vars: Sequence[Tensor | Moment],
    max_exp_avg_vars: Sequence[Tensor | Moment],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor = 1e-3,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-16,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    weight_decouple: bool = True,
    fixed_decay: bool = False,
    rectify: bool = True,
    degenerated_to_sgd: bool = True,
    maximize: bool = False,
    foreach: bool | None = None,
    fused: bool | None = None,
    capturable: bool = False,
    differentiable: bool = False,
    master_weights: str = "round",
    masters: Sequence[Tensor | None] = (),
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """Functional AdaBelief step over lists of tensors, in place, with the options of
    :class:`adabelief.AdaBelief` (its defaults; ``betas`` as ``beta1``, ``beta2``), as torch's
    functional ``adam``.

    ``max_exp_avg_vars`` is empty unless ``amsgrad``. ``state_steps`` are 0-dim float tensors,
    incremented here. A moment is a plain tensor (float32, the parameter's dtype for float64
    and complex, or bfloat16 for the ``"bf16"`` format) or a
    :class:`~adabelief.compressed_state.Moment` in any format (``"int8"`` needs one: its codes
    with their block scales, as ``compressed_state.FORMATS["int8"].zeros(param, belief)`` makes
    them). ``masters``, with ``master_weights="residual"`` or ``"fp32"``, holds each 16-bit
    parameter's int8 residual codes or float32 master (None for other parameters; see
    :mod:`adabelief.master_weights`). ``grad_scale``/``found_inf`` (GradScaler) are taken by
    the fused paths only.
    """
    exp_avgs, exp_avg_vars, max_exp_avg_vars = (
        [as_moment(t, belief) for t in column]
        for column, belief in ((exp_avgs, False), (exp_avg_vars, True), (max_exp_avg_vars, True))
    )
    tensors = GroupTensors(
        params, grads, exp_avgs, exp_avg_vars, max_exp_avg_vars, state_steps, list(masters)
    )
    options = dict(
        lr=lr,
        betas=(beta1, beta2),
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
        master_weights=check_master_weights(master_weights),
    )
    run(tensors, options, grad_scale=grad_scale, found_inf=found_inf)


def run(
    tensors: GroupTensors,
    group: Mapping[str, Any],
    *,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """Step ``tensors`` with ``group``'s options on the path :func:`choose_path` picks (per
    device, when the tensors are on several)."""
    if not tensors.params:
        return
    hp = Hyperparameters.from_group(cast(dict, group), group["lr"])
    if all(p.is_cpu for p in tensors.params):  # the usual case, without building the devices
        _run_one_device(tensors, group, hp, grad_scale, found_inf)
        return
    devices = {p.device for p in tensors.params}
    if len(devices) > 1:
        for device in devices:
            index = [i for i, p in enumerate(tensors.params) if p.device == device]
            _run_one_device(tensors.select(index), group, hp, grad_scale, found_inf)
        return
    _run_one_device(tensors, group, hp, grad_scale, found_inf)


def _run_one_device(
    tensors: GroupTensors,
    group: Mapping[str, Any],
    hp: Hyperparameters,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    path = choose_path(tensors.params, group)
    if path in ("cpu", "compiled") and not all(type(p) in cpu.PLAIN_TYPES for p in tensors.params):
        local = _local_shards(tensors)
        if local is None:  # another tensor subclass: its own dispatch, on the tensor step
            path, local = "tensor", tensors
        tensors = local
    if path == "cpu" and grad_scale is not None and not cpu.exact_inverse(float(grad_scale)):
        path = "tensor"  # the kernel multiplies by 1/grad_scale, exact for powers of two only
    if path == "cpu":
        # Formats the fused kernel has no code for (every built-in format has: fp32, bf16,
        # int8, int4; a StorageFormat defined elsewhere may not) take the tensor step, as other
        # cases the kernel cannot take do: no warning, since nothing is unavailable.
        eager = [i for i in range(len(tensors.params)) if not _fused_format(tensors, i)]
        if eager:
            tensor_math.tensor_step(
                tensors.select(eager), hp, grad_scale=grad_scale, found_inf=found_inf
            )
            if len(eager) == len(tensors.params):
                return
            tensors = tensors.select([i for i in range(len(tensors.params)) if i not in eager])
    if path == "cpu":
        lib = cpu.kernel()
        if lib is not None:
            cpu.cpu_step(lib, tensors, hp, grad_scale=grad_scale, found_inf=found_inf)
            return
        warn_fallback(cpu.kernel_error() or "unknown error")
        path = "foreach"
    elif path == "compiled":
        try:
            tensor_math.compiled_step(tensors, hp, grad_scale=grad_scale, found_inf=found_inf)
            return
        except tensor_math.CompileFailed as error:
            warn_fallback(str(error))
            path = "tensor"
    if path == "tensor":
        tensor_math.tensor_step(tensors, hp, grad_scale=grad_scale, found_inf=found_inf)
        return
    if group["fused"]:  # the fallback of fused=True: apply GradScaler's values outside
        if found_inf is not None and float(found_inf) != 0.0:
            return
        if grad_scale is not None:
            tensors = tensors._replace(grads=[g / grad_scale.to(g.device) for g in tensors.grads])
    elif grad_scale is not None or found_inf is not None:
        raise ValueError("grad_scale/found_inf are only supported by the fused path (fused=True)")
    _run_float_kernel(path, tensors, hp._replace(lr=float(hp.lr)))


def _fused_format(tensors: GroupTensors, i: int) -> bool:
    """Whether the fused CPU kernel has code for parameter ``i``'s storage format."""
    return tensors.format_of(i).name in cpu._STATE_CODES


def _run_float_kernel(path: Path, tensors: GroupTensors, hp: Hyperparameters) -> None:
    """The single-tensor or foreach kernel, with compressed moments decoded around it."""
    kernel = foreach_step if path == "foreach" else single_tensor_step
    formats = [tensors.format_of(i) for i in range(len(tensors.params))]
    compressed = [i for i, fmt in enumerate(formats) if fmt is not FP32]
    if not compressed:
        kernel(tensors, hp)
        return
    plain = [i for i, fmt in enumerate(formats) if fmt is FP32]
    if plain:
        kernel(tensors.select(plain), hp)
    for i in compressed:
        one = tensors.select([i])
        stored = [*one.exp_avgs, *one.exp_avg_vars, *one.max_exp_avg_vars]
        work = [Moment(m.decode(), None, FP32, m.belief) for m in stored]
        kernel(
            one._replace(exp_avgs=work[:1], exp_avg_vars=work[1:2], max_exp_avg_vars=work[2:]), hp
        )
        encode_(stored, [m.codes for m in work], int(one.state_steps[0].item()))


def _local_shards(tensors: GroupTensors) -> GroupTensors | None:
    """``tensors`` with each DTensor replaced by its local shard (``to_local()``, which shares its
    memory), or None when a tensor is another subclass, a shard's shape differs from its
    parameter's, or a moment's format cannot step a shard alone (int8, whose block scales span
    the shards: :meth:`~adabelief.compressed_state.StorageFormat.local`)."""

    def local_tensor(t: Tensor) -> Tensor | None:
        if type(t) in cpu.PLAIN_TYPES:
            return t
        to_local = getattr(t, "to_local", None)
        local = to_local() if callable(to_local) else None
        return local if type(local) in cpu.PLAIN_TYPES else None

    def local_moment(m: Moment) -> Moment | None:
        local = m.format.local(m)
        if local is None or type(local.codes) not in cpu.PLAIN_TYPES:
            return None
        return local

    plain: list[list[Tensor]] = []
    for column in (tensors.params, tensors.grads, tensors.state_steps):
        local = [local_tensor(t) for t in column]
        if any(t is None for t in local):
            return None
        plain.append(cast(list[Tensor], local))
    params, grads, steps = plain
    masters = [None if m is None else local_tensor(m) for m in tensors.masters]
    if [m is None for m in masters] != [m is None for m in tensors.masters]:
        return None
    shapes = [p.shape for p in params]
    moments: list[list[Moment]] = []
    for moment_column in (tensors.exp_avgs, tensors.exp_avg_vars, tensors.max_exp_avg_vars):
        local_moments = [local_moment(m) for m in moment_column]
        if any(m is None for m in local_moments):
            return None
        moments.append(cast(list[Moment], local_moments))
    for column in [grads, *([m.codes for m in c] for c in moments)]:
        if column and [t.shape for t in column] != shapes:
            return None
    return tensors._replace(
        params=params,
        grads=grads,
        exp_avgs=moments[0],
        exp_avg_vars=moments[1],
        max_exp_avg_vars=moments[2],
        state_steps=steps,
        masters=masters,
    )
