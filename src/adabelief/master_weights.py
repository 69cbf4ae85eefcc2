"""Master weights of 16-bit parameters: ``master_weights="round" | "residual" | "fp32" |
"stochastic"``.

A bfloat16 (or float16) parameter stepped in float32 and rounded back to nearest loses every
update smaller than half a unit in its last place (ulp): at fine-tuning learning rates that is
most of them, and training stalls. Each option keeps the update's float32 result in its own way;
the step itself is float32 in every case (this module only says where the float32 weight, the
*master*, comes from and where it goes):

==============  ======================  ========================================================
option          state per parameter     what is kept
==============  ======================  ========================================================
``"round"``     none                    the weight rounded to nearest (torch's ``copy_``):
                                        updates under half an ulp are lost (the default)
``"residual"``  1 byte (int8)           the master to 1/256 ulp: ``weight + code * ulp / 256``
``"fp32"``      4 bytes (float32)       the master exactly (``state["master_weight"]``)
``"stochastic"`` none                   the weight rounded stochastically: updates are kept in
                                        expectation, each step adds rounding noise of up to an ulp
==============  ======================  ========================================================

Float32, float64 and complex parameters have no master: the option does nothing for them.

The residual (``state["master_residual"]``, int8, the parameter's shape) is the signed code of
``master - weight`` in units of ``ulp(weight) / 256``, where ``ulp(w)`` is the spacing of the
16-bit format above ``|w|`` (``2**(e - 7)`` for a bfloat16 of exponent ``e``, ``2**(e - 10)``
for float16, whose subnormals and zero have the ulp ``2**-24``). Decoding is exact in float32::

    master = float32(weight) + code * ulp(weight) / 256

A step decodes the master, applies the float32 update, and splits the result ``m`` again
(:func:`split`):

1. ``weight = m`` rounded to nearest in the parameter's dtype (the forward pass sees the best
   16-bit weight), so ``|m - weight| <= ulp/2`` and ``q = (m - weight) * 256 / ulp`` lies in
   ``[-128, 128]`` (exact: a power-of-two scaling of an exact difference).
2. ``code = floor(q + d)``, with ``d`` the 16-bit dither of format version 2 in fixed point, as
   the int8 moments round (``floor((q * 2**16 + d16) / 2**16)``), ``d16 = mix32(bits(m) ^
   step_key(step)) & 0xFFFF`` (:func:`dither`): stochastic, so that updates smaller than the
   code's step are kept in expectation (nearest rounding of the code measurably trails it), and
   deterministic and state-free, so that a resumed run is bit-identical.
3. ``code == 128`` (the rounded master is the midpoint above ``weight``) carries: the weight
   moves one ulp up and the code becomes ``-128`` (``-64`` where the ulp doubles), so the codes
   fit ``[-128, 127]`` and the weight stays a nearest rounding of the master it stores. At the
   largest finite weight the code is clamped to 127 instead.

No residual is kept (the code is 0 and the master is the weight) for non-finite weights and for
bfloat16 weights below ``2**-111`` in magnitude (their ulp/256 would leave float32's normal
range; such weights are zero for any practical purpose).

``"stochastic"`` rounds the float32 result to the weight's dtype with the same dither: for
bfloat16 through :func:`adabelief.compressed_state`'s stochastic rounding of the bf16 moments,
for float16 by the same truncation at float16's 10 mantissa bits (float16 subnormals round to
nearest).

The option is per group; changing it converts the state at the next step (a master that is no
longer kept is dropped, a new one starts from the weight, or from the stored master). A
checkpoint saved without a residual (or before this option existed) loads with a residual of
zero: the master is the weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from adabelief import compressed_state

__all__ = [
    "FP32_KEY",
    "MASTER_WEIGHTS",
    "RESIDUAL_KEY",
    "applies",
    "bytes_per_parameter",
    "check_master_weights",
    "decode",
    "dither",
    "round_weight",
    "split",
    "sync_state_",
]

MASTER_WEIGHTS = ("round", "residual", "fp32", "stochastic")
#: The state key of the int8 residual codes (``"residual"``).
RESIDUAL_KEY = "master_residual"
#: The state key of the float32 master weight (``"fp32"``).
FP32_KEY = "master_weight"
#: The state key of each mode that keeps a master.
_STATE_KEYS = {"residual": RESIDUAL_KEY, "fp32": FP32_KEY}
#: Residual codes per ulp of the weight.
CODES_PER_ULP = 256
_FIXED = 65536.0

#: Per 16-bit dtype: mantissa bits, the lowest float32 exponent field with a residual, and
#: whether weights below it use that field's ulp (float16's subnormals, spaced as its lowest
#: binade) or keep no residual (bfloat16).
_FORMATS: dict[torch.dtype, tuple[int, int, bool]] = {
    torch.bfloat16: (7, 16, False),
    torch.float16: (10, 113, True),
}


def check_master_weights(value: object) -> str:
    """Return ``value`` if it names a master-weight option, else raise ``ValueError``."""
    if value not in MASTER_WEIGHTS:
        raise ValueError(f"Invalid master_weights: {value!r} (expected one of {MASTER_WEIGHTS})")
    return str(value)


def applies(param: Tensor, mode: str) -> bool:
    """Whether ``mode`` changes how ``param`` is stepped: a 16-bit real parameter and a mode
    other than ``"round"``."""
    return mode != "round" and param.dtype in _FORMATS


def bytes_per_parameter(mode: str) -> float:
    """Bytes of master-weight state per 16-bit parameter."""
    return {"residual": 1.0, "fp32": 4.0}.get(mode, 0.0)


def _bits(values: Tensor) -> Tensor:
    """The float32 bits of ``values`` as int64 in [0, 2**32)."""
    return values.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def _power_of_two(field: Tensor) -> Tensor:
    """The float32 ``2**(field - 127)`` of integer exponent fields in [1, 254]."""
    return (field << 23).to(torch.int32).view(torch.float32)


def _units(weight: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(ulp(weight) / 256, 256 / ulp(weight))`` of float32 ``weight`` (16-bit values) as
    float32 powers of two; both 0 where no residual is kept."""
    mantissa, lowest, clamp = _FORMATS[dtype]
    field = (_bits(weight) >> 23) & 0xFF
    kept = field < 255
    if clamp:
        field = field.clamp(min=lowest)
    else:
        kept = kept & (field >= lowest)
    unit_field = field - (mantissa + 8)
    zero = torch.zeros_like(weight)
    unit = torch.where(kept, _power_of_two(unit_field.clamp(1, 254)), zero)
    inverse = torch.where(kept, _power_of_two((254 - unit_field).clamp(1, 254)), zero)
    return unit, inverse


