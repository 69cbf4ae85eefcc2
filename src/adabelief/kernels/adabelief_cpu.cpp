// The fused AdaBelief step on the CPU: one parallel pass that reads and writes every element of
// a parameter, its gradient and its moments once, with no parameter-sized temporaries.
//
// The update is documented once, in docs/algorithm.md; adabelief/kernels/cpu.py builds this file
// (the file's bytes are the build-cache key) and calls adabelief_update through ctypes.
//
// The ABI is defined in one place, adabelief/kernels/cpu.py (CPU_ABI), which passes it here as
// macros: ADABELIEF_ABI_VERSION, the parameter dtype codes ADABELIEF_DTYPE_*, the state formats
// ADABELIEF_STATE_*, the step kinds ADABELIEF_KIND_* and the int8 block size.
//
// Arithmetic: operation for operation the reference (torch's vectorised CPU kernels):
// add(alpha=a) is fma(b, a, x), addcmul(value=v) is fma(v*b, c, x), addcdiv(value=v) is
// x + (v*b)/c; nothing else is contracted (-ffp-contract=off). std::sqrt is correctly rounded;
// torch's CPU sqrt is not always, so results differ from the single-tensor path by an ulp now and
// then. 16-bit parameters are widened to float32 and rounded back to nearest even, as copy_ does.
//
// Compressed moments (adabelief/compressed_state.py is the reference) use the same hashed dither
// as the reference, so a resumed run is bit-identical and needs no RNG state. They are decoded,
// updated and encoded a 256-element block at a time, through float32 buffers on the stack that
// stay in the L1 cache. On AVX2, with float32 and bfloat16 parameters, the update runs on
// 8-float lanes (belief_step is written once, over the lane type) and the buffers are mostly
// skipped: bfloat16 moments are stepped 16 elements at a time in registers
// (update_bf16_lanes); int8 blocks are decoded and updated in registers, and only the values to
// encode go through buffers, their block maxima taken on the way, since the codes need them
// first (update_int8_block). Where GCC vectorises a rounding loop poorly, an AVX2 loop does the
// same operations (namespace avx2). A build without AVX2 takes the portable loops, with the same
// results (tests/test_compressed_kernels.py checks both against the reference).

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#if !defined(ADABELIEF_ABI_VERSION) || !defined(ADABELIEF_DTYPE_FLOAT32) ||   \
    !defined(ADABELIEF_DTYPE_FLOAT64) || !defined(ADABELIEF_DTYPE_BFLOAT16) || \
    !defined(ADABELIEF_DTYPE_FLOAT16) || !defined(ADABELIEF_STATE_FP32) ||     \
    !defined(ADABELIEF_STATE_BF16) || !defined(ADABELIEF_STATE_INT8) ||        \
    !defined(ADABELIEF_KIND_ADAPTIVE) || !defined(ADABELIEF_KIND_MOMENTUM) ||  \
    !defined(ADABELIEF_KIND_NO_STEP) || !defined(ADABELIEF_INT8_BLOCK)
#error "build through adabelief/kernels/cpu.py, which defines the ABI macros"
#endif

namespace {

constexpr int kAdaptive = ADABELIEF_KIND_ADAPTIVE;
constexpr int kMomentum = ADABELIEF_KIND_MOMENTUM;
constexpr int kNoStep = ADABELIEF_KIND_NO_STEP;
constexpr int64_t kBlock = ADABELIEF_INT8_BLOCK;

struct BF16 { uint16_t bits; };
struct F16 { uint16_t bits; };

inline float from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// ---- parameter and gradient elements --------------------------------------------------------

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

// Round to nearest even; NaN becomes the canonical quiet NaN, as in c10::BFloat16.
inline uint16_t bf16_nearest(float v) {
  const uint32_t u = to_bits(v);
  return std::isnan(v) ? uint16_t(0x7fc0u) : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline void store(float* x, int64_t i, float v) { x[i] = v; }
inline void store(double* x, int64_t i, double v) { x[i] = v; }
inline void store(BF16* x, int64_t i, float v) { x[i].bits = bf16_nearest(v); }
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

// ---- the hashed dither of compressed_state.py ------------------------------------------------

// MurmurHash3's 32-bit finalizer.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85ebca6bu;
  x ^= x >> 13;
  x *= 0xc2b2ae35u;
  return x ^ (x >> 16);
}

// hash(value bits, step): step_key is (step * 0x9E3779B9) mod 2^32.
inline uint32_t value_hash(float v, uint32_t step_key) { return mix32(to_bits(v) ^ step_key); }

// Uniform in [0, 1) from the hash (compressed_state.uniform_dither).
inline float uniform_dither(float v, uint32_t step_key) {
  // Through int32 (the 24-bit value fits): AVX2 has no vector unsigned-to-float conversion.
  return float(int32_t(value_hash(v, step_key) & 0xffffffu)) * (1.0f / 16777216.0f);
}

// floor(scaled + dither), the stochastic rounding of compressed_state.encode.
inline float dithered_floor(float scaled, uint32_t step_key) {
  return std::floor(scaled + uniform_dither(scaled, step_key));
}

#if defined(__AVX2__)
// mix32 and dithered_floor on 8 lanes, for the AVX2 loops below (where the compiler's own
// vectorisation of the scalar loops is poor, those do the same operations: the same bits).
namespace avx2 {

inline __m256i mix32(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(int32_t(0x85ebca6bu)));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 13));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(int32_t(0xc2b2ae35u)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

// dithered_floor, then NaN -> 0.
inline __m256 dithered_floor_or_zero(__m256 scaled, __m256i step_key) {
  const __m256i hash = mix32(_mm256_xor_si256(_mm256_castps_si256(scaled), step_key));
  const __m256 dither =
      _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(hash, _mm256_set1_epi32(0xffffff))),
                    _mm256_set1_ps(1.0f / 16777216.0f));
  const __m256 code = _mm256_floor_ps(_mm256_add_ps(scaled, dither));
  return _mm256_and_ps(code, _mm256_cmp_ps(code, code, _CMP_ORD_Q));
}

}  // namespace avx2
#endif

