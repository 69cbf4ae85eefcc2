"""Low-memory storage of the moments: ``state_precision="fp32" | "bf16" | "int8"``.

The kernels always compute in float32 (or the parameter's float64); only the storage between
steps changes. This module is the reference for the formats: the fused CPU kernel
(``kernels/adabelief_cpu.cpp``) and the compiled path decode, update and encode inside their single
pass with the same operations; the single-tensor and foreach paths decode the moments into
float32 work tensors, run their update and encode them back with :func:`encode_`.

* ``"bf16"``: ``exp_avg`` and ``exp_avg_var`` are bfloat16 (4 bytes per parameter instead of 8).
  The write-back rounds stochastically, so updates smaller than half a bfloat16 ulp are kept in
  expectation instead of being lost. The dither (:func:`dithers`, format version 2) is a hash of
  the moments' float32 bits and the step count: deterministic, no random-number state, so a
  resumed run is bit-identical; one 32-bit hash serves both moments of an element.
* ``"int8"``: for tensors of at least :data:`MIN_QUANTIZED_NUMEL` elements, block-wise
  quantization with one float32 scale per :data:`BLOCK_SIZE` elements (about 2.03 bytes per
  parameter). ``exp_avg`` is signed, ``code * absmax / 127``. ``exp_avg_var`` spans many decades
  (it holds ``eps`` and squared prediction errors), so its square root is stored, unsigned,
  ``(code * rootmax / 255)^2``; a positive belief never gets code 0, so it is never rounded to
  zero (which would turn its step into ``m / eps``). Both round stochastically with the same
  hashed dither, in fixed point: ``code = (round(x * 2**16) + dither) >> 16`` for the scaled,
  clamped value ``x``; deterministic rounding would freeze the moving averages, whose per-step
  change (``1 - beta`` of the gap) is smaller than half a quantization level. Smaller tensors (biases,
  norms) keep float32 state. A block's scale is its largest *finite* magnitude: a non-finite
  value (one ``inf`` gradient element without GradScaler) is stored as the clamp (``+-127`` or
  ``255`` for ``+-inf``, ``0`` for NaN), so it costs its own element, as with float32 state,
  and not the other 255 of its block.

DTensor parameters (FSDP2) keep the same format over the same global blocks: the codes are a
DTensor with the parameter's placements, the block scales a replicated DTensor of the whole
tensor's blocks. A block that straddles two shards gets its scale from an all-reduce (max) of the
partial maxima, so the stored state, and the training, are those of the unsharded tensor on any
mesh, and a checkpoint loads at any world size. This needs each rank's shard to be a contiguous
range of the flattened tensor (placements ``Shard(0)`` or ``Replicate()``, as FSDP2's default);
a DTensor with other placements keeps float32 state under ``"int8"``. The dither depends on each
element's own values only, so sharding never changes it.

Format version 2 (:data:`FORMAT_VERSION`, recorded in state_dicts) decodes the codes of version
1 by the same maps; only the rounding differs, so version 1 state loads as saved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

STATE_PRECISIONS = ("fp32", "bf16", "int8")
#: Elements that share one float32 scale in the int8 format.
BLOCK_SIZE = 256
#: Tensors with fewer elements keep float32 state under ``"int8"`` (the scales would not pay).
MIN_QUANTIZED_NUMEL = 4096

_MASK32 = 0xFFFFFFFF
#: The dither's range: 16 bits, one half of a 32-bit hash.
_DITHER_RANGE = 65536.0
#: The storage format version, written to state_dicts under :data:`FORMAT_VERSION_KEY`.
#: Version 1 (no key) rounded with one 32-bit hash per code; version 2 shares one hash between
#: two moments and rounds in fixed point (:func:`dithers`). The codes decode alike in both.
FORMAT_VERSION = 2
FORMAT_VERSION_KEY = "state_format_version"


def check_state_precision(value: object) -> str:
    """Return ``value`` if it names a storage format, else raise ``ValueError``."""
    if value not in STATE_PRECISIONS:
        raise ValueError(f"Invalid state_precision: {value!r} (expected one of {STATE_PRECISIONS})")
    return str(value)


def storage_format(param: Tensor, precision: str) -> str:
    """The format the moments of ``param`` are stored in: ``precision``, except that int8 needs a
    real floating tensor of at least :data:`MIN_QUANTIZED_NUMEL` elements, and compressed
    formats apply to float32 and 16-bit parameters only (float64 and complex stay exact)."""
    if precision == "fp32" or param.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return "fp32"
    if precision == "int8" and param.numel() < MIN_QUANTIZED_NUMEL:
        return "fp32"
    sharded = _dtensor(param)
    if precision == "int8" and sharded is not None and not _contiguous_shards(sharded):
        return "fp32"
    return precision


def bytes_per_parameter(precision: str, amsgrad: bool = False) -> float:
    """Bytes of optimizer state per parameter of a large float32 tensor in ``precision``."""
    moments = 3 if amsgrad else 2
    if precision == "bf16":
        return 2.0 * moments
    if precision == "int8":
        return moments * (1.0 + 4.0 / BLOCK_SIZE)
    return 4.0 * moments


def _blocks(numel: int) -> int:
    return -(-numel // BLOCK_SIZE)


def _dtensor(t: Tensor) -> DTensor | None:
    """``t`` if it is a DTensor, else None (without importing torch.distributed for plain
    tensors)."""
    if type(t) in (Tensor, torch.nn.Parameter) or not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return t if isinstance(t, DTensor) else None


def _contiguous_shards(t: DTensor) -> bool:
    """Whether each rank's shard of ``t`` is a contiguous range of the flattened tensor: every
    placement ``Replicate()`` or exactly ``Shard(0)`` (FSDP2's default), on a contiguous
    tensor."""
    from torch.distributed.tensor import Replicate, Shard

    placements_ok = all(
        isinstance(p, Replicate) or (type(p) is Shard and p.dim == 0) for p in t.placements
    )
    return placements_ok and t.is_contiguous()


class _Shard(NamedTuple):
    """Where a DTensor's local shard lies in the global block grid of the int8 format."""

    tensor: DTensor  #: the DTensor
    local: Tensor  #: its local shard
    head: int  #: its first element's position in its block
    first: int  #: the index of that block
    blocks: int  #: blocks of the whole tensor


def _shard_of(t: DTensor) -> _Shard:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not _contiguous_shards(t):
        raise ValueError(
            f"int8 state of a DTensor needs placements Shard(0) or Replicate(), not {t.placements}"
        )
    _, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    row = t.numel() // t.shape[0] if t.dim() and t.shape[0] else 0
    offset = offsets[0] * row if t.dim() else 0
    return _Shard(t, t.to_local(), offset % BLOCK_SIZE, offset // BLOCK_SIZE, _blocks(t.numel()))


def _like(t: DTensor, local: Tensor) -> Tensor:
    """``local`` as the local shard of a DTensor placed as ``t``."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
    )


def _replicated(t: DTensor, full: Tensor) -> Tensor:
    """``full`` (the same on every rank) as a replicated DTensor on ``t``'s mesh."""
    from torch.distributed.tensor import DTensor, Replicate

    placements = [Replicate()] * t.device_mesh.ndim
    return DTensor.from_local(
        full, t.device_mesh, placements, run_check=False, shape=full.shape, stride=full.stride()
    )


def new_moment(param: Tensor, key: str, fmt: str) -> dict[str, Tensor]:
    """Zero state for moment ``key`` of ``param`` in format ``fmt`` (with its scales, for int8).
    For a DTensor ``param`` the state is DTensor: the codes placed as ``param``, the int8 scales
    replicated."""
    if fmt == "bf16":
        return {key: torch.zeros_like(param, dtype=torch.bfloat16)}
    if fmt == "int8":
        code_dtype = torch.int8 if key == "exp_avg" else torch.uint8
        sharded = _dtensor(param)
        if sharded is not None:
            local = sharded.to_local()
            scale = torch.zeros(_blocks(param.numel()), dtype=torch.float32, device=local.device)
            return {
                key: torch.zeros_like(param, dtype=code_dtype),
                key + "_scale": _replicated(sharded, scale),
            }
        return {
            key: torch.zeros(param.shape, dtype=code_dtype, device=param.device),
            key + "_scale": torch.zeros(
                _blocks(param.numel()), dtype=torch.float32, device=param.device
            ),
        }
    dtype = torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else None
    return {key: torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)}


def _padded_blocks(flat: Tensor, head: int = 0) -> Tensor:
    """``flat`` in rows of :data:`BLOCK_SIZE`, zero-padded: ``head`` zeros before it (its first
    element's position in its block) and as many as the last block needs after it."""
    tail = (-(head + flat.numel())) % BLOCK_SIZE
    if head or tail:
        flat = torch.nn.functional.pad(flat, (head, tail))
    return flat.view(-1, BLOCK_SIZE)


def decode(stored: Tensor, scale: Tensor | None, key: str) -> Tensor:
    """A float32 work copy of a stored moment."""
    if scale is None:
        return stored.float()
    sharded = _dtensor(stored)
    if sharded is not None:
        shard = _shard_of(sharded)
        local_scale = _dtensor(scale)
        full_scale = local_scale.to_local() if local_scale is not None else scale
        return _like(sharded, _decode_blocks(shard.local, full_scale, key, shard.head, shard.first))
    return _decode_blocks(stored, scale, key, 0, 0)


def _decode_blocks(stored: Tensor, scale: Tensor, key: str, head: int, first: int) -> Tensor:
    n = stored.numel()
    blocks = _padded_blocks(stored.reshape(-1).float(), head)
    scale = scale[first : first + blocks.shape[0]]
    if key == "exp_avg":
        values = blocks * (scale.unsqueeze(1) / 127.0)
    else:
        values = (blocks * (scale.unsqueeze(1) / 255.0)).square_()
    return values.reshape(-1)[head : head + n].view(stored.shape)


def moment_format(stored: Tensor, scale: Tensor | None) -> str:
    """The format of one stored moment: ``"int8"`` with block scales, ``"bf16"`` for bfloat16
    codes (the ``"fp32"`` format keeps float32 moments for 16-bit parameters), else ``"fp32"``."""
    if scale is not None:
        return "int8"
    return "bf16" if stored.dtype == torch.bfloat16 else "fp32"


def encode(
    moments: Sequence[Tensor], fmt: str, step: int | Tensor
) -> list[tuple[Tensor, Tensor | None]]:
    """The stored forms of one parameter's float32 moments ``(exp_avg, exp_avg_var[,
    max_exp_avg_var])`` in format ``fmt``, out of place: for each, (values to copy into the
    stored tensor, new block scales or None). ``step`` (an int or an integer 0-dim tensor) keys
    the dither of the stochastic rounding (:func:`dithers`)."""
    if fmt not in ("bf16", "int8"):
        return [(m, None) for m in moments]
    sharded = _dtensor(moments[0])
    # A DTensor's codes are those of its local shard: the dither is element-wise, and int8
    # blocks are the tensor's global ones (see _Shard).
    local = [_local_of(m) for m in moments]
    coded = [_coded_values(m, fmt, signed=k == 0) for k, m in enumerate(local)]
    noise = dithers(coded, step)
    stored: list[tuple[Tensor, Tensor | None]]
    if fmt == "bf16":
        stored = [(_round_to_bf16(c, d), None) for c, d in zip(coded, noise, strict=True)]
    else:
        shard = _shard_of(sharded) if sharded is not None else None
        stored = [
            _encode_blocks(c, k == 0, d, shard)
            for k, (c, d) in enumerate(zip(coded, noise, strict=True))
        ]
    if sharded is None:
        return stored
    return [
        (_like(sharded, codes), None if scale is None else _replicated(sharded, scale))
        for codes, scale in stored
    ]


def _local_of(t: Tensor) -> Tensor:
    """The local shard of a DTensor, else ``t``."""
    sharded = _dtensor(t)
    return sharded.to_local() if sharded is not None else t


def _coded_values(work: Tensor, fmt: str, signed: bool) -> Tensor:
    """The float32 values whose codes are stored: the moment itself, except int8's beliefs,
    whose square roots are (correctly rounded, through float64, as the C++ kernel's std::sqrt:
    torch's float32 CPU sqrt is not always, and the codes depend on every bit)."""
    work = work.float()
    if fmt == "int8" and not signed:
        return work.clamp(min=0).double().sqrt().float()
    return work


def _encode_blocks(
    coded: Tensor, signed: bool, dither: Tensor, shard: _Shard | None
) -> tuple[Tensor, Tensor]:
    """The int8 codes and block scales of ``coded`` (:func:`_coded_values`); for the local shard
    of a DTensor (``shard``), the scales of all the tensor's blocks, reduced over the mesh
    (max), so that a block split between ranks is scaled as in the unsharded tensor."""
    head = shard.head if shard is not None else 0
    blocks = _padded_blocks(coded.reshape(-1), head)
    noise = _padded_blocks(dither.reshape(-1).float(), head)
    top = 127.0 if signed else 255.0
    magnitude = blocks.abs() if signed else blocks
    # The scale is the largest finite magnitude: a non-finite element (an inf gradient without
    # GradScaler) gets the clamp, +-top for +-inf and 0 for NaN, and leaves its block's other
    # elements as they would be without it.
    block_max = torch.where(magnitude.isfinite(), magnitude, 0.0).amax(dim=1)
    all_blocks = block_max
    if shard is not None:
        block_max, all_blocks = _reduce_block_max(block_max, shard)
    inv = torch.where(block_max > 0, top / block_max, torch.zeros_like(block_max))
    scaled = (blocks * inv.unsqueeze(1)).clamp(-top if signed else 0.0, top)
    # code = floor((round(scaled * 2^16) + dither) / 2^16), dither uniform in [0, 2^16): every
    # intermediate is an integer below 2^24, exact in float32.
    fixed = (scaled * _DITHER_RANGE).round()
    codes = ((fixed + noise) * (1.0 / _DITHER_RANGE)).floor()
    if not signed:  # a positive belief never gets code 0
        codes = torch.where(scaled > 0, codes.clamp(min=1), codes)
    codes = codes.nan_to_num(nan=0.0)
    return codes.reshape(-1)[head : head + coded.numel()].view(coded.shape), all_blocks


def _reduce_block_max(local_max: Tensor, shard: _Shard) -> tuple[Tensor, Tensor]:
    """(the scales of the local blocks, the scales of all blocks): the local maxima placed in
    the tensor's block grid and all-reduced (max) over the mesh dimensions that shard it."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    mesh = shard.tensor.device_mesh
    full = torch.zeros(shard.blocks, dtype=torch.float32, device=local_max.device)
    # The zeros of the padding and of the other ranks' blocks never win: the maxima are >= 0.
    full[shard.first : shard.first + local_max.numel()] = local_max
    for dim, placement in enumerate(shard.tensor.placements):
        if isinstance(placement, Shard):
            dist.all_reduce(full, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
    return full[shard.first : shard.first + local_max.numel()], full


def encode_(
    stored: Sequence[Tensor],
    scales: Sequence[Tensor | None],
    work: Sequence[Tensor],
    step: int | Tensor,
) -> None:
    """Write one parameter's float32 ``work`` moments back into ``stored`` (and their int8
    ``scales``) in place, rounding stochastically with the dither of ``step``."""
    fmt = moment_format(stored[0], scales[0])
    for target, scale, (values, new_scale) in zip(
        stored, scales, encode(work, fmt, step), strict=True
    ):
        target.copy_(values)
        if scale is not None and new_scale is not None:
            scale.copy_(new_scale)


def step_key(step: int | Tensor) -> int | Tensor:
    """The dither's per-step key, ``step * 0x9E3779B9 mod 2**32`` (the golden-ratio increment)."""
    return (step * 0x9E3779B9) & _MASK32


