"""Low-memory storage of the moments: ``state_precision="fp32" | "bf16" | "int8" | "int4"``.

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

* ``"int4"``: block-wise 4-bit codes, two per byte, one float32 scale per
  :data:`INT4_BLOCK_SIZE` elements (about 0.53 bytes per moment); the code maps, the unbiased
  rounding and the layout are :class:`_Int4Format`'s. Parameters it does not apply to (under
  :data:`MIN_QUANTIZED_NUMEL` elements, an odd first dimension, DTensors whose shards are not
  whole pairs of rows) take its :attr:`~StorageFormat.fallback`, int8 (and so float32 for
  small tensors). The fused CPU kernel steps it in the same pass as the update
  (``kernels/codes_int4.h``), bit for bit this code.

DTensor parameters (FSDP2) keep the same format over the same global blocks: the codes are a
DTensor with the parameter's placements (int4's packed codes, the first dimension halved, where
each shard holds whole pairs of rows), the block scales a replicated DTensor of the whole
tensor's blocks. A block that straddles two shards gets its scale from an all-reduce (max) of the
partial maxima, so the stored state, and the training, are those of the unsharded tensor on any
mesh, and a checkpoint loads at any world size. This needs each rank's shard to be a contiguous
range of the flattened tensor (placements ``Shard(0)`` or ``Replicate()``, as FSDP2's default);
a DTensor with other placements keeps float32 state under ``"int8"``. The dither depends on each
element's own values only, so sharding never changes it. A parameter that takes a fallback
because of its layout (placements, or int4 shards that are not whole pairs of rows on this
mesh), not because of the tensor itself, is a :class:`StateFormatFallbackWarning`, once per
process and reason: its distributed checkpoints load only where it takes the same format.

Format version 2 (:data:`FORMAT_VERSION`, recorded in state_dicts) decodes the codes of version
1 by the same maps; only the rounding differs, so version 1 state loads as saved.

Each format is one :class:`StorageFormat` object in :data:`FORMATS`, and this module is the only
place one is defined: which parameters it applies to, its zero state, its decoding, its
encoding, its layout in a saved state and its DTensor shards. A step hands the kernels each
stored moment as one :class:`Moment` (its codes, its scales and its format), so no path reads a
format back from dtypes or keys, and no scale list travels beside the moments. Between steps,
and in state_dicts, a moment is a plain layout: its codes under its key (``"exp_avg"``, ...)
and its block scales, if it has any, under the key plus ``"_scale"``; plain tensors, so that
``torch.load(weights_only=True)``, FSDP2 and ``torch.distributed.checkpoint`` take them as
they are (docs/low-memory-state.md says why these are not tensor subclasses).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

#: Elements that share one float32 scale in the int8 format.
BLOCK_SIZE = 256
#: Tensors with fewer elements keep float32 state under ``"int8"`` (the scales would not pay).
MIN_QUANTIZED_NUMEL = 4096

#: Elements that share one float32 scale in the int4 format (chosen by measurement:
#: docs/low-memory-state.md, "int4").
INT4_BLOCK_SIZE = 128
#: int4 code maps, levels ``(k / top)**power`` of the block scale: ``exp_avg`` (top 7) and the
#: belief (top 15; a power of two, its root taken by square roots).
INT4_SIGNED_POWER = 2
INT4_BELIEF_POWER = 2

#: Parameter dtypes whose moments may be compressed (float64 and complex stay exact).
_COMPRESSIBLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
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
    """The format the moments of ``param`` are stored in: ``precision`` where it applies to
    ``param`` (:meth:`StorageFormat.applies_to`: compressed formats take float32 and 16-bit
    parameters only, int8 also needs :data:`MIN_QUANTIZED_NUMEL` elements), else its
    :attr:`~StorageFormat.fallback`'s, in turn (int4 falls back to int8, int8 to ``"fp32"``)."""
    while precision != "fp32":  # the default, which applies to every parameter
        fmt = FORMATS[precision]
        if fmt.applies_to(param):
            return precision
        precision = fmt.fallback
    return precision


class StateFormatFallbackWarning(UserWarning):
    """A parameter's moments take a fallback of the ``state_precision`` asked for because of
    how the parameter is sharded (its DTensor placements, or its mesh), not because of the
    tensor itself: a distributed checkpoint of that state loads only where the parameter takes
    the same format (:func:`warn_layout_fallback`)."""


#: The (asked, stored, reason) of each StateFormatFallbackWarning this process has shown.
_layout_warnings: set[tuple[str, str, str]] = set()


def warn_layout_fallback(param: Tensor, precision: str, stored: str) -> None:
    """Warn, once per process and reason, when ``param``'s moments, asked for in ``precision``,
    are stored in its fallback ``stored`` because a format of the chain refused the
    parameter's layout (:meth:`StorageFormat.layout_refusal`); nothing when ``stored`` is
    ``precision``. Fallbacks of the tensor itself (dtype, size, an odd first dimension) hold on
    every mesh and are documented, so they pass silently. Called where state is created or
    converted, not at every step."""
    name = precision
    while name != stored and name != "fp32":
        fmt = FORMATS[name]
        reason = fmt.layout_refusal(param)
        if reason is not None:
            key = (precision, stored, reason)
            if key not in _layout_warnings:
                _layout_warnings.add(key)
                warnings.warn(
                    f"adabelief: state_precision={precision!r} stores the moments of a "
                    f"{tuple(param.shape)} parameter as {stored!r}: {name} does not apply "
                    f"because {reason}. A distributed checkpoint of this state loads only where "
                    f"the parameter takes {stored!r} too (docs/low-memory-state.md); shown once "
                    "per process for this reason",
                    StateFormatFallbackWarning,
                    stacklevel=2,
                )
            return
        name = fmt.fallback