template <typename P> struct Math { using T = float; };
template <> struct Math<double> { using T = double; };

struct Options {
  // gradient_factor: +-1/grad_scale (- to maximize), a power of two, so g * factor is exactly
  // (+-g) / grad_scale (the caller divides beforehand when the scale is not a power of two).
  double beta1, beta2, eps, decay, weight_decay, gradient_factor;
};

// ---- lanes: one element (float or double), or eight floats in an AVX2 register -------------

// The update is written once (belief_step) over a lane type V with IEEE-exact +, -, *, /, fma,
// sqrt and a NaN-propagating maximum: V = float or double in the portable loops (which GCC
// vectorises), V = F8 in the AVX2 loops of the compressed formats. The same operations give
// the same bits on every lane type.
inline float nan_max(float previous, float v) {
  return (previous > v || previous != previous) ? previous : v;  // NaN wins
}
inline double nan_max(double previous, double v) {
  return (previous > v || previous != previous) ? previous : v;
}
template <typename V> V broadcast(double x);
template <> inline float broadcast<float>(double x) { return float(x); }
template <> inline double broadcast<double>(double x) { return x; }

#if defined(__AVX2__)
struct F8 { __m256 v; };
inline F8 operator+(F8 a, F8 b) { return {_mm256_add_ps(a.v, b.v)}; }
inline F8 operator-(F8 a, F8 b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline F8 operator*(F8 a, F8 b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline F8 operator/(F8 a, F8 b) { return {_mm256_div_ps(a.v, b.v)}; }
inline F8 fma(F8 a, F8 b, F8 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline F8 sqrt(F8 a) { return {_mm256_sqrt_ps(a.v)}; }
inline F8 nan_max(F8 previous, F8 v) {
  const __m256 keep = _mm256_or_ps(_mm256_cmp_ps(previous.v, v.v, _CMP_GT_OQ),
                                   _mm256_cmp_ps(previous.v, previous.v, _CMP_UNORD_Q));
  return {_mm256_blendv_ps(v.v, previous.v, keep)};
}
template <> inline F8 broadcast<F8>(double x) { return {_mm256_set1_ps(float(x))}; }
#endif

using std::fma;
using std::sqrt;

// The step's coefficients in the lane type (each rounded from double once, as T(x)).
template <typename V> struct Coefficients {
  V beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, weight_decay, gradient_factor;
  V neg_step, bc2;
  Coefficients(const Options& o, double step_size, double sqrt_bc2)
      : beta1(broadcast<V>(o.beta1)), one_minus_beta1(broadcast<V>(1.0 - o.beta1)),
        beta2(broadcast<V>(o.beta2)), one_minus_beta2(broadcast<V>(1.0 - o.beta2)),
        eps(broadcast<V>(o.eps)), decay(broadcast<V>(o.decay)),
        weight_decay(broadcast<V>(o.weight_decay)),
        gradient_factor(broadcast<V>(o.gradient_factor)), neg_step(broadcast<V>(-step_size)),
        bc2(broadcast<V>(sqrt_bc2)) {}
};

// The per-element update (docs/algorithm.md), in place on the lanes of param, avg (exp_avg), var
// (exp_avg_var) and, with AMSGrad, max_var; grad is the raw gradient. For the adaptive kind,
// root receives the square root of the belief (var, or max_var with AMSGrad), which the int8
// encoder needs too.
template <bool L2, bool AMS, int KIND, typename V>
inline void belief_step(V& param, V grad, V& avg, V& var, V& max_var, V& root,
                        const Coefficients<V>& c) {
  grad = grad * c.gradient_factor;
  if (L2) {
    grad = fma(param, c.weight_decay, grad);
  } else {
    param = param * c.decay;  // exactly param when decay == 1
  }
  avg = avg * c.beta1;
  avg = fma(grad, c.one_minus_beta1, avg);
  const V residual = grad - avg;
  var = var * c.beta2;
  var = fma(c.one_minus_beta2 * residual, residual, var);
  var = var + c.eps;
  V belief = var;
  if (AMS) {
    max_var = nan_max(max_var, var);
    belief = max_var;
  }
  if (KIND == kAdaptive) {
    root = sqrt(belief);
    const V denom = root / c.bc2 + c.eps;
    param = param + (c.neg_step * avg) / denom;
  } else if (KIND == kMomentum) {
    param = fma(avg, c.neg_step, param);
  }
}

// belief_step over elements [begin, end): on the moments themselves for the fp32 format, on a
// block of decoded float32 moments for the compressed ones. With ROOTS (the adaptive kind only),
// belief_root receives the square roots of the belief.
template <typename P, bool L2, bool AMS, int KIND, bool ROOTS = false,
          typename T = typename Math<P>::T>
void update_range(P* __restrict p, const P* __restrict g, T* __restrict m, T* __restrict s,
                  T* __restrict s_max, int64_t begin, int64_t end, const Options& o,
                  double step_size, double sqrt_bc2, T* __restrict belief_root = nullptr) {
  static_assert(!ROOTS || KIND == kAdaptive, "only the adaptive step takes the square root");
  const Coefficients<T> c(o, step_size, sqrt_bc2);
  for (int64_t i = begin; i < end; ++i) {
    T param = load(p, i), avg = m[i], var = s[i];
    T max_var = AMS ? s_max[i] : T(0), root = T(0);
    belief_step<L2, AMS, KIND>(param, load(g, i), avg, var, max_var, root, c);
    if (AMS) s_max[i] = max_var;
    if (ROOTS) belief_root[i] = root;
    m[i] = avg;
    s[i] = var;
    store(p, i, param);
  }
}

// ---- bfloat16 moments (compressed_state.stochastic_round_to_bf16) ---------------------------

inline void decode_bf16(const uint16_t* bits, int64_t n, float* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = from_bits(uint32_t(bits[j]) << 16);
}

// Stochastic rounding to bfloat16 of a value's bits: add a hashed 16-bit dither, truncate.
inline uint32_t stochastic_bf16(uint32_t u, uint32_t step_key) {
  return (u + (mix32(u ^ step_key) & 0xffffu)) >> 16;
}

inline bool non_finite_bf16(uint32_t bits) { return (bits & 0x7f80u) == 0x7f80u; }

// A non-finite stochastic result (of an infinite or NaN value, or of one that rounds past the
// largest bfloat16) takes the nearest-even rounding instead. Those are rare, so the vectorised
// loops only note that a group has one, and this redoes the group.
inline void redo_non_finite(const float* values, int64_t n, uint16_t* bits) {
  for (int64_t k = 0; k < n; ++k) {
    if (non_finite_bf16(bits[k])) bits[k] = bf16_nearest(values[k]);
  }
}

#if defined(__AVX2__)
namespace avx2 {

inline __m256 widen_bf16(const void* bits) {
  const __m128i half = _mm_loadu_si128(static_cast<const __m128i*>(bits));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

// stochastic_bf16 on 8 lanes: the result in the low 16 bits of each 32-bit lane.
inline __m256i stochastic_bf16(__m256 values, __m256i step_key) {
  const __m256i u = _mm256_castps_si256(values);
  const __m256i dither =
      _mm256_and_si256(mix32(_mm256_xor_si256(u, step_key)), _mm256_set1_epi32(0xffff));
  return _mm256_srli_epi32(_mm256_add_epi32(u, dither), 16);
}

// Two vectors of 16-bit results in 32-bit lanes, packed in element order: a's 8, then b's 8.
inline __m256i pack16(__m256i a, __m256i b) {
  // packus interleaves the two by 128-bit lane; permute4x64 puts them in order.
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xd8);
}

// All ones in the 16-bit lanes that hold a non-finite bfloat16.
inline __m256i non_finite16(__m256i packed) {
  const __m256i exponent = _mm256_set1_epi16(0x7f80);
  return _mm256_cmpeq_epi16(_mm256_and_si256(packed, exponent), exponent);
}

// stochastic_bf16 of 16 values into bits; returns the non_finite16 mask (for redo16).
inline __m256i round16(const F8 (&values)[2], __m256i step_key, uint16_t* bits) {
  const __m256i packed =
      pack16(stochastic_bf16(values[0].v, step_key), stochastic_bf16(values[1].v, step_key));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(bits), packed);
  return non_finite16(packed);
}

inline void redo16(const F8 (&values)[2], uint16_t* bits) {
  float spilled[16];
  _mm256_storeu_ps(spilled, values[0].v);
  _mm256_storeu_ps(spilled + 8, values[1].v);
  redo_non_finite(spilled, 16, bits);
}

}  // namespace avx2
#endif

inline void encode_bf16(const float* values, int64_t n, uint32_t step_key, uint16_t* bits) {
  uint32_t non_finite = 0;
  int64_t j = 0;
#if defined(__AVX2__)
  {
    const __m256i key = _mm256_set1_epi32(int32_t(step_key));
    __m256i flags = _mm256_setzero_si256();
    for (; j + 16 <= n; j += 16) {
      const F8 loaded[2] = {{_mm256_loadu_ps(values + j)}, {_mm256_loadu_ps(values + j + 8)}};
      flags = _mm256_or_si256(flags, avx2::round16(loaded, key, bits + j));
    }
    non_finite = uint32_t(!_mm256_testz_si256(flags, flags));
  }
#endif
  for (; j < n; ++j) {
    const uint32_t rounded = stochastic_bf16(to_bits(values[j]), step_key);
    non_finite |= uint32_t(non_finite_bf16(rounded));
    bits[j] = uint16_t(rounded);
  }
  if (non_finite != 0) redo_non_finite(values, n, bits);
}

// ---- block-wise int8 (compressed_state.decode / encode_) -------------------------------------

// exp_avg: signed codes, value = code * (absmax / 127).
inline void decode_signed(const int8_t* codes, float absmax, int64_t n, float* out) {
  const float step = absmax / 127.0f;
  for (int64_t j = 0; j < n; ++j) out[j] = float(codes[j]) * step;
}

// exp_avg_var and its maximum: unsigned codes of the square root, value = (code * rootmax/255)^2.
inline void decode_root(const uint8_t* codes, float rootmax, int64_t n, float* out) {
  const float step = rootmax / 255.0f;
  for (int64_t j = 0; j < n; ++j) {
    const float root = float(codes[j]) * step;
    out[j] = root * root;
  }
}

// 1 / x * top, rounded twice, as torch evaluates ``top / tensor`` (reciprocal, then multiply).
inline float inverse_scale(float block_max, float top) {
  return block_max > 0.0f ? (1.0f / block_max) * top : 0.0f;
}

// The largest finite magnitude of a block (0 if none), as compressed_state.encode: inf and NaN
// are left out, so that one non-finite element (an inf gradient without GradScaler) cannot make
// the scale of its whole block inf or NaN; its own code is the clamp (+-127 or 255 for +-inf, 0
// for NaN) and the other elements keep theirs. For non-negative floats the order of the bit
// patterns is the order of the values, and the non-finite ones are those from infinity's up, so
// an integer maximum (which vectorises) gives it.
inline uint32_t finite_magnitude(float value) {
  const uint32_t magnitude = to_bits(value) & 0x7fffffffu;
  return magnitude < 0x7f800000u ? magnitude : 0u;
}

inline float block_absmax(const float* values, int64_t n) {
  uint32_t largest = 0;
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t magnitude = finite_magnitude(values[j]);
    largest = magnitude > largest ? magnitude : largest;
  }
  return from_bits(largest);
}

// The code of one element, for a block scaled by ``inv`` (code = clamp(floor(x * inv + dither)),
// NaN -> 0; the unsigned codes of a positive value are at least 1, so a belief never becomes 0).
inline int8_t signed_code(float value, float inv, uint32_t step_key) {
  float code = dithered_floor(value * inv, step_key);
  code = code < -127.0f ? -127.0f : code;
  code = code > 127.0f ? 127.0f : code;
  return int8_t(int32_t(code == code ? code : 0.0f));  // through int32: vectorises
}

inline uint8_t root_code(float root, float inv, uint32_t step_key) {
  const float scaled = root * inv;
  float code = dithered_floor(scaled, step_key);
  code = code < 0.0f ? 0.0f : code;
  code = code > 255.0f ? 255.0f : code;
  const float lowest = scaled > 0.0f ? 1.0f : 0.0f;
  code = code < lowest ? lowest : code;
  return uint8_t(int32_t(code == code ? code : 0.0f));
}

#if defined(__AVX2__)
// signed_code and root_code on 32 elements at a time, with the same operations: the compiler
// vectorises the functions above, but not their NaN-safe clamps into max/min instructions, and
// the quantisation is most of an int8 step. NaN becomes 0 first, so max/min see no NaN.
namespace avx2 {

// The leading multiple of 32 of n >= 0 elements, which block_codes takes (the rest: the scalar
// loops). Written so that the compiler sees 0 <= result <= n.
inline int64_t vector_part(int64_t n) { return n & ~int64_t(31); }

// The codes of the first ``n`` elements (a multiple of 32: see vector_part) scaled by ``inv``.
// SIGNED: exp_avg's, clamped to [-127, 127]; else the roots', clamped to [lowest, 255].
template <bool SIGNED, typename Code>
inline void block_codes(const float* values, int64_t n, float inv, uint32_t step_key,
                        Code* codes) {
  const __m256i key = _mm256_set1_epi32(int32_t(step_key));
  const __m256 scale = _mm256_set1_ps(inv), one = _mm256_set1_ps(1.0f);
  const __m256 hi = _mm256_set1_ps(SIGNED ? 127.0f : 255.0f), lo = _mm256_set1_ps(-127.0f);
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    __m256i q[4];
    for (int k = 0; k < 4; ++k) {
      const __m256 scaled = _mm256_mul_ps(_mm256_loadu_ps(values + j + 8 * k), scale);
      const __m256 code = dithered_floor_or_zero(scaled, key);
      const __m256 lowest =
          SIGNED ? lo : _mm256_and_ps(_mm256_cmp_ps(scaled, _mm256_setzero_ps(), _CMP_GT_OQ), one);
      q[k] = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(code, lowest), hi));
    }
    // Saturating packs of in-range values: int32 -> 16 -> 8 bits, then back in element order.
    const __m256i packed =
        SIGNED ? _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]))
               : _mm256_packus_epi16(_mm256_packus_epi32(q[0], q[1]),
                                     _mm256_packus_epi32(q[2], q[3]));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + j),
                        _mm256_permutevar8x32_epi32(packed, order));
  }
}

}  // namespace avx2
#endif