def _widen(weight: Tensor) -> Tensor:
    """``weight`` (16-bit) as float32, from its bits: inductor folds ``x.to(bfloat16).float()``
    into ``x`` inside a generated kernel (it does not emulate precision casts by default), so a
    split compiled with ``weight.float()`` would see the master instead of its weight."""
    bits = weight.view(torch.int16).to(torch.int32) & 0xFFFF
    if weight.dtype == torch.bfloat16:
        return (bits << 16).view(torch.float32)
    sign = (bits & 0x8000) << 16
    exponent = (bits >> 10) & 0x1F
    mantissa = bits & 0x3FF
    normal = sign | ((exponent + 112) << 23) | (mantissa << 13)
    special = sign | 0x7F800000 | (mantissa << 13)  # inf and NaN
    widened = torch.where(exponent == 31, special, normal).view(torch.float32)
    subnormal = mantissa.float() * 2.0**-24  # and zero: exact
    subnormal = torch.where(sign != 0, -subnormal, subnormal)
    return torch.where(exponent == 0, subnormal, widened)


def dither(master: Tensor, step: int | Tensor) -> Tensor:
    """The 16-bit dither (int64 in [0, 2**16)) of float32 ``master`` at ``step``:
    ``mix32(bits(master) ^ step_key(step)) & 0xFFFF``, the hash the AMSGrad maximum's bf16/int8
    codes take (format version 2)."""
    if isinstance(step, Tensor):
        step = step.to(torch.int64)
    key = compressed_state.step_key(step)
    return compressed_state._mix32(_bits(master) ^ key) & 0xFFFF


def decode(weight: Tensor, residual: Tensor) -> Tensor:
    """The float32 master of a 16-bit ``weight`` and its int8 ``residual`` codes (exact)."""
    work = weight.float()
    unit, _ = _units(work, weight.dtype)
    return work + residual.float() * unit