def bytes_per_parameter(precision: str, amsgrad: bool = False) -> float:
    """Bytes of optimizer state per parameter of a large float32 tensor in ``precision``."""
    return (3 if amsgrad else 2) * FORMATS[precision].bytes_per_element


class Moment(NamedTuple):
    """One stored moment of one parameter, as the kernels receive it: ``codes`` in ``format``
    (float32 values, or the parameter's dtype for float64 and complex, in ``"fp32"``; bfloat16
    in ``"bf16"``; int8 or uint8 codes in ``"int8"``; packed uint8 codes in ``"int4"``), its
    block ``scale`` (``"int8"`` and ``"int4"`` only, else None), and whether it is a
    ``belief`` (``exp_avg_var`` or the AMSGrad maximum, non-negative) rather than ``exp_avg``.
    It shares the stored tensors: writing to ``codes`` writes the state."""

    codes: Tensor
    scale: Tensor | None
    format: StorageFormat
    belief: bool

    def decode(self) -> Tensor:
        """The moment's values in its working dtype (:meth:`StorageFormat.decode`)."""
        return self.format.decode(self)


class StorageFormat:
    """How moments are stored between steps. One object per format, in :data:`FORMATS`; a new
    format is a subclass here plus its code in the fused CPU kernel (``kernels/cpu.py``'s
    ``_STATE_CODES`` and a ``codes_*.h``). The other paths only call these methods."""

    #: The ``state_precision`` that names it.
    name: str = ""
    #: Bytes per element of one moment of a large float32 tensor.
    bytes_per_element: float = 4.0
    #: The format a parameter this one does not apply to is stored in instead (asked in turn).
    fallback: str = "fp32"
    #: Elements of the parameter per element of a moment's codes (int4: two per byte).
    elements_per_code: int = 1
    #: Elements that share one float32 scale; None for formats without scales.
    block_size: int | None = None

    def __repr__(self) -> str:
        return f"<storage format {self.name!r}>"

    def size_mismatch(self, numels: Sequence[int], moments: Sequence[Moment]) -> str | None:
        """Why one of ``moments`` cannot hold the moment of its parameter (or shard) of
        ``numels[i]`` elements in this format, for the first that cannot; None when all fit.
        The codes must hold ``numel / elements_per_code`` elements and the scale one per block
        (a replicated DTensor's scale covers the whole tensor: more is allowed). The fused
        kernels read and write all of them, so a moment of another size (a state_dict of
        another model, state set by hand) must be refused before they run. Lists, because the
        kernels check every parameter at every step: the usual case is one comparison."""
        per_code, block = self.elements_per_code, self.block_size
        if [m.codes.numel() * per_code for m in moments] == list(numels) and (
            block is None
            or all(
                m.scale is not None and m.scale.numel() * block >= n
                for m, n in zip(moments, numels, strict=True)
            )
        ):
            return None  # the usual case: about 0.2 us a moment
        for m, n in zip(moments, numels, strict=True):
            codes = m.codes.numel() * per_code
            if codes != n:
                return f"its {self.name} codes hold {codes} elements, its parameter {n}"
            held = 0 if m.scale is None else m.scale.numel()
            if block is not None and held < _blocks(n, block):
                return (
                    f"its {self.name} scales cover {held} blocks of {block}, its parameter of "
                    f"{n} elements needs {_blocks(n, block)}"
                )
        raise AssertionError("unreachable: a moment did not fit, and none was found")

    def applies_to(self, param: Tensor) -> bool:
        """Whether ``param``'s moments may take this format (else its :attr:`fallback`'s):
        the tensor fits (:meth:`fits_tensor`) and, for a DTensor, so does its layout
        (:meth:`fits_layout`)."""
        if not self.fits_tensor(param):
            return False
        sharded = _dtensor(param)
        return sharded is None or self.fits_layout(sharded)

    def fits_tensor(self, param: Tensor) -> bool:
        """The conditions on the tensor itself, which hold on every mesh: compressed formats
        take float32 and 16-bit parameters only (float64 and complex stay exact)."""
        return param.dtype in _COMPRESSIBLE_DTYPES

    def fits_layout(self, sharded: DTensor) -> bool:
        """The conditions on a DTensor parameter's layout (placements and mesh)."""
        return True

    def layout_refusal(self, param: Tensor) -> str | None:
        """Why this format does not apply to ``param`` because of its DTensor layout, as the
        end of a sentence; None when it applies, or when it does not for a reason of the tensor
        itself (:meth:`fits_tensor`)."""
        sharded = _dtensor(param)
        if sharded is None or not self.fits_tensor(param) or self.fits_layout(sharded):
            return None
        return self._layout_reason(sharded)

    def _layout_reason(self, sharded: DTensor) -> str:
        return _placement_refusal(sharded) or "its layout does not fit"

    def zeros(self, param: Tensor, belief: bool) -> Moment:
        """A zero moment of ``param``; for a DTensor ``param``, DTensor codes placed as it."""
        raise NotImplementedError

    def decode(self, moment: Moment) -> Tensor:
        """The work values of ``moment``: float32, or the parameter's dtype in ``"fp32"``,
        where they are the stored tensor itself (no copy)."""
        raise NotImplementedError

    def encode(
        self, work: Sequence[Tensor], step: int | Tensor
    ) -> list[tuple[Tensor, Tensor | None]]:
        """The stored forms of one parameter's work moments, out of place: for each of
        ``(exp_avg, exp_avg_var[, max_exp_avg_var])``, in that order, (values to copy into the
        codes, values to copy into the scale or None). ``step`` (an int or an integer 0-dim
        tensor) keys the dither of stochastic rounding (:func:`dithers`)."""
        raise NotImplementedError

    def local(self, moment: Moment) -> Moment | None:
        """``moment`` with DTensor codes replaced by their local shard (which shares its
        memory), for the fused kernels; None when the shard cannot be stepped alone."""
        return moment._replace(codes=_local_of(moment.codes))

    def holds(self, dtype: torch.dtype, scaled: bool) -> bool:
        """Whether a saved state (the plain layout) whose ``exp_avg`` codes are of ``dtype``,
        with block scales beside them (``scaled``) or not, is in this format: the layout alone
        names the format, so finding it costs no more than a dtype read per step."""
        raise NotImplementedError