// sqrt(max(v, 0)) (NaN stays NaN), correctly rounded as the reference's; returns roots.
inline const float* square_roots(const float* values, int64_t n, float* roots) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = values[j];
    roots[j] = std::sqrt(v > 0.0f || v != v ? v : 0.0f);
  }
  return roots;
}

// The codes of a block whose block_absmax is block_max, which is stored to *scale as the block's
// scale: exp_avg's signed codes (SIGNED), or the unsigned codes of the roots of exp_avg_var or of
// its maximum (their square_roots: the codes are of the roots).
template <bool SIGNED, typename Code>
inline void encode_codes(const float* values, int64_t n, float block_max, uint32_t step_key,
                         Code* codes, float* scale) {
  *scale = block_max;
  const float inv = inverse_scale(block_max, SIGNED ? 127.0f : 255.0f);
  int64_t j = 0;
#if defined(__AVX2__)
  j = avx2::vector_part(n);
  avx2::block_codes<SIGNED>(values, j, inv, step_key, codes);
#endif
  for (; j < n; ++j) {
    if constexpr (SIGNED) {
      codes[j] = signed_code(values[j], inv, step_key);
    } else {
      codes[j] = root_code(values[j], inv, step_key);
    }
  }
}

// One tensor's pointers for one call.
struct Operands {
  void* p;
  const void* g;
  void* m;
  void* s;
  void* s_max;
  float* m_scale;  // int8 only: one absmax per block
  float* s_scale;
  float* s_max_scale;
  uint32_t step_key;
};

