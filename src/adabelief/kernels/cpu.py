"""The fused CPU path: ``adabelief_cpu.cpp``, built once per machine, called through ctypes.

The C++ sources (``adabelief_cpu.cpp`` and the headers it includes: see its opening comment)
ship beside this module. They are compiled with the system C++ compiler and OpenMP into a shared
library cached on disk (:func:`cache_dir`), keyed by every source file's bytes, the compiler,
the flags (the ABI macros included) and the CPU; a later process loads it in about a
millisecond. One call per (parameter dtype, state format) steps every tensor of a group: one
parallel region over chunks of 32768 elements, each thread streaming through its own block of
chunks, then helping with the others'. Hyperparameters are runtime arguments, so a learning rate
or a step that changes never triggers a compilation. The per-step scalars come from
:func:`adabelief.scalars.step_scalars` in Python floats, once per distinct step count.

The ABI (version, dtype codes, state formats, step kinds) is :data:`CPU_ABI`, passed to the
compiler as macros: this table is the one definition that both sides read. A call is one
struct, ``adabelief_call`` of ``abi.h``, which :class:`_Call` and :class:`_Tensor` mirror.

A flag set the compiler rejects leaves a failure note (``<library>.failed``, the compiler's
message) beside where its library would be, so later processes try the next set at once. A note
never outlives its cause: it has the library's key, so a new compiler, other flags or an edited
source are tried afresh, and it is honoured for :data:`FAILED_NOTE_TTL_S` (a day) only, after
which the set is tried again. A compiler that was killed or ran out of memory, disk or time
leaves no note: that failure says nothing about the flags.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import cast

import torch
from torch import Tensor

from adabelief import compressed_state
from adabelief._hyper import Hyperparameters
from adabelief.compressed_state import FP32, StorageFormat
from adabelief.kernels.lists import GroupTensors
from adabelief.scalars import StepScalars, step_scalars

__all__ = [
    "CPU_ABI",
    "CPU_DTYPES",
    "EXTRA_FLAGS_ENV",
    "FAILED_NOTE_TTL_S",
    "build_command",
    "cache_dir",
    "cpu_step",
    "exact_inverse",
    "kernel",
    "kernel_error",
    "source",
    "source_files",
    "supports",
    "write_sources",
]

#: The kernel's ABI, passed to the compiler as ``-D`` macros (see adabelief_cpu.cpp).
CPU_ABI: dict[str, int] = {
    "ADABELIEF_ABI_VERSION": 6,
    "ADABELIEF_DTYPE_FLOAT32": 0,
    "ADABELIEF_DTYPE_FLOAT64": 1,
    "ADABELIEF_DTYPE_BFLOAT16": 2,
    "ADABELIEF_DTYPE_FLOAT16": 3,
    "ADABELIEF_STATE_FP32": 0,
    "ADABELIEF_STATE_BF16": 1,
    "ADABELIEF_STATE_INT8": 2,
    "ADABELIEF_STATE_INT4": 3,
    "ADABELIEF_KIND_ADAPTIVE": 0,
    "ADABELIEF_KIND_MOMENTUM": 1,
    "ADABELIEF_KIND_NO_STEP": 2,
    "ADABELIEF_INT8_BLOCK": compressed_state.BLOCK_SIZE,
    "ADABELIEF_INT4_BLOCK": compressed_state.INT4_BLOCK_SIZE,
    "ADABELIEF_INT4_SIGNED_POWER": compressed_state.INT4_SIGNED_POWER,
    "ADABELIEF_INT4_BELIEF_POWER": compressed_state.INT4_BELIEF_POWER,
    "ADABELIEF_MASTER_ROUND": 0,
    "ADABELIEF_MASTER_RESIDUAL": 1,
    "ADABELIEF_MASTER_FP32": 2,
    "ADABELIEF_MASTER_STOCHASTIC": 3,
}

#: Parameter dtype -> (kernel dtype code, float32 elements per parameter element).
CPU_DTYPES: dict[torch.dtype, tuple[int, int]] = {
    torch.float32: (CPU_ABI["ADABELIEF_DTYPE_FLOAT32"], 1),
    torch.float64: (CPU_ABI["ADABELIEF_DTYPE_FLOAT64"], 1),
    torch.bfloat16: (CPU_ABI["ADABELIEF_DTYPE_BFLOAT16"], 1),
    torch.float16: (CPU_ABI["ADABELIEF_DTYPE_FLOAT16"], 1),
    torch.complex64: (CPU_ABI["ADABELIEF_DTYPE_FLOAT32"], 2),
    torch.complex128: (CPU_ABI["ADABELIEF_DTYPE_FLOAT64"], 2),
}
_STATE_CODES = {
    "fp32": CPU_ABI["ADABELIEF_STATE_FP32"],
    "bf16": CPU_ABI["ADABELIEF_STATE_BF16"],
    "int8": CPU_ABI["ADABELIEF_STATE_INT8"],
    "int4": CPU_ABI["ADABELIEF_STATE_INT4"],
}
_MASTER_CODES = {
    "round": CPU_ABI["ADABELIEF_MASTER_ROUND"],
    "residual": CPU_ABI["ADABELIEF_MASTER_RESIDUAL"],
    "fp32": CPU_ABI["ADABELIEF_MASTER_FP32"],
    "stochastic": CPU_ABI["ADABELIEF_MASTER_STOCHASTIC"],
}
#: The state dtype the kernel reads for the fp32 format, by parameter dtype.
_FP32_STATE_DTYPE = {
    torch.float32: torch.float32,
    torch.float64: torch.float64,
    torch.bfloat16: torch.float32,
    torch.float16: torch.float32,
    torch.complex64: torch.complex64,
    torch.complex128: torch.complex128,
}

#: Extra compiler flags for the kernel (appended to every flag set; part of the cache key).
EXTRA_FLAGS_ENV = "ADABELIEF_CPU_CFLAGS"
#: Flag sets tried in order: the first that compiles and loads is cached.
_FLAG_SETS: tuple[tuple[str, ...], ...] = (
    ("-march=native", "-fopenmp"),
    ("-fopenmp",),
    ("-march=native",),
    (),
)
_COMMON_FLAGS = (
    "-O3",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-fno-math-errno",
    "-fno-trapping-math",  # lets floor() and selects vectorise; results are unchanged
    "-ffp-contract=off",
)
#: How long (seconds) a failure note keeps a flag set from being tried again: one day.
FAILED_NOTE_TTL_S = 24 * 3600
#: Words of a compiler failure that is about the machine, not the flags: no note is left.
_TRANSIENT_FAILURES = (
    "killed signal",  # g++: "fatal error: Killed signal terminated program cc1plus" (OOM killer)
    "out of memory",
    "virtual memory exhausted",
    "cannot allocate memory",
    "no space left on device",
    "internal compiler error",
)
#: Tensor types the kernel takes as they are.
PLAIN_TYPES = frozenset({Tensor, torch.nn.Parameter})
_SOURCE_NAME = "adabelief_cpu.cpp"
_SOURCE_SUFFIXES = (".cpp", ".h")


def source_files() -> dict[str, bytes]:
    """The kernel's C++ sources as shipped in the package, by file name: ``adabelief_cpu.cpp``
    and the headers beside it."""
    folder = resources.files("adabelief.kernels")
    return {
        entry.name: entry.read_bytes()
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(_SOURCE_SUFFIXES)
    }


def source() -> bytes:
    """Every source file's name and bytes, in one string: the build cache key's part."""
    return b"".join(
        name.encode() + b"\0" + len(data).to_bytes(8, "little") + data
        for name, data in source_files().items()
    )


def write_sources(folder: Path) -> Path:
    """Write the sources into ``folder`` (the headers beside the ``.cpp``, where its quoted
    includes find them); the path of the ``.cpp`` to compile."""
    for name, data in source_files().items():
        (folder / name).write_bytes(data)
    return folder / _SOURCE_NAME


def _abi_macros() -> list[str]:
    return [f"-D{name}={value}" for name, value in CPU_ABI.items()]


def build_command(
    compiler: str, flags: Sequence[str], source_path: Path, output: Path
) -> list[str]:
    """The compiler command line that builds the kernel from ``source_path`` into ``output``:
    the common flags, the flag set, then ``$ADABELIEF_CPU_CFLAGS`` (extra flags, split as a
    shell would: e.g. ``-fsanitize=address`` with the sanitizer's runtime preloaded, as
    ``tests/test_kernel_sanitized.py`` does)."""
    return [
        compiler,
        *_COMMON_FLAGS,
        *flags,
        *shlex.split(os.environ.get(EXTRA_FLAGS_ENV, "")),
        *_abi_macros(),
        str(source_path),
        "-o",
        str(output),
    ]


class _Tensor(ctypes.Structure):
    """``adabelief_tensor`` of ``abi.h``: one tensor's operands and step scalars."""

    _fields_ = [
        ("param", ctypes.c_void_p),
        ("grad", ctypes.c_void_p),
        ("exp_avg", ctypes.c_void_p),
        ("exp_avg_var", ctypes.c_void_p),
        ("max_exp_avg_var", ctypes.c_void_p),
        ("exp_avg_scale", ctypes.c_void_p),
        ("exp_avg_var_scale", ctypes.c_void_p),
        ("max_exp_avg_var_scale", ctypes.c_void_p),
        ("numel", ctypes.c_int64),
        ("step_size", ctypes.c_double),
        ("sqrt_bc2", ctypes.c_double),
        ("step_key", ctypes.c_uint32),
        ("kind", ctypes.c_int32),
        ("master", ctypes.c_void_p),
    ]