class _Fp32Format(StorageFormat):
    """Exact: the moments as they are computed, float32 for 16-bit parameters."""

    name = "fp32"
    bytes_per_element = 4.0

    def fits_tensor(self, param: Tensor) -> bool:
        return True

    def zeros(self, param: Tensor, belief: bool) -> Moment:
        dtype = torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else None
        codes = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        return Moment(codes, None, self, belief)

    def decode(self, moment: Moment) -> Tensor:
        return moment.codes

    def encode(
        self, work: Sequence[Tensor], step: int | Tensor
    ) -> list[tuple[Tensor, Tensor | None]]:
        return [(w, None) for w in work]

    def holds(self, dtype: torch.dtype, scaled: bool) -> bool:
        return True  # what no other format holds (FP32 is the last one asked)


class _DitheredFormat(StorageFormat):
    """A compressed format rounded stochastically with :func:`dithers`: one hash serves two
    moments of an element, so a parameter's moments are encoded together. A DTensor's codes
    are those of its local shard (the dither is element-wise)."""

    def encode(
        self, work: Sequence[Tensor], step: int | Tensor
    ) -> list[tuple[Tensor, Tensor | None]]:
        sharded = _dtensor(work[0])
        coded = [self._coded(_local_of(w), belief=k > 0) for k, w in enumerate(work)]
        stored = self._round(coded, dithers(coded, step), sharded)
        if sharded is None:
            return stored
        return [
            (self._place(sharded, codes), None if scale is None else _replicated(sharded, scale))
            for codes, scale in stored
        ]

    def _place(self, sharded: DTensor, codes: Tensor) -> Tensor:
        """The local ``codes`` of the work DTensor ``sharded`` as the stored DTensor."""
        return _like(sharded, codes)

    def _coded(self, work: Tensor, belief: bool) -> Tensor:
        """The float32 values whose codes are stored."""
        return work.float()

    def _round(
        self, coded: Sequence[Tensor], noise: Sequence[Tensor], sharded: DTensor | None
    ) -> list[tuple[Tensor, Tensor | None]]:
        """The codes (and scales) of the local ``coded`` values with dithers ``noise``."""
        raise NotImplementedError


class _Bf16Format(_DitheredFormat):
    """bfloat16, rounded stochastically (:func:`_round_to_bf16`)."""

    name = "bf16"
    bytes_per_element = 2.0

    def zeros(self, param: Tensor, belief: bool) -> Moment:
        return Moment(torch.zeros_like(param, dtype=torch.bfloat16), None, self, belief)

    def decode(self, moment: Moment) -> Tensor:
        return moment.codes.float()

    def _round(
        self, coded: Sequence[Tensor], noise: Sequence[Tensor], sharded: DTensor | None
    ) -> list[tuple[Tensor, Tensor | None]]:
        return [(_round_to_bf16(c, d), None) for c, d in zip(coded, noise, strict=True)]

    def holds(self, dtype: torch.dtype, scaled: bool) -> bool:
        # The fp32 format keeps float32 moments for 16-bit parameters, so bfloat16 means bf16.
        return dtype is torch.bfloat16 and not scaled  # dtypes are singletons: `is` is cheap