// The compressed formats, up to kBlock elements at a time (for int8, b is a multiple of kBlock):
// decode the moments into float32 buffers on the stack, update, encode. Each of the three loops
// is short and vectorises; the buffers stay in the L1 cache.
template <int FORMAT, bool AMS>
void decode_block(const Operands& t, int64_t b, int64_t n, float* m, float* s, float* s_max) {
  if constexpr (FORMAT == ADABELIEF_STATE_BF16) {
    decode_bf16(static_cast<const uint16_t*>(t.m) + b, n, m);
    decode_bf16(static_cast<const uint16_t*>(t.s) + b, n, s);
    if (AMS) decode_bf16(static_cast<const uint16_t*>(t.s_max) + b, n, s_max);
  } else {
    const int64_t block = b / kBlock;
    decode_signed(static_cast<const int8_t*>(t.m) + b, t.m_scale[block], n, m);
    decode_root(static_cast<const uint8_t*>(t.s) + b, t.s_scale[block], n, s);
    if (AMS) decode_root(static_cast<const uint8_t*>(t.s_max) + b, t.s_max_scale[block], n, s_max);
  }
}

// ``belief_root``: with ROOTS, the square roots of the belief that the update took (int8 only):
// those of exp_avg_var, or with AMSGrad of its maximum, which need not be taken again.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push  // GCC 12 at -O1 cannot see that square_roots fills ``roots``
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
template <int FORMAT, bool AMS, bool ROOTS>
void encode_block(const Operands& t, int64_t b, int64_t n, const float* m, const float* s,
                  const float* s_max, const float* belief_root) {
  if constexpr (FORMAT == ADABELIEF_STATE_BF16) {
    encode_bf16(m, n, t.step_key, static_cast<uint16_t*>(t.m) + b);
    encode_bf16(s, n, t.step_key, static_cast<uint16_t*>(t.s) + b);
    if (AMS) encode_bf16(s_max, n, t.step_key, static_cast<uint16_t*>(t.s_max) + b);
  } else {
    const int64_t block = b / kBlock;
    float roots[kBlock];
    encode_codes<true>(m, n, block_absmax(m, n), t.step_key, static_cast<int8_t*>(t.m) + b,
                       t.m_scale + block);
    const float* s_roots = !ROOTS || AMS ? square_roots(s, n, roots) : belief_root;
    encode_codes<false>(s_roots, n, block_absmax(s_roots, n), t.step_key,
                        static_cast<uint8_t*>(t.s) + b, t.s_scale + block);
    if (AMS) {
      const float* max_roots = ROOTS ? belief_root : square_roots(s_max, n, roots);
      encode_codes<false>(max_roots, n, block_absmax(max_roots, n), t.step_key,
                          static_cast<uint8_t*>(t.s_max) + b, t.s_max_scale + block);
    }
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#if defined(__AVX2__)
namespace avx2 {

inline F8 load8(const float* x) { return {_mm256_loadu_ps(x)}; }
inline F8 load8(const BF16* x) { return {widen_bf16(x)}; }
inline void store8(float* x, F8 v) { _mm256_storeu_ps(x, v.v); }
// bf16_nearest on 8 lanes.
inline void store8(BF16* x, F8 v) {
  const __m256i u = _mm256_castps_si256(v.v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(
      _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v.v, v.v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
  const __m128i packed =
      _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(x), packed);
}

// The bfloat16 format with float32 or bfloat16 parameters, 16 elements at a time: the moments
// are widened, updated and rounded in registers (no buffers), and each moment's 16 results are
// packed into one store. Returns where it stopped: the last (end - begin) mod 16 elements are
// the caller's.
template <typename P, bool L2, bool AMS, int KIND>
int64_t update_bf16_lanes(const Operands& t, int64_t begin, int64_t end,
                          const Coefficients<F8>& c) {
  P* p = static_cast<P*>(t.p);
  const P* g = static_cast<const P*>(t.g);
  uint16_t* m = static_cast<uint16_t*>(t.m);
  uint16_t* s = static_cast<uint16_t*>(t.s);
  uint16_t* s_max = static_cast<uint16_t*>(t.s_max);
  const __m256i key = _mm256_set1_epi32(int32_t(t.step_key));
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    F8 avg[2], var[2], max_var[2];
    for (int k = 0; k < 2; ++k) {
      const int64_t j = i + 8 * k;
      F8 param = load8(p + j), root{_mm256_setzero_ps()};
      avg[k] = F8{widen_bf16(m + j)};
      var[k] = F8{widen_bf16(s + j)};
      max_var[k] = F8{AMS ? widen_bf16(s_max + j) : _mm256_setzero_ps()};
      belief_step<L2, AMS, KIND>(param, load8(g + j), avg[k], var[k], max_var[k], root, c);
      store8(p + j, param);
    }
    __m256i flags = _mm256_or_si256(round16(avg, key, m + i), round16(var, key, s + i));
    if (AMS) flags = _mm256_or_si256(flags, round16(max_var, key, s_max + i));
    if (!_mm256_testz_si256(flags, flags)) {
      redo16(avg, m + i);
      redo16(var, s + i);
      if (AMS) redo16(max_var, s_max + i);
    }
  }
  return i;
}

inline __m256 widen_codes(const int8_t* codes) {
  const __m128i eight = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight));
}
inline __m256 widen_codes(const uint8_t* codes) {
  const __m128i eight = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes));
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(eight));
}

