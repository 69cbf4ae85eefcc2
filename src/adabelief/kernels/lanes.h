// Lanes: the element types the kernel reads and writes, and the lane types the update and the
// codes are written over: one float or double (the portable loops, which GCC vectorises), or F8,
// eight floats in an AVX2 register. The same operations give the same bits on every lane type.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

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

// The working type of a parameter type: float, or double for double.
template <typename P> struct Math { using T = float; };
template <> struct Math<double> { using T = double; };

// ---- lane types: IEEE-exact +, -, *, /, fma, sqrt, a NaN-propagating maximum, broadcast ------

inline float nan_max(float previous, float v) {
  return (previous > v || previous != previous) ? previous : v;  // NaN wins
}
inline double nan_max(double previous, double v) {
  return (previous > v || previous != previous) ? previous : v;
}
template <typename V> V broadcast(double x);
template <> inline float broadcast<float>(double x) { return float(x); }
template <> inline double broadcast<double>(double x) { return x; }
using std::fma;
using std::sqrt;

// The int8 codes as lanes: one code as a float, or eight in F8 (code_lane, below).
inline float code_lane(const int8_t* codes, int64_t j) { return float(codes[j]); }
inline float code_lane(const uint8_t* codes, int64_t j) { return float(codes[j]); }

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

inline F8 zero8() { return {_mm256_setzero_ps()}; }
inline __m256 widen_bf16(const void* bits) {
  const __m128i half = _mm_loadu_si128(static_cast<const __m128i*>(bits));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
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
inline F8 code_lane8(const int8_t* codes) {
  const __m128i eight = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes));
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight))};
}
inline F8 code_lane8(const uint8_t* codes) {
  const __m128i eight = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes));
  return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(eight))};
}
#endif

}  // namespace
