"""The fused single-pass kernel (``fused=True``, and the default where it is faster).

Every element of a parameter is read once (``p``, ``g``, ``m``, ``s`` and, with AMSGrad,
``s_max``) and written once (``p``, ``m``, ``s``, ``s_max``), with no temporaries the size of the
parameters: 28 bytes per float32 parameter, the same traffic as a fused Adam step. Per element,
in the order of :mod:`adabelief._single_tensor` (the reference)::

    g  = g / grad_scale                      (GradScaler's scale, when given)
    g  = -g                                  (maximize)
    p  = p * (1 - lr*wd)  or  g = g + wd*p   (decoupled / L2 weight decay; 1 - wd when fixed)
    m  = beta1*m + (1 - beta1)*g
    s  = beta2*s + (1 - beta2)*(g - m)^2 + eps
    v  = s_max = max(s_max, s)  (AMSGrad)    else v = s
    p  = p - step_size * m / (sqrt(v)/sqrt_bc2 + eps)  (adaptive)
         p - step_size * m                             (rectified warm-up, SGD fall-back)

``step_size``, ``sqrt_bc2`` and whether the step is adaptive come from
:func:`adabelief.scalars.step_scalars`, per parameter and its own step count.

Two implementations:

* **CPU**: a C++ kernel (below, ``_CPP_SOURCE``), compiled once per machine with the system
  C++ compiler and OpenMP into a shared library cached on disk (see :func:`cache_dir`), and called
  through :mod:`ctypes` once per step for all tensors of a dtype: one parallel region over
  chunks of 32768 elements (each thread streams through its own contiguous block of chunks,
  then helps with the others'), the hyperparameters as runtime arguments (96 specialised loops:
  4 dtypes x L2 x AMSGrad x grad scale x adaptive/SGD/no step). A learning rate or step that
  changes never triggers a compilation. Within a process the library is loaded once; a later
  process loads it from the cache in about a millisecond. The per-step scalars are computed in
  Python floats by :func:`step_scalars`, once per distinct step count, and passed as doubles.
* **CUDA** (and any device under ``torch.compile``): :func:`tensor_group_update`, the same
  update in torch operations with the step count on the device (``capturable`` semantics: no
  host synchronisation), compiled with ``torch.compile(dynamic=True, fullgraph=True)`` for the
  whole list of tensors of a group. Learning rate, step and GradScaler values are tensors, so
  changing them does not recompile.

Where the kernel cannot be built (no compiler, a compile error, ``ADABELIEF_DISABLE_FUSED=1``) or
``torch.compile`` is unavailable for a device, the step falls back to the foreach path (CPU) or to
the uncompiled tensor update, with one warning per process (:class:`FusedFallbackWarning`).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from array import array
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adabelief._foreach import foreach_step
from adabelief._hyper import LOW_PRECISION_DTYPES, Hyperparameters
from adabelief.scalars import StepScalars, step_scalars

__all__ = [
    "FusedFallbackWarning",
    "cache_dir",
    "check_available",
    "cpu_kernel_available",
    "fused_step",
    "is_default_for",
    "tensor_group_update",
]


class FusedFallbackWarning(UserWarning):
    """``fused=True`` could not use its kernel and ran a slower path (issued once per process)."""


# ---------------------------------------------------------------------------------------------
# The CPU kernel.
#
# The arithmetic repeats the reference (torch's own vectorised CPU kernels) operation for
# operation: ``add(alpha=a)`` is fma(b, a, x), ``addcmul(value=v)`` is fma(v*b, c, x),
# ``addcdiv(value=v)`` is x + (v*b)/c; nothing else is contracted (-ffp-contract=off). The one
# difference: std::sqrt is correctly rounded, torch's CPU sqrt (MKL VML in the pip wheels) is not
# always, so results differ from the single-tensor path by an ulp now and then. 16-bit
# parameters are widened to float32 and rounded back to nearest even, as ``copy_`` does.
_CPP_SOURCE = r"""
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

struct BF16 { uint16_t bits; };
struct F16 { uint16_t bits; };