// block_absmax of values stored to out, 8 at a time: the running maximum of the bits of the
// finite magnitudes (finite_magnitude: inf and NaN count as 0).
inline __m256i store_and_max(float* out, F8 values, __m256i running) {
  _mm256_storeu_ps(out, values.v);
  const __m256i magnitude =
      _mm256_and_si256(_mm256_castps_si256(values.v), _mm256_set1_epi32(0x7fffffff));
  const __m256i finite = _mm256_cmpgt_epi32(_mm256_set1_epi32(0x7f800000), magnitude);
  return _mm256_max_epu32(running, _mm256_and_si256(magnitude, finite));
}

inline float largest(__m256i running) {
  __m128i m = _mm_max_epu32(_mm256_castsi256_si128(running), _mm256_extracti128_si256(running, 1));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4e));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xb1));
  return from_bits(uint32_t(_mm_cvtsi128_si32(m)));
}

// square_roots on 8 lanes.
inline F8 square_roots(F8 v) {
  const __m256 keep = _mm256_or_ps(_mm256_cmp_ps(v.v, _mm256_setzero_ps(), _CMP_GT_OQ),
                                   _mm256_cmp_ps(v.v, v.v, _CMP_UNORD_Q));
  return {_mm256_sqrt_ps(_mm256_and_ps(v.v, keep))};
}

