// The block-wise int8 format (compressed_state's reference), one scale per kBlock elements:
// exp_avg as signed codes, value = code * scale / 127; exp_avg_var and its AMSGrad maximum as
// unsigned codes of their square roots, value = (code * scale / 255)^2. A block's scale is its
// largest finite magnitude (of the roots, for the beliefs). With x = value * (127 or 255) / scale
// clamped to [-127, 127] (or [0, 255]) and d the element's 16-bit dither (dither.h),
//   code = (round_to_nearest_even(x * 2^16) + d) >> 16,
// NaN codes 0, and a positive root never codes 0 (a belief rounded to zero would turn its step
// into m / eps).
#pragma once

#include <type_traits>

#include "abi.h"
#include "belief_update.h"
#include "dither.h"
#include "lanes.h"

namespace {

constexpr int64_t kBlock = ADABELIEF_INT8_BLOCK;

// ---- decoding: the one definition, over lanes ------------------------------------------------

// The step between codes of a block: scale / 127 (SIGNED, exp_avg) or scale / 255 (the roots).
template <bool SIGNED> inline float code_step(float scale) {
  return scale / (SIGNED ? 127.0f : 255.0f);
}

// The value of a code lane (code_lane, code_lane8) in a block whose code_step is step.
template <bool SIGNED, typename V> inline V decode_int8(V code, V step) {
  const V value = code * step;
  if constexpr (SIGNED) {
    return value;
  } else {
    return value * value;
  }
}

template <bool SIGNED, typename Code>
inline void decode_int8_block(const Code* codes, float scale, int64_t n, float* out) {
  const float step = code_step<SIGNED>(scale);
  for (int64_t j = 0; j < n; ++j) out[j] = decode_int8<SIGNED>(code_lane(codes, j), step);
}

// ---- block scales ----------------------------------------------------------------------------

// 1 / x * top, rounded twice, as torch evaluates ``top / tensor`` (reciprocal, then multiply).
inline float inverse_scale(float block_max, float top) {
  return block_max > 0.0f ? (1.0f / block_max) * top : 0.0f;
}

// The largest finite magnitude of a block (0 if none): inf and NaN are left out, so that one
// non-finite element (an inf gradient without GradScaler) cannot make the scale of its whole
// block inf or NaN; its own code is the clamp (+-127 or 255 for +-inf, 0 for NaN) and the other
// elements keep theirs. For non-negative floats the order of the bit patterns is the order of
// the values, and the non-finite ones are those from infinity's up, so an integer maximum (which
// vectorises) gives it.
inline uint32_t finite_magnitude(float value) {
  const uint32_t magnitude = to_bits(value) & 0x7fffffffu;
  return magnitude < 0x7f800000u ? magnitude : 0u;
}

// The value whose key (the bits of a non-negative finite float, 0 for those left out) is the
// largest, by an integer maximum over the keys.
template <typename Key> inline float largest_by_bits(const float* values, int64_t n, Key key) {
  uint32_t largest = 0;
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t bits = key(values[j]);
    largest = bits > largest ? bits : largest;
  }
  return from_bits(largest);
}

inline float block_absmax(const float* values, int64_t n) {
  return largest_by_bits(values, n, finite_magnitude);
}

// sqrt(max(v, 0)) (NaN stays NaN), correctly rounded as the reference's; returns roots.
inline const float* square_roots(const float* values, int64_t n, float* roots) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = values[j];
    roots[j] = std::sqrt(v > 0.0f || v != v ? v : 0.0f);
  }
  return roots;
}

// ---- encoding ----------------------------------------------------------------------------------

// The code of one value for a block scaled by inv (inverse_scale), with its 16-bit dither.
template <bool SIGNED> inline int32_t int8_code(float value, float inv, uint32_t dither) {
  constexpr float lo = SIGNED ? -127.0f : 0.0f, hi = SIGNED ? 127.0f : 255.0f;
  float x = value * inv;
  x = x < lo ? lo : x;  // NaN stays NaN
  x = x > hi ? hi : x;
  if (x != x) return 0;
  const int32_t code = (int32_t(std::nearbyint(x * 65536.0f)) + int32_t(dither)) >> 16;
  return !SIGNED && x > 0.0f && code < 1 ? 1 : code;
}