class _Int8Format(_DitheredFormat):
    """Block-wise int8 (see the module docstring): ``exp_avg`` signed, ``code * absmax / 127``;
    a belief by its square root, unsigned, ``(code * rootmax / 255)^2``; one float32 scale per
    :data:`BLOCK_SIZE` elements of the tensor's global block grid."""

    name = "int8"
    bytes_per_element = 1.0 + 4.0 / BLOCK_SIZE
    block_size = BLOCK_SIZE

    def fits_tensor(self, param: Tensor) -> bool:
        return param.dtype in _COMPRESSIBLE_DTYPES and param.numel() >= MIN_QUANTIZED_NUMEL

    def fits_layout(self, sharded: DTensor) -> bool:
        return _contiguous_shards(sharded)

    def zeros(self, param: Tensor, belief: bool) -> Moment:
        code_dtype = torch.uint8 if belief else torch.int8
        sharded = _dtensor(param)
        device = sharded.to_local().device if sharded is not None else param.device
        scale = torch.zeros(_blocks(param.numel()), dtype=torch.float32, device=device)
        if sharded is not None:
            codes = torch.zeros_like(param, dtype=code_dtype)
            return Moment(codes, _replicated(sharded, scale), self, belief)
        codes = torch.zeros(param.shape, dtype=code_dtype, device=param.device)
        return Moment(codes, scale, self, belief)

    def decode(self, moment: Moment) -> Tensor:
        assert moment.scale is not None
        sharded = _dtensor(moment.codes)
        if sharded is None:
            return _decode_blocks(moment.codes, moment.scale, moment.belief, 0, 0)
        shard = _shard_of(sharded)
        full_scale = _local_of(moment.scale)
        local = _decode_blocks(shard.local, full_scale, moment.belief, shard.head, shard.first)
        return _like(sharded, local)

    def _coded(self, work: Tensor, belief: bool) -> Tensor:
        # A belief's square root, correctly rounded (through float64, as the C++ kernel's
        # std::sqrt: torch's float32 CPU sqrt is not always, and the codes depend on every bit).
        work = work.float()
        return work.clamp(min=0).double().sqrt().float() if belief else work

    def _round(
        self, coded: Sequence[Tensor], noise: Sequence[Tensor], sharded: DTensor | None
    ) -> list[tuple[Tensor, Tensor | None]]:
        shard = _shard_of(sharded) if sharded is not None else None
        return [
            _encode_blocks(c, k == 0, d, shard)
            for k, (c, d) in enumerate(zip(coded, noise, strict=True))
        ]

    def local(self, moment: Moment) -> Moment | None:
        # A DTensor's block scales span the shards (see the module docstring): the tensor
        # step, with its all-reduce, steps it.
        return None if _dtensor(moment.codes) is not None else moment

    def holds(self, dtype: torch.dtype, scaled: bool) -> bool:
        return scaled  # asked after int4, the other scaled format