def _mix32(x: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finalizer on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def _bits(values: Tensor) -> Tensor:
    """The float32 bits of ``values`` as int64 in [0, 2**32)."""
    return values.float().contiguous().view(torch.int32).to(torch.int64) & _MASK32


def dithers(coded: Sequence[Tensor], step: int | Tensor) -> list[Tensor]:
    """The 16-bit dithers (int64 in [0, 2**16)) of the coded values of one parameter's moments
    ``(a, b[, c])``: ``h = mix32(bits(a) ^ rotl16(bits(b)) ^ step_key(step))`` serves two
    moments, ``a`` taking its low half and ``b`` its high half; ``c`` (the AMSGrad maximum)
    takes the low half of its own hash, ``mix32(bits(c) ^ step_key(step))``."""
    key = step_key(step)
    b = _bits(coded[1])
    h = _mix32(_bits(coded[0]) ^ (((b << 16) | (b >> 16)) & _MASK32) ^ key)
    noise = [h & 0xFFFF, h >> 16]
    if len(coded) > 2:
        noise.append(_mix32(_bits(coded[2]) ^ key) & 0xFFFF)
    return noise


def _round_to_bf16(values: Tensor, dither: Tensor) -> Tensor:
    """Round float32 ``values`` to bfloat16 stochastically: add the 16-bit ``dither`` to their
    bits and truncate. A non-finite result (of an inf or NaN, or of a value that rounds past the
    largest finite bfloat16) takes round-to-nearest instead."""
    rounded = (_bits(values) + dither) & 0xFFFF0000
    # Back to int32's range (two's complement) so the bits reinterpret as the float32 we mean.
    rounded = torch.where(rounded >= 2**31, rounded - 2**32, rounded).to(torch.int32)
    result = rounded.view(torch.float32)
    result = torch.where(torch.isfinite(result), result, values)
    return result.to(torch.bfloat16)


MOMENT_KEYS = ("exp_avg", "exp_avg_var", "max_exp_avg_var")


def _decode_key(state: Mapping[str, Any], key: str) -> Tensor:
    # The AMSGrad maximum is a belief like exp_avg_var and is stored the same way.
    kind = "exp_avg" if key == "exp_avg" else "exp_avg_var"
    return decode(state[key], state.get(key + "_scale"), kind)


def decode_moments(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """Float32 work copies of the moments present in a parameter's ``state``."""
    return {key: _decode_key(state, key) for key in MOMENT_KEYS if key in state}


def encode_moments_(state: dict[str, Any], work: Mapping[str, Tensor], step: int) -> None:
    """Store the work moments (``exp_avg``, ``exp_avg_var`` and, with AMSGrad,
    ``max_exp_avg_var``) back into ``state`` in its format."""
    keys = [key for key in MOMENT_KEYS if key in work]
    encode_(
        [state[k] for k in keys],
        [state.get(k + "_scale") for k in keys],
        [work[k] for k in keys],
        step,
    )


def format_of(state: Mapping[str, Any]) -> str:
    """The storage format a parameter's saved ``state`` is in."""
    if "exp_avg_scale" in state:
        return "int8"
    moment = state.get("exp_avg")
    # The fp32 format keeps float32 moments for 16-bit parameters, so bfloat16 means "bf16".
    if isinstance(moment, Tensor) and moment.dtype == torch.bfloat16:
        return "bf16"
    return "fp32"


def restore_moments(saved: Mapping[str, Any], param: Tensor, fmt: str) -> dict[str, Tensor]:
    """The moments of a loaded state in format ``fmt`` on ``param``'s device: the saved tensors
    as they were when the format matches (no rounding), else converted through float32."""
    keys = [key for key in MOMENT_KEYS if isinstance(saved.get(key), Tensor)]
    if format_of(saved) == fmt:
        restored: dict[str, Tensor] = {}
        for key in keys:
            fresh = new_moment(param, key, fmt)
            for name, like in fresh.items():
                restored[name] = saved[name].to(device=param.device, dtype=like.dtype, copy=True)
        return restored
    step = int(float(saved.get("step", 0)))
    on_device = {name: t.to(param.device) for name, t in saved.items() if isinstance(t, Tensor)}
    restored = {}
    for key in keys:
        restored.update(new_moment(param, key, fmt))
    encode_moments_(restored, {key: _decode_key(on_device, key) for key in keys}, step)
    return restored


def replace_moments_(
    state: dict[str, Any], saved: Mapping[str, Any], param: Tensor, fmt: str
) -> None:
    """Set ``state``'s moments to those of ``saved`` in format ``fmt`` (see
    :func:`restore_moments`), dropping the scales of a format no longer used."""
    restored = restore_moments(saved, param, fmt)
    for key in [k for k in state if k.endswith("_scale") and k not in restored]:
        del state[key]
    state.update(restored)