#if defined(__AVX2__)
// int8_code on 8 lanes, the result in 32-bit lanes, with fixed_inv = inv * 2^16: x * 2^16 in
// one multiply, exactly (x * inv) * 2^16 while fixed_inv is finite (encode_int8 checks). NaN
// gives -32768 here (cvtps of NaN is INT_MIN), which the unsigned packs saturate to 0 and
// store_codes maps to 0 for the signed.
template <bool SIGNED> inline __m256i int8_codes(F8 values, __m256 fixed_inv, __m256i dither) {
  constexpr float top = (SIGNED ? 127.0f : 255.0f) * 65536.0f;
  const __m256 x = _mm256_mul_ps(values.v, fixed_inv);
  // min/max return their second operand when either is NaN: x last keeps NaN.
  __m256 clamped = _mm256_min_ps(_mm256_set1_ps(top), x);
  if (SIGNED) clamped = _mm256_max_ps(_mm256_set1_ps(-top), clamped);
  const __m256i code = _mm256_srai_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(clamped), dither), 16);
  if (SIGNED) return code;
  const __m256i positive = _mm256_castps_si256(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GT_OQ));
  return _mm256_max_epi32(code, _mm256_srli_epi32(positive, 31));
}

// 32 codes (four vectors of int32 lanes, in element order) packed into bytes.
inline void store_codes(const __m256i (&q)[4], int8_t* codes) {
  const __m256i packed =
      _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  // NaN's -32768 saturates to -128, which no finite value codes: make it 0.
  const __m256i nan = _mm256_cmpeq_epi8(packed, _mm256_set1_epi8(-128));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes),
                      _mm256_permutevar8x32_epi32(_mm256_andnot_si256(nan, packed), order));
}
inline void store_codes(const __m256i (&q)[4], uint8_t* codes) {
  const __m256i packed =
      _mm256_packus_epi16(_mm256_packus_epi32(q[0], q[1]), _mm256_packus_epi32(q[2], q[3]));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes),
                      _mm256_permutevar8x32_epi32(packed, order));
}
#endif

// The codes of n elements of a block and its scales: with PAIR, a is exp_avg (signed codes) and
// b the roots of exp_avg_var, which share a hash; without, a is the roots of the AMSGrad maximum
// (unsigned codes), hashed alone. a_max and b_max are their block_absmax, stored as the scales.
template <bool PAIR, typename CodeA>
inline void encode_int8(const float* a, const float* b, int64_t n, float a_max, float b_max,
                        uint32_t step_key, CodeA* a_codes, uint8_t* b_codes, float* a_scale,
                        float* b_scale) {
  constexpr bool a_signed = PAIR;
  static_assert(std::is_same_v<CodeA, std::conditional_t<PAIR, int8_t, uint8_t>>, "codes");
  *a_scale = a_max;
  if (PAIR) *b_scale = b_max;
  const float a_inv = inverse_scale(a_max, a_signed ? 127.0f : 255.0f);
  const float b_inv = inverse_scale(b_max, 255.0f);
  int64_t j = 0;
#if defined(__AVX2__)
  const __m256i key = _mm256_set1_epi32(int32_t(step_key));
  const float a_fixed = a_inv * 65536.0f, b_fixed = b_inv * 65536.0f;
  const __m256 a_inv8 = _mm256_set1_ps(a_fixed), b_inv8 = _mm256_set1_ps(b_fixed);
  // The leading multiple of 32, written so that the compiler sees 0 <= j <= n after the loop;
  // none where inv * 2^16 overflows (a block maximum under 2.4e-32: the scalar loop then).
  const bool folds = a_fixed < INFINITY && b_fixed < INFINITY;
  const int64_t vectors = folds ? n & ~int64_t(31) : 0;
  for (; j < vectors; j += 32) {
    __m256i qa[4], qb[4];
    for (int k = 0; k < 4; ++k) {
      const F8 av = load8(a + j + 8 * k), bv = PAIR ? load8(b + j + 8 * k) : zero8();
      const __m256i h = pair_hash(av, bv, key);
      qa[k] = int8_codes<a_signed>(av, a_inv8, low16(h));
      if (PAIR) qb[k] = int8_codes<false>(bv, b_inv8, high16(h));
    }
    store_codes(qa, a_codes + j);
    if (PAIR) store_codes(qb, b_codes + j);
  }
#endif
  for (; j < n; ++j) {
    const uint32_t h = pair_hash(a[j], PAIR ? b[j] : 0.0f, step_key);
    a_codes[j] = CodeA(int8_code<a_signed>(a[j], a_inv, h & 0xffffu));
    if (PAIR) b_codes[j] = uint8_t(int8_code<false>(b[j], b_inv, h >> 16));
  }
}