class _Int4Format(_DitheredFormat):
    """Block-wise 4-bit codes, two per byte (see docs/low-memory-state.md, "int4"): one float32
    scale per :attr:`block_size` elements, the block's largest finite magnitude ``M``.
    ``exp_avg`` takes signed codes ``c`` in -7..7, ``M * sign(c) * (|c| / 7)**signed_power``; a
    belief unsigned codes 1..15 (0 for zero only), ``M * (c / 15)**belief_power``. A value is
    rounded stochastically between its two neighbouring levels with the probability that makes
    the stored *value* unbiased (the 16-bit dither of :func:`dithers`, in fixed point as int8).
    The codes are uint8, the element ``2i`` of the flattened tensor in the low nibble of byte
    ``i`` and ``2i + 1`` in its high nibble (two's complement for ``exp_avg``), shaped as the
    parameter with its first dimension halved (so the codes give the parameter's shape).
    Parameters with an odd first dimension fall back to int8.

    A DTensor parameter keeps the same codes and blocks as unsharded where each of its shards
    holds whole pairs of rows (:func:`_paired_rows`): then the packed codes of a shard's rows
    are the shard of the codes tensor placed as the parameter, and blocks that straddle the
    shards take their scale from an all-reduce, as int8's. Other DTensors fall back to int8."""

    name = "int4"
    #: Elements that share one float32 scale.
    block_size = INT4_BLOCK_SIZE
    bytes_per_element = 0.5 + 4.0 / INT4_BLOCK_SIZE
    fallback = "int8"
    elements_per_code = 2
    #: ``exp_avg``'s code map: levels ``(k / 7)**signed_power`` of the block's absmax.
    signed_power = INT4_SIGNED_POWER
    #: A belief's code map: levels ``(k / 15)**belief_power`` of the block's max (a power of two).
    belief_power = INT4_BELIEF_POWER

    def fits_tensor(self, param: Tensor) -> bool:
        return (
            param.dtype in _COMPRESSIBLE_DTYPES
            and param.numel() >= MIN_QUANTIZED_NUMEL
            and param.dim() > 0
            and param.shape[0] % 2 == 0
        )

    def fits_layout(self, sharded: DTensor) -> bool:
        return _paired_rows(sharded)

    def _layout_reason(self, sharded: DTensor) -> str:
        if (placements := _placement_refusal(sharded)) is not None:
            return placements
        shards = math.prod(
            sharded.device_mesh.size(dim)
            for dim, placement in enumerate(sharded.placements)
            if placement.is_shard()
        )
        return (
            f"its {shards} shards on this mesh do not each hold whole pairs of rows (first "
            f"dimension {sharded.shape[0]}; int4 needs a multiple of {2 * shards} there)"
        )

    def zeros(self, param: Tensor, belief: bool) -> Moment:
        sharded = _dtensor(param)
        local = param if sharded is None else sharded.to_local()
        codes = torch.zeros(_packed_shape(local.shape), dtype=torch.uint8, device=local.device)
        blocks = _blocks(param.numel(), self.block_size)
        scale = torch.zeros(blocks, dtype=torch.float32, device=local.device)
        if sharded is None:
            return Moment(codes, scale, self, belief)
        return Moment(self._place(sharded, codes), _replicated(sharded, scale), self, belief)

    def _place(self, sharded: DTensor, codes: Tensor) -> Tensor:
        # The packed codes of the shard's rows, as a shard of codes placed as the parameter.
        return _like(sharded, codes, _packed_shape(sharded.shape))

    def _levels(self, belief: bool, device: torch.device) -> Tensor:
        """The levels of the code map, as fractions of the block scale (float32, from float64)."""
        top, power = (15, self.belief_power) if belief else (7, self.signed_power)
        k = torch.arange(top + 1, dtype=torch.float64, device=device)
        return (k / top).pow(power).float()

    def decode(self, moment: Moment) -> Tensor:
        assert moment.scale is not None
        sharded = _dtensor(moment.codes)
        if sharded is None:
            return self._decode(moment.codes, moment.scale, moment.belief, 0, 0)
        shard = _shard_of(sharded, self.block_size, elements_per_item=2)
        scale = _local_of(moment.scale)
        local = self._decode(shard.local, scale, moment.belief, shard.head, shard.first)
        return _like(sharded, local, _unpacked_shape(sharded.shape))

    def _decode(self, packed: Tensor, scale: Tensor, belief: bool, head: int, first: int) -> Tensor:
        """The values of ``packed`` codes whose first element is at position ``head`` of block
        ``first`` of ``scale``."""
        flat = packed.reshape(-1)
        nibbles = torch.stack([flat & 15, flat >> 4], dim=1).reshape(-1).to(torch.int64)
        levels = self._levels(belief, packed.device)
        if belief:
            values = levels[nibbles]
        else:
            signed = nibbles - 16 * (nibbles >= 8).to(torch.int64)
            values = levels[signed.abs()] * signed.sign().float()
        blocks = _padded_blocks(values, head, self.block_size)
        blocks = blocks * scale[first : first + blocks.shape[0]].unsqueeze(1)
        return blocks.reshape(-1)[head : head + values.numel()].view(_unpacked_shape(packed.shape))

    def _round(
        self, coded: Sequence[Tensor], noise: Sequence[Tensor], sharded: DTensor | None
    ) -> list[tuple[Tensor, Tensor | None]]:
        shard = _shard_of(sharded, self.block_size) if sharded is not None else None
        return [
            self._encode(c, k > 0, d, shard)
            for k, (c, d) in enumerate(zip(coded, noise, strict=True))
        ]

    def _encode(
        self, values: Tensor, belief: bool, dither: Tensor, shard: _Shard | None
    ) -> tuple[Tensor, Tensor]:
        """The packed codes of ``values`` and the block scales; for the local shard of a
        DTensor (``shard``), the scales of all the tensor's blocks, reduced over the mesh."""
        top, power = (15, self.belief_power) if belief else (7, self.signed_power)
        n = values.numel()
        head = shard.head if shard is not None else 0
        blocks = _padded_blocks(values.reshape(-1), head, self.block_size)
        noise = _padded_blocks(dither.reshape(-1).float(), head, self.block_size)
        magnitude = blocks.clamp(min=0.0) if belief else blocks.abs()
        # The scale is the largest finite magnitude; +-inf gets the top code, NaN code 0.
        block_max = torch.where(magnitude.isfinite(), magnitude, 0.0).amax(dim=1)
        all_blocks = block_max
        if shard is not None:
            block_max, all_blocks = _reduce_block_max(block_max, shard)
        inv = torch.where(block_max > 0, 1.0 / block_max, torch.zeros_like(block_max))
        u = (magnitude * inv.unsqueeze(1)).clamp(0.0, 1.0)
        # The level below u: floor(top * u**(1/power)), the root by correctly rounded square
        # roots in float64 (as a C++ kernel's std::sqrt would).
        root = u.double()
        for _ in range(power.bit_length() - 1):
            root = root.sqrt()
        low = (root * top).floor().clamp(max=top - 1).float().nan_to_num(0.0)
        index = low.to(torch.int64)
        levels = self._levels(belief, values.device)
        below, above = levels[index], levels[index + 1]
        # Up with probability (u - below) / (above - below): the stored value is unbiased.
        frac = ((u - below) / (above - below)).clamp(0.0, 1.0)
        up = (((frac * _DITHER_RANGE).round() + noise) * (1.0 / _DITHER_RANGE)).floor()
        codes = low + up
        if belief:  # a positive belief never gets code 0 (its step would be m / eps)
            codes = torch.where(u > 0, codes.clamp(min=1.0), codes)
        else:
            codes = codes * blocks.sign()
        codes = codes.nan_to_num(nan=0.0).reshape(-1)[head : head + n].to(torch.int64) & 15
        pairs = codes.view(-1, 2)
        packed = (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8)
        return packed.view(_packed_shape(values.shape)), all_blocks

    def local(self, moment: Moment) -> Moment | None:
        # As int8's: a DTensor's block scales span the shards.
        return None if _dtensor(moment.codes) is not None else moment

    def holds(self, dtype: torch.dtype, scaled: bool) -> bool:
        return scaled and dtype is torch.uint8