class _Options(ctypes.Structure):
    """``adabelief_options`` of ``abi.h``."""

    _fields_ = [
        (name, ctypes.c_double)
        for name in ("beta1", "beta2", "eps", "decay", "weight_decay", "gradient_factor")
    ]


class _Call(ctypes.Structure):
    """``adabelief_call`` of ``abi.h``: one step of ``n`` tensors of one parameter dtype and
    one state format."""

    _fields_ = [
        ("dtype", ctypes.c_int32),
        ("format", ctypes.c_int32),
        ("l2", ctypes.c_int32),
        ("amsgrad", ctypes.c_int32),
        ("num_threads", ctypes.c_int32),
        ("master_weights", ctypes.c_int32),
        ("n", ctypes.c_int64),
        ("tensors", ctypes.POINTER(_Tensor)),
        ("options", _Options),
    ]


class _Kernel:
    """The loaded shared library with its argument types declared."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        version = lib.adabelief_abi_version()
        if version != CPU_ABI["ADABELIEF_ABI_VERSION"]:
            raise OSError(f"{path} has ABI version {version}")
        pointer, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.adabelief_increment_steps.argtypes = [i64, pointer, c_int, pointer]
        lib.adabelief_increment_steps.restype = None
        lib.adabelief_update.argtypes = [ctypes.POINTER(_Call)]
        lib.adabelief_update.restype = c_int
        self.path = path
        self.openmp = bool(lib.adabelief_openmp())
        self.avx2 = bool(lib.adabelief_avx2())
        self.increment_steps = lib.adabelief_increment_steps
        self.update = lib.adabelief_update


_lock = threading.Lock()
_kernel: _Kernel | None = None
_kernel_error: str | None = None  # why the kernel is unavailable, once known
#: How many times this process compiled the CPU kernel (0 when it came from the disk cache).
builds = 0


def cache_dir() -> Path:
    """Where the compiled CPU kernel is kept: ``$ADABELIEF_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/adabelief`` (``~/.cache/adabelief``)."""
    if os.environ.get("ADABELIEF_CACHE_DIR"):
        return Path(os.environ["ADABELIEF_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "adabelief"


def compiler() -> str | None:
    """The C++ compiler: ``$CXX``, else the first of c++, g++, clang++ on the PATH."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _machine_fingerprint() -> str:
    """What ``-march=native`` depends on: the CPU model and its feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [
                ln for ln in f.read(65536).splitlines() if ln.startswith(("model name", "flags"))
            ]
        return "\n".join(lines[:2])
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _library_path(compiler_path: str, flags: Sequence[str]) -> Path:
    stat = os.stat(compiler_path)
    key = hashlib.sha256(source())
    for part in (
        compiler_path,
        str(stat.st_size),
        str(stat.st_mtime_ns),
        " ".join(build_command("c++", flags, Path("in"), Path("out"))),
        _machine_fingerprint(),
        sys.platform,
    ):
        key.update(b"\0" + part.encode())
    return cache_dir() / f"adabelief_cpu_{key.hexdigest()[:20]}.so"


class _CompileError(OSError):
    """The compiler rejected the source or the flags (not a timeout, a kill or a full disk)."""


def _build(compiler_path: str, flags: Sequence[str], target: Path) -> None:
    """Compile the kernel into ``target`` (atomically: concurrent processes may race)."""
    global builds
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        source_path = write_sources(Path(tmp))
        output = Path(tmp) / target.name
        command = build_command(compiler_path, flags, source_path, output)
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            said = (result.stderr or result.stdout).strip()
            message = f"{' '.join(command)} failed: {' '.join(said.splitlines()[-3:])}"
            transient = result.returncode < 0 or any(
                words in said.lower() for words in _TRANSIENT_FAILURES
            )
            raise OSError(message) if transient else _CompileError(message)
        os.replace(output, target)
    builds += 1


def _failure_note(failed: Path) -> str | None:
    """The message of the failure note ``failed`` with where it lives and how to retry, or None
    when there is none or it has expired (then it is deleted: the flag set is tried again)."""
    try:
        age = time.time() - failed.stat().st_mtime
        if age >= FAILED_NOTE_TTL_S:
            failed.unlink()
            return None
        text = failed.read_text(errors="replace").strip()
    except OSError:  # no note, or another process removed it first
        return None
    hours = max(1, math.ceil((FAILED_NOTE_TTL_S - age) / 3600))
    return f"{text} [noted in {failed}; retried within {hours} h, or now if you delete it]"


def _load_kernel() -> _Kernel:
    """Load a cached library, else build one, trying :data:`_FLAG_SETS` in order, skipping a
    flag set with a live failure note (see the module docstring)."""
    if os.environ.get("ADABELIEF_DISABLE_FUSED", "") not in ("", "0"):
        raise OSError("disabled by ADABELIEF_DISABLE_FUSED")
    if sys.platform == "win32":
        raise OSError("the CPU kernel is not built on Windows")
    compiler_path = compiler()
    if compiler_path is None:
        raise OSError("no C++ compiler found (set CXX, or install g++ or clang++)")
    paths = [_library_path(compiler_path, flags) for flags in _FLAG_SETS]
    errors = []
    for path in paths:  # cached libraries first: no compilation at all
        if path.exists():
            try:
                return _Kernel(path)
            except (OSError, AttributeError) as error:
                errors.append(str(error))
    for flags, path in zip(_FLAG_SETS, paths, strict=True):
        if path.exists():
            continue  # it was there but did not load (above)
        failed = path.with_suffix(".failed")
        note = _failure_note(failed)
        if note is not None:
            errors.append(note)
            continue
        try:
            _build(compiler_path, flags, path)
            return _Kernel(path)
        except (OSError, subprocess.SubprocessError, AttributeError) as error:
            message = str(error)
            if isinstance(error, _CompileError):
                with contextlib.suppress(OSError):
                    failed.write_text(message)
                message = _failure_note(failed) or message
            errors.append(message)
    raise OSError(errors[0] if errors else "no flag set")


def kernel() -> _Kernel | None:
    """The CPU kernel, loaded (or built) on first use and cached for the process; None when it
    cannot be built (:func:`kernel_error` says why)."""
    global _kernel, _kernel_error
    if _kernel is not None or _kernel_error is not None:
        return _kernel
    with _lock:
        if _kernel is None and _kernel_error is None:
            try:
                _kernel = _load_kernel()
            except Exception as error:  # any failure means: no kernel, use the fallback
                _kernel_error = f"{type(error).__name__}: {error}"
    return _kernel


def kernel_error() -> str | None:
    """Why the kernel is unavailable: after :func:`kernel` returned None, or when no compiler
    can be found (checked without building); None otherwise."""
    if _kernel_error is not None:
        return _kernel_error
    if _kernel is None and compiler() is None:
        return "no C++ compiler found (set CXX, or install g++ or clang++)"
    return None


def supports(params: Sequence[Tensor]) -> bool:
    """Whether the kernel takes these parameters: plain CPU tensors of a supported dtype."""
    return all(type(p) in PLAIN_TYPES and p.is_cpu and p.dtype in CPU_DTYPES for p in params)


# ---------------------------------------------------------------------------------------------
# The step


def _addresses(tensors: Sequence[Tensor | None]) -> list[int]:
    return [0 if t is None else t.data_ptr() for t in tensors]


def cpu_step(
    lib: _Kernel,
    tensors: GroupTensors,
    hp: Hyperparameters,
    *,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """Step plain CPU tensors with the kernel: step counts +1 (one call), scalars per distinct
    step count, then one kernel call per (parameter dtype, state format). One host read each of
    ``found_inf``, ``grad_scale`` (a power of two: see :func:`exact_inverse`) and a tensor ``lr``
    (free on the CPU). With ``found_inf`` nonzero nothing changes, step counts included."""
    if found_inf is not None and float(found_inf) != 0.0:
        return  # GradScaler found inf/NaN: skip the step
    inverse_scale = 1.0
    if grad_scale is not None:
        inverse_scale = exact_inverse(float(grad_scale))
        if inverse_scale == 0.0:
            raise ValueError(f"grad_scale {float(grad_scale)} is not a power of two")
    for dtype in {p.dtype for p in tensors.params}:
        if dtype not in CPU_DTYPES:
            raise TypeError(f"fused AdaBelief: unsupported parameter dtype {dtype}")
    lr = float(hp.lr)
    parts = _parts(tensors)
    numels = [_check_sizes(part, fmt) for (_, fmt), _, part in parts]  # before any change
    new_steps = _increment_steps(lib, tensors.state_steps)

    cache: dict[float, tuple[float, float, int]] = {}
    keys: dict[float, int] = {}
    for step in set(new_steps):
        keys[step] = int(compressed_state.step_key(int(step)))
        cache[step] = _kernel_scalars(
            step_scalars(
                step,
                lr,
                hp.beta1,
                hp.beta2,
                rectify=hp.rectify,
                degenerated_to_sgd=hp.degenerated_to_sgd,
            )
        )
    decoupled = hp.weight_decay != 0 and hp.weight_decouple
    l2 = hp.weight_decay != 0 and not hp.weight_decouple
    options = _Options(
        hp.beta1,
        hp.beta2,
        hp.eps,
        float(hp._replace(lr=lr).decay_factor()) if decoupled else 1.0,
        hp.weight_decay,
        -inverse_scale if hp.maximize else inverse_scale,
    )
    threads = torch.get_num_threads()
    for ((dtype, fmt), positions, part), part_numels in zip(parts, numels, strict=True):
        code, width = CPU_DTYPES[dtype]
        write_back: list[tuple[Tensor, Tensor]] = []
        # The moments unwrapped: their codes, and their block scales (or null pointers).
        state = _FP32_STATE_DTYPE[dtype] if fmt is FP32 else None  # compressed: as stored
        count = len(part.params)
        moments = [part.exp_avgs, part.exp_avg_vars]
        if hp.amsgrad:
            moments.append(part.max_exp_avg_vars)
        columns = [
            _dense_addresses(part.params, dtype, False, write_back),
            _dense_addresses(part.grads, dtype, True, write_back),
        ]
        columns += [
            _dense_addresses([m.codes for m in c], state, False, write_back) for c in moments
        ]
        if not hp.amsgrad:
            columns.append([0] * count)
        columns += [_addresses([m.scale for m in c]) for c in moments]
        if not hp.amsgrad:
            columns.append([0] * count)
        master_code, masters = _masters(part, dtype, hp.master_weights, write_back)
        entries = (_Tensor * count)()
        for j, i in enumerate(positions):
            step_size, sqrt_bc2, kind = cache[new_steps[i]]
            entries[j] = _Tensor(
                *(column[j] for column in columns),
                part_numels[j] * width,
                step_size,
                sqrt_bc2,
                keys[new_steps[i]],
                kind,
                masters[j],
            )
        call = _Call(
            code,
            _STATE_CODES[fmt.name],
            int(l2),
            int(hp.amsgrad),
            threads,
            master_code,
            count,
            entries,
            options,
        )
        status = lib.update(ctypes.byref(call))
        if status != 0:
            raise RuntimeError(f"fused AdaBelief kernel failed with status {status}")
        for original, copy in write_back:
            original.copy_(copy)


def _check_sizes(part: GroupTensors, fmt: StorageFormat) -> list[int]:
    """The element count of each parameter of ``part``; raises unless each of its moments is
    sized for it in ``fmt`` (:meth:`~adabelief.compressed_state.StorageFormat.size_mismatch`):
    the kernel reads and writes every element of the codes and scales it is given."""
    numels = [p.numel() for p in part.params]
    columns = [part.exp_avgs, part.exp_avg_vars, part.max_exp_avg_vars]
    for key, column in zip(compressed_state.MOMENT_KEYS, columns, strict=True):
        why = fmt.size_mismatch(numels, column) if column else None  # max: AMSGrad only
        if why is not None:
            raise ValueError(
                f"fused AdaBelief: a {key!r} state does not fit its parameter: {why} (a "
                "state_dict of another model, or state set by hand?)"
            )
    return numels


def _masters(
    part: GroupTensors, dtype: torch.dtype, mode: str, write_back: list[tuple[Tensor, Tensor]]
) -> tuple[int, list[int]]:
    """The kernel's master-weight mode for a part of ``dtype`` parameters, and each parameter's
    master address (int8 residual codes or float32 master; 0 for none): see
    :mod:`adabelief.master_weights`."""
    count = len(part.params)
    if dtype not in (torch.float16, torch.bfloat16) or mode == "round":
        return _MASTER_CODES["round"], [0] * count
    if mode == "stochastic":
        return _MASTER_CODES[mode], [0] * count
    masters = [part.master_of(j) for j in range(count)]
    if any(m is None for m in masters):
        raise ValueError(f"fused AdaBelief: master_weights={mode!r} without its state")
    want = torch.int8 if mode == "residual" else torch.float32
    return _MASTER_CODES[mode], _dense_addresses(
        cast(list[Tensor], masters), want, False, write_back
    )


def _parts(
    tensors: GroupTensors,
) -> list[tuple[tuple[torch.dtype, StorageFormat], Sequence[int], GroupTensors]]:
    """The group split by (parameter dtype, state format): each part's key, its positions in the
    group and its tensors, in lists of its own (working copies may replace their entries). One
    part, without a per-tensor pass, in the usual case of one dtype and one format."""
    n = len(tensors.params)
    dtypes = {p.dtype for p in tensors.params}
    formats = {m.format for m in tensors.exp_avgs}
    if len(dtypes) == 1 and len(formats) == 1:
        return [((dtypes.pop(), formats.pop()), range(n), tensors.select(range(n)))]
    groups: dict[tuple[torch.dtype, StorageFormat], list[int]] = {}
    for i in range(n):
        groups.setdefault((tensors.params[i].dtype, tensors.format_of(i)), []).append(i)
    return [(key, index, tensors.select(index)) for key, index in groups.items()]


def _dense_addresses(
    column: list[Tensor],
    want: torch.dtype | None,
    read_only: bool,
    write_back: list[tuple[Tensor, Tensor]],
) -> list[int]:
    """The data pointers of ``column``, each tensor first made contiguous and of dtype ``want``
    (None: its own). A tensor that needs a working copy (rare: a non-contiguous parameter or
    gradient, or fp32 state loaded in another dtype) is replaced by it in ``column``; unless
    ``read_only``, (original, copy) goes to ``write_back``, to be copied back after the
    kernel."""
    addresses = []
    for i, t in enumerate(column):
        if (want is not None and t.dtype != want) or not t.is_contiguous():
            copy = t.to(dtype=want or t.dtype, memory_format=torch.contiguous_format, copy=True)
            column[i] = copy
            if not read_only:
                write_back.append((t, copy))
            t = copy
        addresses.append(t.data_ptr())
    return addresses


def exact_inverse(scale: float) -> float:
    """``1/scale`` when it is exact (``scale`` a positive power of two, as GradScaler's always
    is), so that the kernel can multiply where the reference divides; else 0.0."""
    mantissa, _ = math.frexp(scale)
    if scale > 0 and mantissa == 0.5 and math.isfinite(1.0 / scale) and 1.0 / scale != 0.0:
        return 1.0 / scale
    return 0.0


def _increment_steps(lib: _Kernel, state_steps: list[Tensor]) -> list[float]:
    """Add 1 to every step count; the new values. One call when they are all float32 (or all
    float64) CPU tensors."""
    n = len(state_steps)
    new_steps = array("d", bytes(8 * n))
    step_dtypes = {t.dtype for t in state_steps}
    if len(step_dtypes) == 1 and step_dtypes <= {torch.float32, torch.float64}:
        if not all(t.is_cpu for t in state_steps):
            raise ValueError("fused CPU step: step counts must be on the CPU")
        addresses = array("Q", _addresses(state_steps))
        lib.increment_steps(
            n,
            addresses.buffer_info()[0],
            int(torch.float64 in step_dtypes),
            new_steps.buffer_info()[0],
        )
    else:
        for i, step_t in enumerate(state_steps):
            step_t += 1
            new_steps[i] = step_t.item()
    return list(new_steps)


def _kernel_scalars(scalars: StepScalars) -> tuple[float, float, int]:
    """(step_size, sqrt_bc2, kind) with the kernel's step kinds."""
    step_size, sqrt_bc2, adaptive = (float(scalars[0]), float(scalars[1]), bool(scalars[2]))
    if adaptive:
        kind = CPU_ABI["ADABELIEF_KIND_ADAPTIVE"]
    elif step_size != 0:
        kind = CPU_ABI["ADABELIEF_KIND_MOMENTUM"]
    else:
        kind = CPU_ABI["ADABELIEF_KIND_NO_STEP"]
    return step_size, sqrt_bc2, kind