#if defined(__AVX2__)
// Stores values to out and returns the running maximum of their magnitudes' bits, 8 at a time.
// It takes inf and NaN too (their bits are the largest): block_max then redoes the block with
// block_absmax in that rare case, so that the result is block_absmax's.
inline __m256i store_and_max(float* out, F8 values, __m256i running) {
  _mm256_storeu_ps(out, values.v);
  const __m256i magnitude =
      _mm256_and_si256(_mm256_castps_si256(values.v), _mm256_set1_epi32(0x7fffffff));
  return _mm256_max_epu32(running, magnitude);
}

// block_absmax of the kBlock values in out, whose store_and_max was running.
inline float block_max(__m256i running, const float* out) {
  __m128i m = _mm_max_epu32(_mm256_castsi256_si128(running), _mm256_extracti128_si256(running, 1));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4e));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xb1));
  const uint32_t largest = uint32_t(_mm_cvtsi128_si32(m));
  return largest < 0x7f800000u ? from_bits(largest) : block_absmax(out, kBlock);
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
void update_int8_block(const adabelief_tensor& t, int64_t b, const Coefficients<F8>& c) {
  P* p = static_cast<P*>(t.param) + b;
  const P* g = static_cast<const P*>(t.grad) + b;
  const int8_t* m_codes = static_cast<const int8_t*>(t.exp_avg) + b;
  const uint8_t* s_codes = static_cast<const uint8_t*>(t.exp_avg_var) + b;
  const uint8_t* max_codes = AMS ? static_cast<const uint8_t*>(t.max_exp_avg_var) + b : nullptr;
  const int64_t block = b / kBlock;
  const F8 m_step{_mm256_set1_ps(code_step<true>(t.exp_avg_scale[block]))};
  const F8 s_step{_mm256_set1_ps(code_step<false>(t.exp_avg_var_scale[block]))};
  const F8 max_step{_mm256_set1_ps(AMS ? code_step<false>(t.max_exp_avg_var_scale[block]) : 0.0f)};
  float avgs[kBlock], var_roots[kBlock], max_roots[AMS ? kBlock : 1];
  __m256i avg_max = _mm256_setzero_si256(), var_root_max = avg_max, max_root_max = avg_max;
  constexpr bool adaptive = KIND == kAdaptive;
  for (int64_t j = 0; j < kBlock; j += 8) {
    F8 param = load8(p + j), avg = decode_int8<true>(code_lane8(m_codes + j), m_step);
    F8 var = decode_int8<false>(code_lane8(s_codes + j), s_step);
    F8 max_var = AMS ? decode_int8<false>(code_lane8(max_codes + j), max_step) : zero8();
    F8 root = zero8();
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
  encode_int8<true>(avgs, var_roots, kBlock, block_max(avg_max, avgs),
                    block_max(var_root_max, var_roots), t.step_key,
                    static_cast<int8_t*>(t.exp_avg) + b, static_cast<uint8_t*>(t.exp_avg_var) + b,
                    t.exp_avg_scale + block, t.exp_avg_var_scale + block);
  if (AMS) {
    encode_int8<false>(max_roots, nullptr, kBlock, block_max(max_root_max, max_roots), 0.0f,
                       t.step_key,
                       static_cast<uint8_t*>(t.max_exp_avg_var) + b, nullptr,
                       t.max_exp_avg_var_scale + block, nullptr);
  }
}
#endif

}  // namespace