// The int8 format with float32 or bfloat16 parameters, one whole block at b: the codes are
// decoded and the block updated in registers; the new exp_avg and the roots to be coded go to
// L1 buffers, their block maxima taken on the way, and are encoded from there (the codes need
// the block's maxima first).
template <typename P, bool L2, bool AMS, int KIND>
void update_int8_block(const Operands& t, int64_t b, const Coefficients<F8>& c) {
  P* p = static_cast<P*>(t.p) + b;
  const P* g = static_cast<const P*>(t.g) + b;
  const int8_t* m_codes = static_cast<const int8_t*>(t.m) + b;
  const uint8_t* s_codes = static_cast<const uint8_t*>(t.s) + b;
  const uint8_t* max_codes = AMS ? static_cast<const uint8_t*>(t.s_max) + b : nullptr;
  const int64_t block = b / kBlock;
  // decode_signed's and decode_root's steps
  const F8 m_step{_mm256_set1_ps(t.m_scale[block] / 127.0f)};
  const F8 s_step{_mm256_set1_ps(t.s_scale[block] / 255.0f)};
  const F8 max_step{_mm256_set1_ps(AMS ? t.s_max_scale[block] / 255.0f : 0.0f)};
  float avgs[kBlock], var_roots[kBlock], max_roots[AMS ? kBlock : 1];
  __m256i avg_max = _mm256_setzero_si256(), var_root_max = avg_max, max_root_max = avg_max;
  constexpr bool adaptive = KIND == kAdaptive;
  for (int64_t j = 0; j < kBlock; j += 8) {
    F8 param = load8(p + j), avg = F8{widen_codes(m_codes + j)} * m_step;
    const F8 stored_root = F8{widen_codes(s_codes + j)} * s_step;
    F8 var = stored_root * stored_root, max_var{_mm256_setzero_ps()}, root{_mm256_setzero_ps()};
    if (AMS) {
      const F8 stored_max_root = F8{widen_codes(max_codes + j)} * max_step;
      max_var = stored_max_root * stored_max_root;
    }
    belief_step<L2, AMS, KIND>(param, load8(g + j), avg, var, max_var, root, c);
    store8(p + j, param);
    // The update's root is that of the belief: var's without AMSGrad, max_var's with it.
    avg_max = store_and_max(avgs + j, avg, avg_max);
    const F8 var_root = adaptive && !AMS ? root : square_roots(var);
    var_root_max = store_and_max(var_roots + j, var_root, var_root_max);
    if (AMS) {
      const F8 max_root = adaptive ? root : square_roots(max_var);
      max_root_max = store_and_max(max_roots + j, max_root, max_root_max);
    }
  }
  encode_codes<true>(avgs, kBlock, largest(avg_max), t.step_key, static_cast<int8_t*>(t.m) + b,
                     t.m_scale + block);
  encode_codes<false>(var_roots, kBlock, largest(var_root_max), t.step_key,
                      static_cast<uint8_t*>(t.s) + b, t.s_scale + block);
  if (AMS) {
    encode_codes<false>(max_roots, kBlock, largest(max_root_max), t.step_key,
                        static_cast<uint8_t*>(t.s_max) + b, t.s_max_scale + block);
  }
}

}  // namespace avx2
#endif