def split(master: Tensor, dtype: torch.dtype, step: int | Tensor) -> tuple[Tensor, Tensor]:
    """``(weight, code)``: float32 ``master`` as a weight of ``dtype`` (nearest) and its int8
    residual code, rounded stochastically with the dither of ``step`` (see the module)."""
    master = master.float()
    weight = master.to(dtype)
    low = _widen(weight)
    unit, inverse = _units(low, dtype)
    fixed = ((master - low) * inverse * _FIXED).round()
    fixed = torch.where(inverse != 0, fixed, torch.zeros_like(fixed))
    codes = ((fixed + dither(master, step).float()) * (1.0 / _FIXED)).floor()
    # The midpoint above the weight: carry into the weight, whose ulp may double.
    up = (low + CODES_PER_ULP * unit).to(dtype)
    _, up_inverse = _units(_widen(up), dtype)
    carry = (codes >= CODES_PER_ULP // 2) & (up_inverse != 0)
    weight = torch.where(carry, up, weight)
    codes = torch.where(carry, -(CODES_PER_ULP // 2) * unit * up_inverse, codes.clamp(max=127))
    return weight, codes.to(torch.int8)


def round_weight(master: Tensor, dtype: torch.dtype, step: int | Tensor) -> Tensor:
    """Float32 ``master`` rounded stochastically to ``dtype`` (``"stochastic"``): the dither
    (:func:`dither`) added to the float32 bits below the 16-bit mantissa, which are then
    truncated; a non-finite result, and float16 subnormals, take round-to-nearest."""
    master = master.float()
    noise = dither(master, step)
    if dtype == torch.bfloat16:
        return compressed_state._round_to_bf16(master, noise)
    mantissa, lowest, _ = _FORMATS[dtype]
    drop = 23 - mantissa
    rounded = (_bits(master) + (noise >> (16 - drop))) & (0xFFFFFFFF ^ ((1 << drop) - 1))
    rounded = torch.where(rounded >= 2**31, rounded - 2**32, rounded).to(torch.int32)
    result = rounded.view(torch.float32)
    normal = ((_bits(master) >> 23) & 0xFF) >= lowest
    result = torch.where(torch.isfinite(result) & normal, result, master)
    return result.to(dtype)


# ---- the step's two halves, for every eager and compiled path -------------------------------


def load(param: Tensor, master: Tensor | None) -> Tensor:
    """The float32 work copy of a 16-bit ``param``: its master (``master`` float32), its
    decoded residual (``master`` int8), or the weight itself (None)."""
    if master is None:
        return param.float()
    if master.dtype == torch.int8:
        return decode(param, master)
    return master.clone()


def store(
    param: Tensor, master: Tensor | None, work: Tensor, mode: str, step: int | Tensor
) -> tuple[Tensor, Tensor | None]:
    """The values to write into ``param`` and ``master`` after a step left the float32 ``work``
    (out of place: the caller copies, or selects under GradScaler's ``found_inf``)."""
    if master is None:
        if mode == "stochastic":
            return round_weight(work, param.dtype, step), None
        return work.to(param.dtype), None
    if master.dtype == torch.int8:
        return split(work, param.dtype, step)
    return work.to(param.dtype), work


def store_(
    param: Tensor, master: Tensor | None, work: Tensor, mode: str, step: int | Tensor
) -> None:
    """Write :func:`store`'s values into ``param`` and ``master`` in place. DTensors (FSDP2)
    are written through their local shards: the codec is element-wise."""
    local_param = compressed_state._local_of(param)
    local_work = compressed_state._local_of(work)
    if master is None and mode != "stochastic":
        local_param.copy_(local_work)  # "round": copy_ rounds to nearest
        return
    local_master = None if master is None else compressed_state._local_of(master)
    weight, kept = store(local_param, local_master, local_work, mode, step)
    local_param.copy_(weight)
    if local_master is not None and kept is not None:
        local_master.copy_(kept)


def load_local(param: Tensor, master: Tensor | None) -> Tensor:
    """:func:`load` of a DTensor's local shards, as a DTensor placed like ``param``; of plain
    tensors, :func:`load`."""
    sharded = compressed_state._dtensor(param)
    if sharded is None:
        return load(param, master)
    local_master = None if master is None else compressed_state._local_of(master)
    return compressed_state._like(sharded, load(sharded.to_local(), local_master))


# ---- the state --------------------------------------------------------------------------------


def sync_state_(state: dict[str, Any], param: Tensor, mode: str) -> Tensor | None:
    """Make ``state`` hold the master ``mode`` keeps for ``param`` (created from the weight,
    converted from the master of another mode, or dropped) and return it (None when none is
    kept). A residual missing from a loaded checkpoint is zero: the master is the weight."""
    key = _STATE_KEYS.get(mode) if applies(param, mode) else None
    if key is None and RESIDUAL_KEY not in state and FP32_KEY not in state:
        return None  # the usual case: nothing kept, nothing to drop
    current = state.get(key) if key is not None else None
    if key is not None and current is not None and not _needs_conversion(current, param, key):
        _drop_others(state, key)
        return current
    previous = _stored_master(state, param)
    with torch.no_grad():
        if key == RESIDUAL_KEY:
            codes = torch.zeros_like(param, dtype=torch.int8)
            if previous is not None:
                # The weight stays as it is; the residual holds what the master adds to it.
                local, work = compressed_state._local_of(param), _local(previous)
                _, inverse = _units(local.float(), param.dtype)
                fixed = ((work - local.float()) * inverse).round().clamp(-128, 127)
                compressed_state._local_of(codes).copy_(fixed.to(torch.int8))
            new: Tensor | None = codes
        elif key == FP32_KEY:
            new = (previous if previous is not None else param.detach().float()).clone()
        else:
            new = None
    _drop_others(state, key)
    if key is not None and new is not None:
        state[key] = new
    return new


def _local(t: Tensor) -> Tensor:
    return compressed_state._local_of(t).float()


def _needs_conversion(current: Tensor, param: Tensor, key: str) -> bool:
    """A loaded master of the wrong dtype, shape or device (torch's loader casts floating state
    to the parameter's dtype) is converted."""
    want = torch.int8 if key == RESIDUAL_KEY else torch.float32
    return current.dtype != want or current.shape != param.shape or current.device != param.device


def _stored_master(state: Mapping[str, Any], param: Tensor) -> Tensor | None:
    """The float32 master held in ``state`` under either key, or None."""
    residual = state.get(RESIDUAL_KEY)
    if isinstance(residual, Tensor) and residual.shape == param.shape:
        codes = residual.to(device=param.device)
        if codes.dtype != torch.int8:  # cast by a loader: the codes are small integers
            codes = codes.float().round().clamp(-128, 127).to(torch.int8)
        return load_local(param, codes)
    master = state.get(FP32_KEY)
    if isinstance(master, Tensor) and master.shape == param.shape:
        return master.to(device=param.device, dtype=torch.float32)
    return None


def _drop_others(state: dict[str, Any], key: str | None) -> None:
    for other in (RESIDUAL_KEY, FP32_KEY):
        if other != key:
            state.pop(other, None)


def keep_masters_on_load(optimizer: torch.optim.Optimizer) -> None:
    """Register load_state_dict hooks on ``optimizer`` that keep each group's ``master_weights``
    (a checkpoint of another mode is converted at the next step) and the masters as saved:
    torch's loader casts every state tensor of a floating parameter to the parameter's dtype,
    which would round a float32 master to the 16-bit weight (and int8 codes to bfloat16)."""
    saved: dict[int, dict[str, Tensor]] = {}  # by position among the groups' parameters

    def before(loading: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        saved.clear()
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        for position, param_id in enumerate(ids):
            entry = state_dict["state"].get(param_id) or {}
            kept = {
                k: entry[k] for k in (RESIDUAL_KEY, FP32_KEY) if isinstance(entry.get(k), Tensor)
            }
            if kept:
                saved[position] = kept
        # master_weights is the storage the user chose, as state_precision: each group keeps
        # its own, and the state is converted at the next step.
        groups = [
            {**group, "master_weights": current.get("master_weights", "round")}
            for group, current in zip(
                state_dict["param_groups"], loading.param_groups, strict=False
            )
        ]
        return {**state_dict, "param_groups": groups}

    def after(loaded: torch.optim.Optimizer) -> None:
        params = [p for group in loaded.param_groups for p in group["params"]]
        for position, kept in saved.items():
            param = params[position]
            state = loaded.state.get(param)
            for key, value in kept.items():
                if state is not None and key in state:
                    dtype = torch.int8 if key == RESIDUAL_KEY else torch.float32
                    state[key] = value.to(device=param.device, dtype=dtype, copy=True)
        saved.clear()

    optimizer.register_load_state_dict_pre_hook(before)
    optimizer.register_load_state_dict_post_hook(after)