inline float from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float load(const float* x, int64_t i) { return x[i]; }
inline double load(const double* x, int64_t i) { return x[i]; }
inline float load(const BF16* x, int64_t i) { return from_bits(uint32_t(x[i].bits) << 16); }
inline float load(const F16* x, int64_t i) {
  const uint32_t h = x[i].bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = float(mantissa) * 5.9604644775390625e-08f;
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return from_bits(sign | 0x7f800000u | (mantissa << 13));
  return from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline void store(float* x, int64_t i, float v) { x[i] = v; }
inline void store(double* x, int64_t i, double v) { x[i] = v; }
inline void store(BF16* x, int64_t i, float v) {
  const uint32_t u = to_bits(v);
  // Round to nearest even; NaN becomes the canonical quiet NaN, as in c10::BFloat16.
  x[i].bits = std::isnan(v) ? uint16_t(0x7fc0u) : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline void store(F16* x, int64_t i, float v) {
  const uint32_t u = to_bits(v);
  const uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  uint32_t h;
  if (a > 0x7f800000u) {
    h = 0x7e00u;  // NaN
  } else if (a >= 0x477ff000u) {
    h = 0x7c00u;  // at least 65520: rounds to infinity
  } else if (a < 0x38800000u) {
    // Below 2^-14: adding 0.5 rounds the magnitude (to nearest even) to a multiple of 2^-24, the
    // subnormal step of a half, and leaves that multiple in the low mantissa bits.
    h = to_bits(from_bits(a) + 0.5f) - 0x3f000000u;
  } else {
    a += 0xc8000fffu + ((a >> 13) & 1u);  // rebias the exponent, round to nearest even
    h = a >> 13;
  }
  x[i].bits = uint16_t(sign | h);
}

template <typename P> struct Math { using T = float; };
template <> struct Math<double> { using T = double; };

enum Kind : int { kAdaptive = 0, kMomentum = 1, kNoStep = 2 };

struct Options {
  double beta1, beta2, eps, decay, weight_decay, grad_scale, sign;
};

template <typename P, bool L2, bool AMS, int KIND, bool SCALE>
void update_range(P* __restrict p, const P* __restrict g, typename Math<P>::T* __restrict m,
                  typename Math<P>::T* __restrict s, typename Math<P>::T* __restrict s_max,
                  int64_t begin, int64_t end, const Options& o, double step_size,
                  double sqrt_bc2) {
  using T = typename Math<P>::T;
  const T beta1 = T(o.beta1), one_minus_beta1 = T(1.0 - o.beta1);
  const T beta2 = T(o.beta2), one_minus_beta2 = T(1.0 - o.beta2);
  const T eps = T(o.eps), decay = T(o.decay), weight_decay = T(o.weight_decay);
  const T scale = T(o.grad_scale), sign = T(o.sign);
  const T neg_step = T(-step_size), bc2 = T(sqrt_bc2);
  for (int64_t i = begin; i < end; ++i) {
    T grad = load(g, i);
    if (SCALE) grad = grad / scale;
    grad = grad * sign;
    T param = load(p, i);
    if (L2) {
      grad = std::fma(param, weight_decay, grad);
    } else {
      param = param * decay;  // exactly param when decay == 1
    }
    T avg = m[i] * beta1;
    avg = std::fma(grad, one_minus_beta1, avg);
    const T residual = grad - avg;
    T var = s[i] * beta2;
    var = std::fma(one_minus_beta2 * residual, residual, var);
    var = var + eps;
    T belief = var;
    if (AMS) {
      const T previous = s_max[i];
      belief = (previous > var || previous != previous) ? previous : var;  // NaN wins
      s_max[i] = belief;
    }
    if (KIND == kAdaptive) {
      const T denom = std::sqrt(belief) / bc2 + eps;
      param = param + (neg_step * avg) / denom;
    } else if (KIND == kMomentum) {
      param = std::fma(avg, neg_step, param);
    }
    m[i] = avg;
    s[i] = var;
    store(p, i, param);
  }
}

using Fn = void (*)(void*, const void*, void*, void*, void*, int64_t, int64_t, const Options&,
                    double, double);

template <typename P, bool L2, bool AMS, int KIND, bool SCALE>
void update_erased(void* p, const void* g, void* m, void* s, void* s_max, int64_t begin,
                   int64_t end, const Options& o, double step_size, double sqrt_bc2) {
  using T = typename Math<P>::T;
  update_range<P, L2, AMS, KIND, SCALE>(static_cast<P*>(p), static_cast<const P*>(g),
                                        static_cast<T*>(m), static_cast<T*>(s),
                                        static_cast<T*>(s_max), begin, end, o, step_size,
                                        sqrt_bc2);
}

template <typename P, bool L2, bool AMS, bool SCALE>
Fn pick_kind(int kind) {
  switch (kind) {
    case kAdaptive: return update_erased<P, L2, AMS, kAdaptive, SCALE>;
    case kMomentum: return update_erased<P, L2, AMS, kMomentum, SCALE>;
    default: return update_erased<P, L2, AMS, kNoStep, SCALE>;
  }
}

template <typename P, bool L2, bool AMS>
Fn pick_scale(bool scale, int kind) {
  return scale ? pick_kind<P, L2, AMS, true>(kind) : pick_kind<P, L2, AMS, false>(kind);
}

template <typename P>
Fn pick_flags(bool l2, bool ams, bool scale, int kind) {
  if (l2) return ams ? pick_scale<P, true, true>(scale, kind) : pick_scale<P, true, false>(scale, kind);
  return ams ? pick_scale<P, false, true>(scale, kind) : pick_scale<P, false, false>(scale, kind);
}

Fn pick(int dtype, bool l2, bool ams, bool scale, int kind) {
  switch (dtype) {
    case 0: return pick_flags<float>(l2, ams, scale, kind);
    case 1: return pick_flags<double>(l2, ams, scale, kind);
    case 2: return pick_flags<BF16>(l2, ams, scale, kind);
    case 3: return pick_flags<F16>(l2, ams, scale, kind);
    default: return nullptr;
  }
}

struct alignas(64) Cursor {  // the next chunk of a thread's block, on a cache line of its own
  std::atomic<int64_t> next{0};
  int64_t end = 0;
};

constexpr int64_t kChunk = 1 << 15;         // elements per work item
constexpr int64_t kMinPerThread = 1 << 16;  // elements per thread, at least

}  // namespace

extern "C" {

int adabelief_abi_version() { return 2; }

int adabelief_openmp() {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

// Adds 1 to each step counter (float32, or float64 when step_is_double) and writes the new values
// to out.
void adabelief_increment_steps(int64_t n, void* const* steps, int step_is_double, double* out) {
  for (int64_t i = 0; i < n; ++i) {
    if (step_is_double) {
      double* t = static_cast<double*>(steps[i]);
      *t = *t + 1.0;
      out[i] = *t;
    } else {
      float* t = static_cast<float*>(steps[i]);
      *t = *t + 1.0f;
      out[i] = *t;
    }
  }
}

// One step of n tensors of one dtype (0 float32, 1 float64, 2 bfloat16, 3 float16; the state is
// float32 for the 16-bit ones). options: beta1, beta2, eps, decay factor, L2 coefficient, grad
// scale, sign. kind[i]: 0 adaptive, 1 SGD with momentum, 2 no change to p. Returns 0, or 1 for an
// unknown dtype.
int adabelief_update(int dtype, int64_t n, void* const* p, void* const* g, void* const* m,
                     void* const* s, void* const* s_max, const int64_t* numel,
                     const double* step_size, const double* sqrt_bc2, const int8_t* kind,
                     const double* options, int l2, int amsgrad, int scale, int num_threads) {
  if (pick(dtype, false, false, false, 0) == nullptr) return 1;
  const Options o{options[0], options[1], options[2], options[3],
                  options[4], options[5], options[6]};
  std::vector<int64_t> work;  // (tensor, first element) of each chunk
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    total += numel[i];
    for (int64_t b = 0; b < numel[i]; b += kChunk) {
      work.push_back(i);
      work.push_back(b);
    }
  }
  const int64_t chunks = int64_t(work.size() / 2);
  // A thread only where it gets enough elements to pay for waking it.
  if (int64_t(num_threads) > total / kMinPerThread) num_threads = int(total / kMinPerThread);
  if (num_threads < 1) num_threads = 1;
  auto run = [&](int64_t c) {
    const int64_t i = work[2 * c], begin = work[2 * c + 1];
    const int64_t end = begin + kChunk < numel[i] ? begin + kChunk : numel[i];
    const Fn fn = pick(dtype, l2 != 0, amsgrad != 0, scale != 0, kind[i]);
    fn(p[i], g[i], m[i], s[i], amsgrad ? s_max[i] : nullptr, begin, end, o, step_size[i],
       sqrt_bc2[i]);
  };
  // Each thread streams through its own contiguous block of chunks, then takes the chunks
  // left in the other blocks (a thread that the OS delays does not hold the others up).
  std::vector<Cursor> cursors(static_cast<size_t>(num_threads));
  for (int b = 0; b < num_threads; ++b) {
    cursors[b].next.store(chunks * b / num_threads, std::memory_order_relaxed);
    cursors[b].end = chunks * (b + 1) / num_threads;
  }
  auto work_from = [&](int me) {
    for (int k = 0; k < num_threads; ++k) {
      Cursor& cursor = cursors[size_t((me + k) % num_threads)];
      for (;;) {
        const int64_t c = cursor.next.fetch_add(1, std::memory_order_relaxed);
        if (c >= cursor.end) break;
        run(c);
      }
    }
  };
#ifdef _OPENMP
  if (num_threads > 1) {
#pragma omp parallel num_threads(num_threads)
    work_from(omp_get_thread_num() % num_threads);
    return 0;
  }
#endif
  work_from(0);
  return 0;
}

}  // extern "C"
"""

_ABI_VERSION = 2
#: Flag sets tried in order: the first that compiles and loads is cached.
_FLAG_SETS: tuple[tuple[str, ...], ...] = (
    ("-march=native", "-fopenmp"),
    ("-fopenmp",),
    ("-march=native",),
    (),
)
_COMMON_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=off")

#: dtype of the parameter -> (kernel dtype code, state dtype, elements per parameter element).
_CPU_DTYPES: dict[torch.dtype, tuple[int, torch.dtype, int]] = {
    torch.float32: (0, torch.float32, 1),
    torch.float64: (1, torch.float64, 1),
    torch.bfloat16: (2, torch.float32, 1),
    torch.float16: (3, torch.float32, 1),
    torch.complex64: (0, torch.complex64, 2),
    torch.complex128: (1, torch.complex128, 2),
}

#: params, grads, exp_avgs, exp_avg_vars, max_exp_avg_vars, state_steps
_Lists = tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]


#: Tensor types the kernels take as they are (DTensors are unwrapped to their local shards).
_PLAIN_TYPES = frozenset({Tensor, torch.nn.Parameter})
#: "kernel" (the C++ kernel) or "compiled" (the torch.compile path, as on CUDA) for CPU tensors.
_CPU_BACKEND = "kernel"


class _Kernel:
    """The loaded shared library with its argument types declared."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        if lib.adabelief_abi_version() != _ABI_VERSION:
            raise OSError(f"{path} has ABI version {lib.adabelief_abi_version()}")
        pointer, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.adabelief_increment_steps.argtypes = [i64, pointer, c_int, pointer]
        lib.adabelief_increment_steps.restype = None
        lib.adabelief_update.argtypes = [c_int, i64, *([pointer] * 10), c_int, c_int, c_int, c_int]
        lib.adabelief_update.restype = c_int
        self.path = path
        self.openmp = bool(lib.adabelief_openmp())
        self.increment_steps = lib.adabelief_increment_steps
        self.update = lib.adabelief_update


_lock = threading.Lock()
_kernel: _Kernel | None = None
_kernel_error: str | None = None  # why the kernel is unavailable, once known
_warned = False
#: How many times this process compiled the CPU kernel (0 when it came from the disk cache).
builds = 0


def cache_dir() -> Path:
    """Where the compiled CPU kernel is kept: ``$ADABELIEF_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/adabelief`` (``~/.cache/adabelief``)."""
    if os.environ.get("ADABELIEF_CACHE_DIR"):
        return Path(os.environ["ADABELIEF_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "adabelief"


def _compiler() -> str | None:
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


def _library_path(compiler: str, flags: Sequence[str]) -> Path:
    stat = os.stat(compiler)
    key = "\0".join(
        [
            _CPP_SOURCE,
            compiler,
            str(stat.st_size),
            str(stat.st_mtime_ns),
            " ".join(flags),
            _machine_fingerprint(),
            sys.platform,
        ]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return cache_dir() / f"adabelief_fused_{digest}.so"


class _CompileError(OSError):
    """The compiler rejected the source or the flags (not a timeout or a full disk)."""


def _build(compiler: str, flags: Sequence[str], target: Path) -> None:
    """Compile the kernel into ``target`` (atomically: concurrent processes may race)."""
    global builds
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        source = Path(tmp) / "adabelief_fused.cpp"
        source.write_text(_CPP_SOURCE)
        output = Path(tmp) / target.name
        command = [compiler, *_COMMON_FLAGS, *flags, str(source), "-o", str(output)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            message = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise _CompileError(f"{' '.join(command)} failed: {' '.join(message)}")
        os.replace(output, target)
    builds += 1


def _load_kernel() -> _Kernel:
    """Load a cached library, else build one, trying :data:`_FLAG_SETS` in order. A flag set
    the compiler rejects leaves a ``.failed`` note beside the library, so later processes do
    not try it again (the key changes with the compiler, the source and the CPU; delete the
    cache directory to retry)."""
    if os.environ.get("ADABELIEF_DISABLE_FUSED", "") not in ("", "0"):
        raise OSError("disabled by ADABELIEF_DISABLE_FUSED")
    if sys.platform == "win32":
        raise OSError("the CPU kernel is not built on Windows")
    compiler = _compiler()
    if compiler is None:
        raise OSError("no C++ compiler found (set CXX, or install g++ or clang++)")
    paths = [_library_path(compiler, flags) for flags in _FLAG_SETS]
    errors = []
    for path in paths:  # cached libraries first: no compilation at all
        if path.exists():
            try:
                return _Kernel(path)
            except (OSError, AttributeError) as error:
                errors.append(str(error))
    for flags, path in zip(_FLAG_SETS, paths, strict=True):
        failed = path.with_suffix(".failed")
        if path.exists() or failed.exists():
            if failed.exists():
                errors.append(failed.read_text(errors="replace"))
            continue
        try:
            _build(compiler, flags, path)
            return _Kernel(path)
        except (OSError, subprocess.SubprocessError, AttributeError) as error:
            errors.append(str(error))
            if isinstance(error, _CompileError):
                with contextlib.suppress(OSError):
                    failed.write_text(str(error))
    raise OSError(errors[0] if errors else "no flag set")


def cpu_kernel() -> _Kernel | None:
    """The CPU kernel, loaded (or built) on first use and cached for the process; None when it
    cannot be built (the reason is kept for the fallback warning)."""
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


def cpu_kernel_available() -> bool:
    """Whether the fused CPU kernel can run in this process (builds it on first call)."""
    return cpu_kernel() is not None


def _warn_fallback(reason: str) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"adabelief: the fused kernel is unavailable ({reason}); fused=True runs a slower "
        "unfused path instead (this warning is shown once)",
        FusedFallbackWarning,
        stacklevel=4,
    )


def check_available() -> None:
    """Called when an optimizer is built with ``fused=True``: never raises, since every device
    has a path; warns now (once) when no C++ compiler can build the CPU kernel. Costs a PATH
    lookup; the kernel itself is loaded or built at the first CPU step."""
    if _kernel_error is not None:
        _warn_fallback(_kernel_error)
    elif _kernel is None and _compiler() is None:
        _warn_fallback("no C++ compiler found (set CXX, or install g++ or clang++)")


#: Groups below this many elements stay on the unfused default path (see BENCHMARKS.md).
DEFAULT_MIN_NUMEL = 0


def is_default_for(params: list[Tensor], group: Mapping[str, Any]) -> bool:
    """Whether the default path (fused=None, foreach=None) should use the fused kernel: CPU
    tensors of supported dtypes, plain tensors (not DTensor or other subclasses), outside
    ``torch.compile``, not differentiable, and a kernel that builds here with OpenMP. The fused
    kernel was faster than foreach and single-tensor at every size measured (9K to 98M
    parameters, see BENCHMARKS.md), so there is no size threshold (:data:`DEFAULT_MIN_NUMEL`).
    CUDA keeps the foreach default until the compiled path is measured on a GPU. The first
    call may compile the kernel (about 2 s, once per machine)."""
    if group.get("differentiable") or torch.compiler.is_compiling() or not params:
        return False
    for p in params:
        if not p.is_cpu or p.dtype not in _CPU_DTYPES or type(p) not in _PLAIN_TYPES:
            return False  # tensor subclasses (DTensor, ...) keep the unfused default
    if DEFAULT_MIN_NUMEL and sum(p.numel() for p in params) < DEFAULT_MIN_NUMEL:
        return False
    kernel = cpu_kernel()
    # A kernel built without OpenMP (e.g. Apple clang) is single-threaded: unmeasured against
    # torch's multi-threaded kernels, so not the default there.
    return kernel is not None and (kernel.openmp or torch.get_num_threads() == 1)


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
    """One fused step of every tensor, in place.

    ``grad_scale`` (GradScaler's scale) divides the gradients inside the kernel; when
    ``found_inf`` is nonzero nothing changes, step counts included (as ``torch.optim.Adam``
    with ``fused=True`` for GradScaler's 0/1 flag). ``max_exp_avg_vars`` is empty unless
    ``hp.amsgrad``.
    """
    if not params:
        return
    lists: _Lists = (params, grads, exp_avgs, exp_avg_vars, max_exp_avg_vars, state_steps)
    if torch.compiler.is_compiling():
        # Traced into the caller's graph: the compiler fuses the tensor update anyway.
        tensor_group_update(*lists, hp, grad_scale=grad_scale, found_inf=found_inf)
        return
    if not all(type(t) in _PLAIN_TYPES for t in params) or not all(
        type(t) in _PLAIN_TYPES for t in grads
    ):
        local = _local_lists(lists)
        if local is None:  # another tensor subclass: its own dispatch, on the tensor update
            tensor_group_update(*lists, hp, grad_scale=grad_scale, found_inf=found_inf)
            return
        lists = local
    params = lists[0]
    devices = {p.device for p in params}
    if len(devices) > 1:
        for device in devices:
            index = [i for i, p in enumerate(params) if p.device == device]
            part = _pick_lists(lists, index)
            fused_step(
                part[0],
                part[1],
                part[2],
                part[3],
                part[4],
                part[5],
                hp,
                grad_scale=grad_scale,
                found_inf=found_inf,
            )
        return
    if params[0].device.type == "cpu" and _CPU_BACKEND == "kernel":
        kernel = cpu_kernel()
        if kernel is not None:
            _cpu_step(kernel, *lists, hp, grad_scale=grad_scale, found_inf=found_inf)
            return
        _warn_fallback(_kernel_error or "unknown error")
        _foreach_fallback(*lists, hp, grad_scale=grad_scale, found_inf=found_inf)
        return
    _compiled_step(*lists, hp, grad_scale=grad_scale, found_inf=found_inf)


def _pick_lists(lists: _Lists, index: list[int]) -> _Lists:
    p, g, m, s, s_max, steps = (_pick(column, index) if column else [] for column in lists)
    return p, g, m, s, s_max, steps


def _local_lists(lists: _Lists) -> _Lists | None:
    """The lists with each DTensor replaced by its local shard (``to_local()``, which shares its
    memory), or None when a tensor is another subclass or a shard's shape differs from its
    parameter's."""
    result = []
    for column in lists:
        local = []
        for t in column:
            if type(t) not in _PLAIN_TYPES:
                to_local = getattr(t, "to_local", None)
                if not callable(to_local):
                    return None
                t = to_local()
                if type(t) not in _PLAIN_TYPES:
                    return None
            local.append(t)
        result.append(local)
    shapes = [p.shape for p in result[0]]
    for column in result[1:5]:
        if column and [t.shape for t in column] != shapes:
            return None
    p, g, m, s, s_max, steps = result
    return p, g, m, s, s_max, steps


def _pick(tensors: list[Tensor], index: list[int]) -> list[Tensor]:
    return [tensors[i] for i in index]


# ---------------------------------------------------------------------------------------------
# CPU


def _addresses(tensors: Sequence[Tensor]) -> array:
    return array("Q", [t.data_ptr() for t in tensors])


def _cpu_step(
    kernel: _Kernel,
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
    """The CPU kernel over CPU tensors: step counts +1 (one call), scalars per distinct step
    count, then one kernel call per parameter dtype. One host read each of ``found_inf``,
    ``grad_scale`` and a tensor ``lr`` (free on the CPU)."""
    if found_inf is not None and float(found_inf) != 0.0:
        return  # GradScaler found inf/NaN: skip the step, counts included
    dtypes = {p.dtype for p in params}
    for dtype in dtypes:
        if dtype not in _CPU_DTYPES:
            raise TypeError(f"fused AdaBelief: unsupported parameter dtype {dtype}")
    lr = float(hp.lr)
    hp = hp._replace(lr=lr)
    n = len(params)

    # Step counts: +1 and read back in one call when they are all float32 (or all float64).
    new_steps = array("d", bytes(8 * n))
    step_dtypes = {t.dtype for t in state_steps}
    if len(step_dtypes) == 1 and step_dtypes <= {torch.float32, torch.float64}:
        if not all(t.device.type == "cpu" for t in state_steps):
            raise ValueError("fused CPU step: step counts must be on the CPU")
        step_addresses = _addresses(state_steps)
        kernel.increment_steps(
            n,
            step_addresses.buffer_info()[0],
            int(torch.float64 in step_dtypes),
            new_steps.buffer_info()[0],
        )
    else:
        for i, step_t in enumerate(state_steps):
            step_t += 1
            new_steps[i] = step_t.item()

    # Per-tensor scalars, computed once per distinct step count.
    cache: dict[float, tuple[float, float, int]] = {}
    for step in set(new_steps):
        cache[step] = _cpu_scalars(
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
    options = array(
        "d",
        [
            hp.beta1,
            hp.beta2,
            hp.eps,
            float(hp.decay_factor()) if decoupled else 1.0,
            hp.weight_decay,
            float(grad_scale) if grad_scale is not None else 1.0,
            -1.0 if hp.maximize else 1.0,
        ],
    )
    threads = torch.get_num_threads()
    for dtype in dtypes:
        index = (
            list(range(n))
            if len(dtypes) == 1
            else [i for i in range(n) if params[i].dtype == dtype]
        )
        code, state_dtype, width = _CPU_DTYPES[dtype]
        tensors = [
            _pick(params, index),
            _pick(grads, index),
            _pick(exp_avgs, index),
            _pick(exp_avg_vars, index),
            _pick(max_exp_avg_vars, index) if hp.amsgrad else [],
        ]
        write_back = _dense_operands(tensors, dtype, state_dtype)
        scalars = [cache[new_steps[i]] for i in index]
        # The arrays must outlive the call: keep them referenced until it returns.
        arrays = [_addresses(ts) for ts in tensors]
        arrays += [
            array("q", [p.numel() * width for p in tensors[0]]),
            array("d", [s[0] for s in scalars]),
            array("d", [s[1] for s in scalars]),
            array("b", [s[2] for s in scalars]),
            options,
        ]
        status = kernel.update(
            code,
            len(index),
            *(a.buffer_info()[0] if len(a) else None for a in arrays),
            int(l2),
            int(hp.amsgrad),
            int(grad_scale is not None),
            threads,
        )
        if status != 0:
            raise RuntimeError(f"fused AdaBelief kernel failed with status {status}")
        for original, copy in write_back:
            original.copy_(copy)


def _cpu_scalars(scalars: StepScalars) -> tuple[float, float, int]:
    """(step_size, sqrt_bc2, kind) with kind 0 adaptive, 1 SGD with momentum, 2 no step."""
    step_size, sqrt_bc2, adaptive = (float(scalars[0]), float(scalars[1]), bool(scalars[2]))
    kind = 0 if adaptive else (1 if step_size != 0 else 2)
    return step_size, sqrt_bc2, kind


def _dense_operands(
    tensors: list[list[Tensor]], dtype: torch.dtype, state_dtype: torch.dtype
) -> list[tuple[Tensor, Tensor]]:
    """Make every operand a contiguous tensor of the kernel's dtype, in place in ``tensors``;
    returns (original, working copy) pairs to copy back after the kernel (rare: a non-contiguous
    parameter or gradient, or state loaded in another dtype)."""
    write_back: list[tuple[Tensor, Tensor]] = []
    wanted = (dtype, dtype, state_dtype, state_dtype, state_dtype)
    for j, (column, want) in enumerate(zip(tensors, wanted, strict=True)):
        for i, t in enumerate(column):
            if t.dtype == want and t.is_contiguous():
                continue
            copy = t.to(dtype=want, memory_format=torch.contiguous_format, copy=True)
            column[i] = copy
            if j != 1:  # gradients are read only
                write_back.append((t, copy))
    return write_back


def _foreach_fallback(
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
    """The foreach path with GradScaler's arguments applied outside it (one host read)."""
    if found_inf is not None and float(found_inf) != 0.0:
        return
    if grad_scale is not None:
        grads = [g / grad_scale.to(g.device) for g in grads]
    foreach_step(
        params,
        grads,
        exp_avgs,
        exp_avg_vars,
        max_exp_avg_vars,
        state_steps,
        hp._replace(lr=float(hp.lr)),
        tensor_math=False,
    )


# ---------------------------------------------------------------------------------------------
# CUDA and other devices: the update in torch operations, compiled per group.


def belief_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_var: Tensor,
    max_exp_avg_var: Tensor | None,
    scalars: StepScalars,
    hp: Hyperparameters,
    grad_scale: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The per-element AdaBelief update, out of place: new (param, exp_avg, exp_avg_var,
    max_exp_avg_var) in the working dtype (float32 for 16-bit parameters). ``scalars`` are
    0-dim tensors (from the tensor branch of :func:`step_scalars`)."""
    work = param.float() if param.dtype in LOW_PRECISION_DTYPES else param
    grad = grad.float() if grad.dtype in LOW_PRECISION_DTYPES else grad
    if grad_scale is not None:
        grad = grad / grad_scale
    if hp.maximize:
        grad = -grad
    if hp.weight_decay != 0:
        if hp.weight_decouple:
            work = work * hp.decay_factor()
        else:
            grad = grad + hp.weight_decay * work
    avg = exp_avg * hp.beta1 + (1 - hp.beta1) * grad
    residual = grad - avg
    var = exp_avg_var * hp.beta2 + (1 - hp.beta2) * residual * residual + hp.eps
    belief = var
    new_max = None
    if max_exp_avg_var is not None:
        new_max = torch.maximum(max_exp_avg_var, var)
        belief = new_max
    step_size, sqrt_bc2, adaptive = scalars
    update = avg / (belief.sqrt() / sqrt_bc2 + hp.eps)
    if isinstance(adaptive, Tensor):
        update = torch.where(adaptive, update, avg)
    work = work - update * step_size
    return work, avg, var, new_max


def tensor_group_update(
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
    """The fused update in torch operations over a group, with every scalar a tensor on the
    device (no host synchronisation; ``hp.lr`` a float or a 0-dim tensor). With ``found_inf``
    nonzero every tensor keeps its value. Compiled by :func:`_compiled_step`; traced as is
    under ``torch.compile``."""
    skip = None if found_inf is None else found_inf != 0
    for i, param in enumerate(params):
        step_t = state_steps[i]
        new_step = step_t + 1
        scalars = step_scalars(
            new_step.to(torch.float64) if new_step.device.type != "mps" else new_step,
            hp.lr,
            hp.beta1,
            hp.beta2,
            rectify=hp.rectify,
            degenerated_to_sgd=hp.degenerated_to_sgd,
        )
        real = torch.is_complex(param)
        as_real: Callable[[Tensor], Tensor] = torch.view_as_real if real else (lambda t: t)
        old = [as_real(params[i]), as_real(exp_avgs[i]), as_real(exp_avg_vars[i])]
        old_max = as_real(max_exp_avg_vars[i]) if hp.amsgrad else None
        new = belief_update(
            old[0], as_real(grads[i]), old[1], old[2], old_max, scalars, hp, grad_scale
        )
        targets = [*old, step_t]
        values = [new[0], new[1], new[2], new_step]
        if old_max is not None and new[3] is not None:
            targets.append(old_max)
            values.append(new[3])
        for target, value in zip(targets, values, strict=True):
            if skip is not None:
                value = torch.where(skip, target, value.to(target.dtype))
            target.copy_(value)


_compiled: Callable[..., None] | None = None
_compile_error: str | None = None


def _compiled_step(
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
    """:func:`tensor_group_update` compiled (``dynamic=True, fullgraph=True``); the learning rate
    goes in as a 0-dim float64 tensor on the device so that a scheduler does not recompile."""
    global _compiled, _compile_error
    device = params[0].device
    lr = hp.lr
    if isinstance(lr, Tensor):
        lr = lr.to(device=device, dtype=torch.float64, non_blocking=True)
    else:
        lr = _lr_tensor(device).fill_(lr)
    hp = hp._replace(lr=lr)
    if grad_scale is not None:
        grad_scale = grad_scale.to(device, non_blocking=True)
    if found_inf is not None:
        found_inf = found_inf.to(device, non_blocking=True)
    lists = (params, grads, exp_avgs, exp_avg_vars, max_exp_avg_vars, state_steps)
    if _compiled is None and _compile_error is None:
        _compiled = torch.compile(tensor_group_update, dynamic=True, fullgraph=True)
    if _compiled is not None and _compile_error is None:
        try:
            # Each distinct group (length, dtypes, options) is one compiled variant.
            with torch._dynamo.config.patch(recompile_limit=64):
                _compiled(*lists, hp, grad_scale=grad_scale, found_inf=found_inf)
            return
        except (torch._dynamo.exc.TorchDynamoException, ImportError, OSError) as error:
            # The compiler is missing or fails (before anything ran): run the same code eagerly.
            _compile_error = f"torch.compile failed: {type(error).__name__}: {error}"
    _warn_fallback(_compile_error or "unknown error")
    tensor_group_update(*lists, hp, grad_scale=grad_scale, found_inf=found_inf)


_lr_tensors: dict[torch.device, Tensor] = {}


def _lr_tensor(device: torch.device) -> Tensor:
    if device not in _lr_tensors:
        _lr_tensors[device] = torch.zeros((), dtype=torch.float64, device=device)
    return _lr_tensors[device]