using Fn = void (*)(const Operands&, int64_t, int64_t, const Options&, double, double);

template <typename P, int FORMAT, bool L2, bool AMS, int KIND>
void update_erased(const Operands& t, int64_t begin, int64_t end, const Options& o,
                   double step_size, double sqrt_bc2) {
  using T = typename Math<P>::T;
  P* p = static_cast<P*>(t.p);
  const P* g = static_cast<const P*>(t.g);
  if constexpr (FORMAT == ADABELIEF_STATE_FP32) {
    update_range<P, L2, AMS, KIND>(p, g, static_cast<T*>(t.m), static_cast<T*>(t.s),
                                   static_cast<T*>(t.s_max), begin, end, o, step_size, sqrt_bc2);
  } else {
#if defined(__AVX2__)
    if constexpr (std::is_same_v<P, float> || std::is_same_v<P, BF16>) {
      const Coefficients<F8> c(o, step_size, sqrt_bc2);
      if constexpr (FORMAT == ADABELIEF_STATE_BF16) {
        begin = avx2::update_bf16_lanes<P, L2, AMS, KIND>(t, begin, end, c);
      } else {
        for (; begin + kBlock <= end; begin += kBlock) {
          avx2::update_int8_block<P, L2, AMS, KIND>(t, begin, c);
        }
      }
    }
#endif
    constexpr bool roots = FORMAT == ADABELIEF_STATE_INT8 && KIND == kAdaptive;
    float m[kBlock], s[kBlock], s_max[kBlock], belief_root[roots ? kBlock : 1];
    for (int64_t b = begin; b < end; b += kBlock) {
      const int64_t n = end - b < kBlock ? end - b : kBlock;
      decode_block<FORMAT, AMS>(t, b, n, m, s, s_max);
      update_range<P, L2, AMS, KIND, roots, float>(p + b, g + b, m, s, s_max, 0, n, o,
                                                   step_size, sqrt_bc2, belief_root);
      encode_block<FORMAT, AMS, roots>(t, b, n, m, s, s_max, belief_root);
    }
  }
}

template <typename P, int FORMAT, bool L2, bool AMS>
Fn pick_kind(int kind) {
  switch (kind) {
    case kAdaptive: return update_erased<P, FORMAT, L2, AMS, kAdaptive>;
    case kMomentum: return update_erased<P, FORMAT, L2, AMS, kMomentum>;
    default: return update_erased<P, FORMAT, L2, AMS, kNoStep>;
  }
}

