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
