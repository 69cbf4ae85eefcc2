// Master weights of 16-bit parameters (adabelief/master_weights.py is the reference, operation
// for operation): the float32 master an update starts from, and its split after the update.
//   residual:   master = float(w) + code * unit(w), unit = ulp(w) / 256 (exact); after the
//               update, w = nearest(m), code = floor((round(q * 2^16) + d) / 2^16) for
//               q = (m - w) / unit in [-128, 128]; code 128 carries into the next weight up;
//   fp32:       the float32 master itself, the weight its nearest rounding;
//   stochastic: the weight rounded stochastically (round_bf16 for bfloat16; float16 truncates
//               at its 10 mantissa bits, with round-to-nearest for subnormals and overflow);
// d = mix32(bits(m) ^ step_key) & 0xffff (dither.h), the hash the AMSGrad maximum takes.
#pragma once

#include <cmath>
#include <cstdint>

#include "abi.h"
#include "dither.h"
#include "lanes.h"

namespace {

#if defined(__GNUC__)
#define ADABELIEF_INLINE inline __attribute__((always_inline))
#else
#define ADABELIEF_INLINE inline
#endif

constexpr int kMasterRound = ADABELIEF_MASTER_ROUND;
constexpr int kMasterResidual = ADABELIEF_MASTER_RESIDUAL;
constexpr int kMasterFp32 = ADABELIEF_MASTER_FP32;
constexpr int kMasterStochastic = ADABELIEF_MASTER_STOCHASTIC;

// Per 16-bit type: mantissa bits, the lowest float32 exponent field with a residual, and
// whether weights below it take that field's ulp (float16's subnormals) or keep no residual.
template <typename P> struct Format16;
template <> struct Format16<BF16> {
  static constexpr int32_t mantissa = 7, lowest = 16;
  static constexpr bool clamp = false;
};
template <> struct Format16<F16> {
  static constexpr int32_t mantissa = 10, lowest = 113;
  static constexpr bool clamp = true;
};

inline float power_of_two(int32_t field) {
  return from_bits(uint32_t(field < 1 ? 1 : (field > 254 ? 254 : field)) << 23);
}

// unit = ulp(w) / 256 and inverse = 256 / ulp(w), powers of two; both 0 without a residual.
template <typename P> ADABELIEF_INLINE void residual_units(float w, float& unit, float& inverse) {
  int32_t field = int32_t((to_bits(w) >> 23) & 0xffu);
  bool kept = field < 255;
  if (Format16<P>::clamp) {
    field = field < Format16<P>::lowest ? Format16<P>::lowest : field;
  } else {
    kept = kept && field >= Format16<P>::lowest;
  }
  const int32_t unit_field = field - (Format16<P>::mantissa + 8);
  unit = kept ? power_of_two(unit_field) : 0.0f;
  inverse = kept ? power_of_two(254 - unit_field) : 0.0f;
}

template <typename P> ADABELIEF_INLINE P nearest16(float v) {
  P w;
  store(&w, 0, v);
  return w;
}

template <typename P> ADABELIEF_INLINE float merge_residual(P w, int8_t code) {
  const float low = load(&w, 0);
  float unit, inverse;
  residual_units<P>(low, unit, inverse);
  return low + float(code) * unit;
}

// Written without branches (selects only), so that the loops over elements vectorise.
template <typename P>
ADABELIEF_INLINE void split_residual(float m, uint32_t step_key, P& w_out, int8_t& code_out) {
  const P w = nearest16<P>(m);
  const float low = load(&w, 0);
  float unit, inverse;
  residual_units<P>(low, unit, inverse);
  const float scaled = std::nearbyint((m - low) * inverse * 65536.0f);
  const float fixed = inverse != 0.0f ? scaled : 0.0f;
  const uint32_t d = mix32(to_bits(m) ^ step_key) & 0xffffu;
  const float q = std::floor((fixed + float(d)) * (1.0f / 65536.0f));
  const P up = nearest16<P>(low + 256.0f * unit);
  float up_unit, up_inverse;
  residual_units<P>(load(&up, 0), up_unit, up_inverse);
  // The midpoint above w carries into the next weight up; the largest finite weight clamps.
  const bool carry = (q >= 128.0f) & (up_inverse != 0.0f);
  const float clamped = q > 127.0f ? 127.0f : q;
  const float code = carry ? -128.0f * unit * up_inverse : clamped;
  w_out.bits = carry ? up.bits : w.bits;
  code_out = int8_t(code);
}

#if defined(__AVX2__)
// bf16_nearest on 8 lanes, in the low 16 bits of each 32-bit lane (as store8(BF16)).
inline __m256i bf16_nearest8(F8 v) {
  const __m256i u = _mm256_castps_si256(v.v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(
      _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v.v, v.v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
}

inline F8 widen_bits8(__m256i bits) { return {_mm256_castsi256_ps(_mm256_slli_epi32(bits, 16))}; }

inline F8 select8(__m256i mask, F8 yes, F8 no) {
  return {_mm256_blendv_ps(no.v, yes.v, _mm256_castsi256_ps(mask))};
}

// residual_units<BF16> on 8 lanes.
inline void residual_units8(F8 w, F8& unit, F8& inverse) {
  const __m256i field = _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(w.v), 23),
                                         _mm256_set1_epi32(0xff));
  const __m256i kept = _mm256_andnot_si256(
      _mm256_cmpgt_epi32(_mm256_set1_epi32(Format16<BF16>::lowest), field),
      _mm256_cmpgt_epi32(_mm256_set1_epi32(255), field));
  const __m256i unit_field = _mm256_sub_epi32(field, _mm256_set1_epi32(7 + 8));
  const __m256i one = _mm256_set1_epi32(1), top = _mm256_set1_epi32(254);
  const auto power = [&](__m256i f) {
    f = _mm256_min_epi32(_mm256_max_epi32(f, one), top);
    return F8{_mm256_castsi256_ps(_mm256_slli_epi32(f, 23))};
  };
  const F8 zero = zero8();
  unit = select8(kept, power(unit_field), zero);
  inverse = select8(kept, power(_mm256_sub_epi32(top, unit_field)), zero);
}

// merge_residual<BF16> of 8 weights and their codes.
inline F8 merge_residual8(const BF16* w, const int8_t* codes) {
  const F8 low{widen_bf16(w)};
  F8 unit, inverse;
  residual_units8(low, unit, inverse);
  return low + code_lane8(codes) * unit;
}

// split_residual<BF16> of 8 masters, operation for operation.
inline void split_residual8(F8 m, __m256i step_key, BF16* w_out, int8_t* code_out) {
  const __m256i w = bf16_nearest8(m);
  const F8 low = widen_bits8(w);
  F8 unit, inverse;
  residual_units8(low, unit, inverse);
  const F8 product = (m - low) * inverse * broadcast<F8>(65536.0);
  const F8 scaled{_mm256_round_ps(product.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
  const __m256i has = _mm256_castps_si256(_mm256_cmp_ps(inverse.v, zero8().v, _CMP_NEQ_OQ));
  const F8 fixed = select8(has, scaled, zero8());
  const __m256i d = low16(mix32(_mm256_xor_si256(_mm256_castps_si256(m.v), step_key)));
  const F8 dither{_mm256_cvtepi32_ps(d)};
  const F8 q{_mm256_floor_ps(((fixed + dither) * broadcast<F8>(1.0 / 65536.0)).v)};
  const __m256i up = bf16_nearest8(low + broadcast<F8>(256.0) * unit);
  F8 up_unit, up_inverse;
  residual_units8(widen_bits8(up), up_unit, up_inverse);
  const __m256i carry = _mm256_and_si256(
      _mm256_castps_si256(_mm256_cmp_ps(q.v, _mm256_set1_ps(128.0f), _CMP_GE_OQ)),
      _mm256_castps_si256(_mm256_cmp_ps(up_inverse.v, zero8().v, _CMP_NEQ_OQ)));
  const F8 clamped{_mm256_min_ps(q.v, _mm256_set1_ps(127.0f))};
  const F8 code = select8(carry, broadcast<F8>(-128.0) * unit * up_inverse, clamped);
  const __m256i bits = _mm256_blendv_epi8(w, up, carry);
  const __m128i packed =
      _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(w_out), packed);
  const __m256i codes = _mm256_cvtps_epi32(code.v);
  const __m128i words =
      _mm_packs_epi32(_mm256_castsi256_si128(codes), _mm256_extracti128_si256(codes, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(code_out), _mm_packs_epi16(words, words));
}
#endif

inline BF16 stochastic16(float m, uint32_t d, BF16*) {
  BF16 w;
  const uint32_t bits = round_bf16(m, d);
  w.bits = non_finite_bf16(bits) ? bf16_nearest(m) : uint16_t(bits);
  return w;
}

inline F16 stochastic16(float m, uint32_t d, F16*) {
  const float r = from_bits((to_bits(m) + (d >> 3)) & ~0x1fffu);
  const bool normal = ((to_bits(m) >> 23) & 0xffu) >= uint32_t(Format16<F16>::lowest);
  return nearest16<F16>(std::isfinite(r) && normal ? r : m);
}

// The float32 master of element i, and its write-back after the update, for the mode MODE
// (kMaster*, a compile-time constant so that the loops over elements stay branch-free).
template <int MODE, typename P>
inline float load_master(const P* p, const void* master, int64_t i) {
  if constexpr (MODE == kMasterResidual) {
    return merge_residual(p[i], static_cast<const int8_t*>(master)[i]);
  } else if constexpr (MODE == kMasterFp32) {
    return static_cast<const float*>(master)[i];
  } else {
    return load(p, i);
  }
}

template <int MODE, typename P>
inline void store_master(P* p, void* master, uint32_t step_key, int64_t i, float m) {
  if constexpr (MODE == kMasterResidual) {
    split_residual<P>(m, step_key, p[i], static_cast<int8_t*>(master)[i]);
  } else if constexpr (MODE == kMasterStochastic) {
    p[i] = stochastic16(m, mix32(to_bits(m) ^ step_key) & 0xffffu, static_cast<P*>(nullptr));
  } else {
    if constexpr (MODE == kMasterFp32) static_cast<float*>(master)[i] = m;
    store(p, i, m);
  }
}

// master advanced by n elements (its element size depends on the mode).
template <int MODE> inline void* master_at(void* master, int64_t n) {
  if (master == nullptr) return nullptr;
  return static_cast<char*>(master) + n * (MODE == kMasterFp32 ? 4 : 1);
}

}  // namespace