template <typename P, int FORMAT>
Fn pick_flags(bool l2, bool ams, int kind) {
  if (l2) return ams ? pick_kind<P, FORMAT, true, true>(kind) : pick_kind<P, FORMAT, true, false>(kind);
  return ams ? pick_kind<P, FORMAT, false, true>(kind) : pick_kind<P, FORMAT, false, false>(kind);
}

template <typename P>
Fn pick_format(int format, bool l2, bool ams, int kind) {
  switch (format) {
    case ADABELIEF_STATE_FP32: return pick_flags<P, ADABELIEF_STATE_FP32>(l2, ams, kind);
    case ADABELIEF_STATE_BF16: return pick_flags<P, ADABELIEF_STATE_BF16>(l2, ams, kind);
    case ADABELIEF_STATE_INT8: return pick_flags<P, ADABELIEF_STATE_INT8>(l2, ams, kind);
    default: return nullptr;
  }
}

Fn pick(int dtype, int format, bool l2, bool ams, int kind) {
  switch (dtype) {
    case ADABELIEF_DTYPE_FLOAT32: return pick_format<float>(format, l2, ams, kind);
    case ADABELIEF_DTYPE_BFLOAT16: return pick_format<BF16>(format, l2, ams, kind);
    case ADABELIEF_DTYPE_FLOAT16: return pick_format<F16>(format, l2, ams, kind);
    case ADABELIEF_DTYPE_FLOAT64:  // float64 state is exact: no compressed formats
      return format == ADABELIEF_STATE_FP32
                 ? pick_flags<double, ADABELIEF_STATE_FP32>(l2, ams, kind)
                 : nullptr;
    default: return nullptr;
  }
}

struct alignas(64) Cursor {  // the next chunk of a thread's block, on a cache line of its own
  std::atomic<int64_t> next{0};
  int64_t end = 0;
};

constexpr int64_t kChunk = 1 << 15;         // elements per work item (a multiple of kBlock)
constexpr int64_t kMinPerThread = 1 << 16;  // elements per thread, at least
static_assert(kChunk % kBlock == 0, "int8 blocks must not straddle chunks");

}  // namespace

extern "C" {

int adabelief_abi_version() { return ADABELIEF_ABI_VERSION; }

int adabelief_openmp() {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

// 1 when the int8 quantisation runs on AVX2 vectors (built for a CPU that has them).
int adabelief_avx2() {
#if defined(__AVX2__)
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

// One step of n tensors of one parameter dtype and one state format.
//   pointers[k * n + i]: operand k of tensor i, k = p, g, m, s, s_max, m_scale, s_scale,
//     s_max_scale (the scales for the int8 format only; s_max and its scale with AMSGrad only);
//   numel[i]: elements (complex tensors count their real and imaginary parts);
//   step_size[i], sqrt_bc2[i], kind[i]: the step scalars; step_key[i]: the dither's step key;
//   options: beta1, beta2, eps, decay factor, L2 coefficient, gradient factor (+-1/grad scale,
//     a power of two).
// Returns 0, or 1 for a dtype/format pair that has no kernel.
int adabelief_update(int dtype, int format, int64_t n, void* const* pointers, const int64_t* numel,
                     const double* step_size, const double* sqrt_bc2, const int8_t* kind,
                     const uint32_t* step_key, const double* options, int l2, int amsgrad,
                     int num_threads) {
  if (pick(dtype, format, false, false, kAdaptive) == nullptr) return 1;
  const Options o{options[0], options[1], options[2], options[3], options[4], options[5]};
  std::vector<Operands> tensors(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    auto at = [&](int k) { return pointers[k * n + i]; };
    tensors[size_t(i)] = Operands{at(0),
                                  at(1),
                                  at(2),
                                  at(3),
                                  at(4),
                                  static_cast<float*>(at(5)),
                                  static_cast<float*>(at(6)),
                                  static_cast<float*>(at(7)),
                                  step_key[i]};
  }
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
    const int64_t i = work[size_t(2 * c)], begin = work[size_t(2 * c + 1)];
    const int64_t end = begin + kChunk < numel[i] ? begin + kChunk : numel[i];
    const Fn fn = pick(dtype, format, l2 != 0, amsgrad != 0, kind[i]);
    fn(tensors[size_t(i)], begin, end, o, step_size[i], sqrt_bc2[i]);
  };
  // Each thread streams through its own contiguous block of chunks, then takes the chunks
  // left in the other blocks (a thread that the OS delays does not hold the others up).
  std::vector<Cursor> cursors(static_cast<size_t>(num_threads));
  for (int b = 0; b < num_threads; ++b) {
    cursors[size_t(b)].next.store(chunks * b / num_threads, std::memory_order_relaxed);
    cursors[size_t(b)].end = chunks * (b + 1) / num_threads;
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