FP32: StorageFormat = _Fp32Format()
BF16: StorageFormat = _Bf16Format()
INT8: StorageFormat = _Int8Format()
INT4: StorageFormat = _Int4Format()
#: Every storage format by name; a saved state's is the first that :meth:`~StorageFormat.holds`
#: it, from the last to the first (fp32, which holds any, is asked last).
FORMATS: dict[str, StorageFormat] = {f.name: f for f in (FP32, BF16, INT8, INT4)}
STATE_PRECISIONS = tuple(FORMATS)


def _blocks(numel: int, block: int = BLOCK_SIZE) -> int:
    return -(-numel // block)


def _packed_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of int4's packed codes of a tensor of ``shape``: the first dimension halved."""
    return (shape[0] // 2, *shape[1:])


def _unpacked_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of the tensor whose int4 codes have ``shape``."""
    return (shape[0] * 2, *shape[1:])


def _dtensor(t: Tensor) -> DTensor | None:
    """``t`` if it is a DTensor, else None (without importing torch.distributed for plain
    tensors)."""
    if type(t) in (Tensor, torch.nn.Parameter) or not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return t if isinstance(t, DTensor) else None


def _local_of(t: Tensor) -> Tensor:
    """The local shard of a DTensor, else ``t``."""
    sharded = _dtensor(t)
    return sharded.to_local() if sharded is not None else t


def _contiguous_shards(t: DTensor) -> bool:
    """Whether each rank's shard of ``t`` is a contiguous range of the flattened tensor: every
    placement ``Replicate()`` or exactly ``Shard(0)`` (FSDP2's default), on a contiguous
    tensor."""
    from torch.distributed.tensor import Replicate, Shard

    placements_ok = all(
        isinstance(p, Replicate) or (type(p) is Shard and p.dim == 0) for p in t.placements
    )
    return placements_ok and t.is_contiguous()


def _placement_refusal(t: DTensor) -> str | None:
    """Why ``t``'s shards are not contiguous ranges (:func:`_contiguous_shards`), or None."""
    if _contiguous_shards(t):
        return None
    if not t.is_contiguous():
        return "it is not contiguous, so its shards are not ranges of the flattened tensor"
    return (
        f"its placements {tuple(t.placements)} do not cut it into ranges of the flattened "
        "tensor (block-wise formats need Shard(0) or Replicate())"
    )


def _paired_rows(t: DTensor) -> bool:
    """Whether every shard of ``t`` is a contiguous range (:func:`_contiguous_shards`) of whole
    pairs of rows: its first row and its number of rows even, on every rank. Then the int4
    codes of a shard (two consecutive elements per byte) are whole bytes, and the codes tensor
    (first dimension halved) placed as ``t`` splits into exactly those bytes: DTensor's
    ``Shard(0)`` cuts ``n`` rows into chunks of ``ceil(n / k)``, and ``ceil(n / 2k)`` is half
    of an even ``ceil(n / k)``. It holds where the first dimension is a multiple of twice the
    number of shards, and depends on the mesh otherwise."""
    from torch.distributed.tensor import Shard

    if not _contiguous_shards(t) or t.dim() == 0:
        return False
    ranges = [(0, t.shape[0])]  # (first row, rows) of each shard, over all ranks
    for mesh_dim, placement in enumerate(t.placements):
        if isinstance(placement, Shard):
            k = t.device_mesh.size(mesh_dim)
            ranges = [
                (start + min(i * chunk, rows), max(0, min(chunk, rows - i * chunk)))
                for start, rows in ranges
                for chunk in [-(-rows // k)]
                for i in range(k)
            ]
    return all(start % 2 == 0 and rows % 2 == 0 for start, rows in ranges)


class _Shard(NamedTuple):
    """Where a DTensor's local shard lies in the global block grid of a block-wise format."""

    tensor: DTensor  #: the DTensor
    local: Tensor  #: its local shard
    head: int  #: its first element's position in its block
    first: int  #: the index of that block
    blocks: int  #: blocks of the whole tensor


def _shard_of(t: DTensor, block: int = BLOCK_SIZE, elements_per_item: int = 1) -> _Shard:
    """Where ``t``'s local shard lies in the grid of ``block`` elements of the flattened
    tensor; each item of ``t`` stands for ``elements_per_item`` elements (2 for int4's packed
    codes)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not _contiguous_shards(t):
        raise ValueError(
            f"block-wise state of a DTensor needs placements Shard(0) or Replicate(), not "
            f"{t.placements}"
        )
    _, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    row = t.numel() // t.shape[0] if t.dim() and t.shape[0] else 0
    offset = offsets[0] * row * elements_per_item if t.dim() else 0
    blocks = _blocks(t.numel() * elements_per_item, block)
    return _Shard(t, t.to_local(), offset % block, offset // block, blocks)


def _like(t: DTensor, local: Tensor, shape: Sequence[int] | None = None) -> Tensor:
    """``local`` as the local shard of a DTensor placed as ``t``, of ``t``'s shape or of
    ``shape`` (contiguous)."""
    from torch.distributed.tensor import DTensor

    if shape is None:
        size, stride = t.shape, t.stride()
    else:
        size = torch.Size(shape)
        stride = _contiguous_stride(size)
    return DTensor.from_local(
        local, t.device_mesh, t.placements, run_check=False, shape=size, stride=stride
    )


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape``."""
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= max(size, 1)
    return tuple(reversed(stride))


def _replicated(t: DTensor, full: Tensor) -> Tensor:
    """``full`` (the same on every rank) as a replicated DTensor on ``t``'s mesh."""
    from torch.distributed.tensor import DTensor, Replicate

    placements = [Replicate()] * t.device_mesh.ndim
    return DTensor.from_local(
        full, t.device_mesh, placements, run_check=False, shape=full.shape, stride=full.stride()
    )


def _padded_blocks(flat: Tensor, head: int = 0, block: int = BLOCK_SIZE) -> Tensor:
    """``flat`` in rows of ``block``, zero-padded: ``head`` zeros before it (its first element's
    position in its block) and as many as the last block needs after it."""
    tail = (-(head + flat.numel())) % block
    if head or tail:
        flat = torch.nn.functional.pad(flat, (head, tail))
    return flat.view(-1, block)


def _decode_blocks(stored: Tensor, scale: Tensor, belief: bool, head: int, first: int) -> Tensor:
    n = stored.numel()
    blocks = _padded_blocks(stored.reshape(-1).float(), head)
    scale = scale[first : first + blocks.shape[0]]
    if belief:
        values = (blocks * (scale.unsqueeze(1) / 255.0)).square_()
    else:
        values = blocks * (scale.unsqueeze(1) / 127.0)
    return values.reshape(-1)[head : head + n].view(stored.shape)


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


#: The moments of a parameter's state, in the order the kernels take them; all but the first
#: are beliefs.
MOMENT_KEYS = ("exp_avg", "exp_avg_var", "max_exp_avg_var")
#: The key of a moment's block scales in the state: the moment's key plus this.
SCALE_SUFFIX = "_scale"


def moment(state: Mapping[str, Any], key: str, fmt: StorageFormat) -> Moment:
    """Moment ``key`` of a parameter's ``state`` (the plain layout), stored in ``fmt``."""
    return Moment(state[key], state.get(key + SCALE_SUFFIX), fmt, key != MOMENT_KEYS[0])


def step_moments(
    state: Mapping[str, Any], fmt: StorageFormat, amsgrad: bool
) -> tuple[Moment, Moment, Moment | None]:
    """(exp_avg, exp_avg_var, max_exp_avg_var or None) of a parameter's ``state`` in ``fmt``:
    :func:`moment` of each, with the keys spelled out (this runs for every parameter at every
    step)."""
    get, new = state.get, tuple.__new__  # Moment's own __new__ is one Python call more
    return (
        new(Moment, (state["exp_avg"], get("exp_avg_scale"), fmt, False)),
        new(Moment, (state["exp_avg_var"], get("exp_avg_var_scale"), fmt, True)),
        new(Moment, (state["max_exp_avg_var"], get("max_exp_avg_var_scale"), fmt, True))
        if amsgrad
        else None,
    )


def layout(key: str, stored: Moment) -> dict[str, Tensor]:
    """The plain layout of moment ``key``: its codes under ``key``, its scales (if any) under
    ``key + "_scale"``."""
    if stored.scale is None:
        return {key: stored.codes}
    return {key: stored.codes, key + SCALE_SUFFIX: stored.scale}


def as_moment(t: Tensor | Moment, belief: bool) -> Moment:
    """``t`` as a :class:`Moment`: a plain tensor is ``"bf16"`` if bfloat16, else ``"fp32"``
    (a compressed format that needs scales comes as a :class:`Moment`)."""
    if isinstance(t, Moment):
        return t
    return Moment(t, None, BF16 if t.dtype == torch.bfloat16 else FP32, belief)


def new_moment(param: Tensor, key: str, fmt: str) -> dict[str, Tensor]:
    """Zero state for moment ``key`` of ``param`` in format ``fmt``, in the plain layout. For a
    DTensor ``param`` the state is DTensor: the codes placed as ``param``, int8 scales
    replicated."""
    return layout(key, FORMATS[fmt].zeros(param, key != MOMENT_KEYS[0]))


def encode(
    work: Sequence[Tensor], fmt: str, step: int | Tensor
) -> list[tuple[Tensor, Tensor | None]]:
    """:meth:`StorageFormat.encode` of the format named ``fmt``: the stored forms of one
    parameter's work moments ``(exp_avg, exp_avg_var[, max_exp_avg_var])``, out of place."""
    return FORMATS[fmt].encode(work, step)


def encode_(stored: Sequence[Moment], work: Sequence[Tensor], step: int | Tensor) -> None:
    """Write one parameter's ``work`` moments back into its ``stored`` moments (codes and
    scales, in their format) in place, rounding stochastically with the dither of ``step``."""
    new = stored[0].format.encode(work, step)
    for target, (codes, scale) in zip(stored, new, strict=True):
        if codes is not target.codes:
            target.codes.copy_(codes)
        if target.scale is not None and scale is not None:
            target.scale.copy_(scale)


def format_of(state: Mapping[str, Any]) -> str:
    """The storage format a parameter's saved ``state`` (the plain layout) is in: the first of
    :data:`FORMATS`, from the last, that :meth:`~StorageFormat.holds` its layout."""
    codes = state.get("exp_avg")
    if codes is None:
        return FP32.name
    # This runs for every parameter at every step, so each layout is looked up once (per size
    # of FORMATS, and checked to be still registered: formats may be added at run time).
    # dtypes are singletons keyed by id (hashing a torch.dtype costs more than the lookup).
    dtype, scaled = codes.dtype, "exp_avg_scale" in state
    layout = (id(dtype), scaled, len(FORMATS))
    fmt = _FORMAT_OF_LAYOUT.get(layout)
    if fmt is None or FORMATS.get(fmt.name) is not fmt:
        holders = (f for f in reversed(FORMATS.values()) if f.holds(dtype, scaled))
        fmt = _FORMAT_OF_LAYOUT[layout] = next(holders, FP32)
    return fmt.name


_FORMAT_OF_LAYOUT: dict[tuple[int, bool, int], StorageFormat] = {}


def _moments(state: Mapping[str, Any]) -> list[Moment]:
    fmt = FORMATS[format_of(state)]
    return [moment(state, key, fmt) for key in MOMENT_KEYS if isinstance(state.get(key), Tensor)]


def decode_moments(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """Float32 work copies of the moments present in a parameter's ``state``."""
    keys = [key for key in MOMENT_KEYS if isinstance(state.get(key), Tensor)]
    return {key: m.decode().float() for key, m in zip(keys, _moments(state), strict=True)}


def encode_moments_(state: dict[str, Any], work: Mapping[str, Tensor], step: int) -> None:
    """Store the work moments (``exp_avg``, ``exp_avg_var`` and, with AMSGrad,
    ``max_exp_avg_var``) back into ``state`` in its format."""
    stored = _moments(state)
    encode_(stored, [work[key] for key in MOMENT_KEYS[: len(stored)]], step)


def restore_moments(saved: Mapping[str, Any], param: Tensor, fmt: str) -> dict[str, Tensor]:
    """The moments of a loaded state in format ``fmt`` on ``param``'s device, in the plain
    layout: the saved tensors as they were when the format matches (no rounding), else
    converted through float32."""
    keys = [key for key in MOMENT_KEYS if isinstance(saved.get(key), Tensor)]
    target = FORMATS[fmt]
    fresh = [target.zeros(param, key != MOMENT_KEYS[0]) for key in keys]
    if format_of(saved) == fmt:
        restored: dict[str, Tensor] = {}
        for key, zero in zip(keys, fresh, strict=True):
            for name, like in layout(key, zero).items():
                if saved[name].shape != like.shape:
                    why = (
                        f"it has shape {tuple(saved[name].shape)}, {fmt} needs {tuple(like.shape)}"
                    )
                    raise ValueError(_unfit(name, param, why))
                restored[name] = saved[name].to(device=param.device, dtype=like.dtype, copy=True)
        return restored
    step = int(float(saved.get("step", 0)))
    on_device = {name: t.to(param.device) for name, t in saved.items() if isinstance(t, Tensor)}
    work: list[Tensor] = []
    for key, m in zip(keys, _moments(on_device), strict=True):
        misfit = m.format.size_mismatch([param.numel()], [m])
        if misfit is not None:
            raise ValueError(_unfit(key, param, misfit))
        decoded = m.decode().float()
        if decoded.shape != param.shape:
            raise ValueError(_unfit(key, param, f"it decodes to shape {tuple(decoded.shape)}"))
        work.append(decoded)
    encode_(fresh, work, step)
    restored = {}
    for key, stored in zip(keys, fresh, strict=True):
        restored.update(layout(key, stored))
    return restored


def _unfit(name: str, param: Tensor, why: str) -> str:
    """The message of a loaded moment ``name`` that does not fit ``param``, and ``why``."""
    return (
        f"saved optimizer state {name!r} does not fit a parameter of shape "
        f"{tuple(param.shape)}: {why} (a state_dict of another model, or the parameters in "
        "another order?)"
    )


def replace_moments_(
    state: dict[str, Any], saved: Mapping[str, Any], param: Tensor, fmt: str
) -> None:
    """Set ``state``'s moments to those of ``saved`` in format ``fmt`` (see
    :func:`restore_moments`), dropping the scales of a format no longer used."""
    put_moments_(state, restore_moments(saved, param, fmt))


def put_moments_(state: dict[str, Any], restored: Mapping[str, Tensor]) -> None:
    """Set ``state``'s moments to ``restored`` (from :func:`restore_moments`), dropping the
    scales of a format no longer used."""
    for key in [k for k in state if k.endswith(SCALE_SUFFIX) and k not in restored]:
        del state[key]
    state.update(restored)
