// The block-wise int4 format (compressed_state._Int4Format is the reference), one float32 scale per
// kInt4Block elements and two codes per byte: element 2i of the tensor in the low nibble of byte
// i, element 2i + 1 in its high nibble.
//   exp_avg:                     signed codes -7..7 (two's complement nibbles),
//                                value = sign(c) * L7[|c|] * scale;
//   exp_avg_var, AMSGrad maximum: codes 0..15, value = L15[c] * scale;
// with the levels L_top[k] = (k / top)^2, computed in float64 and rounded to float32. A block's
// scale is its largest finite magnitude (for the beliefs: its largest finite value, negatives
// counting as 0). Encoding a value x of a block with scale M, inv = 1 / M (0 when M is 0):
//   u    = clamp(|x| * inv, 0, 1)                     (a belief's |x| is max(x, 0))
//   low  = min(floor(sqrt_f64(u) * top), top - 1)     (the level below u)
//   frac = clamp((u - L[low]) / (L[low + 1] - L[low]), 0, 1)
//   code = low + ((round_to_nearest_even(frac * 2^16) + d) >> 16), with exp_avg's sign,
// so the stored value is unbiased; d is the element's 16-bit dither (dither.h) of the values
// themselves (not of roots, as int8's): exp_avg takes the low half and exp_avg_var the high half
// of their pair hash, the AMSGrad maximum the low half of its own. u NaN (a NaN value, or 0 * inf
// when M is subnormal) codes 0, +-inf the top code (when M > 0), and a positive belief never codes
// 0. On AVX2, low is found by comparing u with the float32 thresholds where floor(sqrt_f64(u) *
// top) steps (computed once from that definition: it is monotone in u), which gives the same
// integer for every u in [0, 1] (tests/test_int4_codes.py checks all of them).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "abi.h"
#include "belief_update.h"
#include "codes_int8.h"
#include "dither.h"
#include "lanes.h"

namespace {

constexpr int64_t kInt4Block = ADABELIEF_INT4_BLOCK;
static_assert(kInt4Block % 32 == 0, "the AVX2 loops code 32 elements, 16 bytes, at a time");
static_assert(ADABELIEF_INT4_SIGNED_POWER == 2 && ADABELIEF_INT4_BELIEF_POWER == 2,
              "the kernel codes the int4 maps (k / top)^2 only");

// One code map: its levels, the gaps between them, the thresholds of the level below, and the
// value of each of the 16 nibbles (a fraction of the block's scale).
struct Int4Map {
  float level[16];      // L[k], k <= top
  float gap[16];        // L[k + 1] - L[k], k < top (float32, as the reference subtracts)
  float threshold[16];  // threshold[j]: the least u with floor(sqrt_f64(u) * top) >= j, 0 < j < top
  float nibble[16];     // the decoded fraction of each nibble
};

// floor(sqrt_f64(u) * top) clamped to top - 1: the reference's index of the level below u.
template <int TOP> inline int32_t level_below(float u) {
  const int32_t low = int32_t(std::floor(std::sqrt(double(u)) * double(TOP)));
  return low > TOP - 1 ? TOP - 1 : low;
}

template <int TOP> Int4Map make_int4_map(bool is_signed) {
  Int4Map map{};
  for (int k = 0; k <= TOP; ++k) {
    const double fraction = double(k) / double(TOP);
    map.level[k] = float(fraction * fraction);
  }
  for (int k = 0; k < TOP; ++k) map.gap[k] = map.level[k + 1] - map.level[k];
  for (int j = 1; j < TOP; ++j) {
    // Bisection over the bits of u in [0, 1] (non-negative floats order as their bits).
    uint32_t below = 0, above = to_bits(1.0f);  // level_below(below) < j <= level_below(above)
    while (above - below > 1) {
      const uint32_t middle = below + (above - below) / 2;
      (level_below<TOP>(from_bits(middle)) >= j ? above : below) = middle;
    }
    map.threshold[j] = from_bits(above);
  }
  for (int n = 0; n < 16; ++n) {
    if (!is_signed) {
      map.nibble[n] = map.level[n];
    } else if (n < 8) {
      map.nibble[n] = map.level[n];
    } else {  // two's complement: n - 16; -8, which the encoder never writes, reads as -7
      map.nibble[n] = -map.level[n == 8 ? 7 : 16 - n];
    }
  }
  return map;
}

const Int4Map kSignedMap = make_int4_map<7>(true);
const Int4Map kBeliefMap = make_int4_map<15>(false);

template <bool BELIEF> inline const Int4Map& int4_map() {
  return BELIEF ? kBeliefMap : kSignedMap;
}

// ---- decoding ----------------------------------------------------------------------------------

#if defined(__AVX2__)
// A table of 16 floats, as two registers.
struct Table16 {
  __m256 low, high;
  explicit Table16(const float* t) : low(_mm256_loadu_ps(t)), high(_mm256_loadu_ps(t + 8)) {}
  // table[index] for indices 0..15 in 32-bit lanes.
  __m256 operator[](__m256i index) const {
    const __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(index, 28));  // bit 3
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, index),
                            _mm256_permutevar8x32_ps(high, index), upper);
  }
  // table[index] for indices 0..7: one permute.
  __m256 first8(__m256i index) const { return _mm256_permutevar8x32_ps(low, index); }
};

// The nibbles of 8 elements (4 bytes of codes) in 32-bit lanes: element j is bits 4j..4j+3 of
// the little-endian word.
inline __m256i nibbles8(const uint8_t* codes) {
  uint32_t word;
  std::memcpy(&word, codes, 4);
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int32_t(word)), shifts),
                          _mm256_set1_epi32(15));
}

inline F8 decode_int4(const Table16& nibble, const uint8_t* codes, __m256 scale) {
  return {_mm256_mul_ps(nibble[nibbles8(codes)], scale)};
}
#endif

// n values (n even) from n / 2 bytes of codes in a block of scale ``scale``.
template <bool BELIEF>
inline void decode_int4_block(const uint8_t* codes, float scale, int64_t n, float* out) {
  const float* nibble = int4_map<BELIEF>().nibble;
  int64_t j = 0;
#if defined(__AVX2__)
  const Table16 table(nibble);
  const __m256 scale8 = _mm256_set1_ps(scale);
  for (; j + 8 <= n; j += 8) store8(out + j, decode_int4(table, codes + j / 2, scale8));
#endif
  for (; j < n; j += 2) {
    const uint32_t byte = codes[j / 2];
    out[j] = nibble[byte & 15u] * scale;
    out[j + 1] = nibble[byte >> 4] * scale;
  }
}

// ---- block scales ------------------------------------------------------------------------------

// A belief's scale: the largest finite value, negatives (and NaN, inf) counting as 0. A float's
// bits below infinity's are those of the non-negative finite floats, in their order.
inline uint32_t finite_belief(float value) {
  const uint32_t bits = to_bits(value);
  return bits < 0x7f800000u ? bits : 0u;
}

inline float block_belief_max(const float* values, int64_t n) {
  return largest_by_bits(values, n, finite_belief);
}

template <bool BELIEF> inline float int4_block_max(const float* values, int64_t n) {
  return BELIEF ? block_belief_max(values, n) : block_absmax(values, n);
}

// 1 / M, one division as the reference's (torch evaluates 1.0 / tensor as its reciprocal).
inline float int4_inverse(float block_max) { return block_max > 0.0f ? 1.0f / block_max : 0.0f; }

// ---- encoding ----------------------------------------------------------------------------------

// The code of one value (-7..7, or 0..15 for a belief) for a block scaled by inv (int4_inverse),
// with its 16-bit dither.
template <bool BELIEF> inline int32_t int4_code(float value, float inv, uint32_t dither) {
  constexpr int32_t top = BELIEF ? 15 : 7;
  const Int4Map& map = int4_map<BELIEF>();
  const float magnitude = BELIEF ? (value < 0.0f ? 0.0f : value) : std::fabs(value);
  float u = magnitude * inv;  // NaN stays NaN through the clamps
  u = u < 0.0f ? 0.0f : u;
  u = u > 1.0f ? 1.0f : u;
  if (u != u) return 0;
  const int32_t low = level_below<top>(u);
  float frac = (u - map.level[low]) / map.gap[low];
  frac = frac < 0.0f ? 0.0f : frac;
  frac = frac > 1.0f ? 1.0f : frac;
  const int32_t code = low + ((int32_t(std::nearbyint(frac * 65536.0f)) + int32_t(dither)) >> 16);
  if (BELIEF) return u > 0.0f && code < 1 ? 1 : code;
  return value < 0.0f ? -code : code;
}

inline uint8_t int4_pair(int32_t even, int32_t odd) {
  return uint8_t((uint32_t(even) & 15u) | ((uint32_t(odd) & 15u) << 4));
}

#if defined(__AVX2__)
// What int4_code needs of a block: its inverse scale and its map's tables, in registers.
template <bool BELIEF> struct Int4Lanes {
  __m256 inv;
  __m256 threshold[BELIEF ? 15 : 7];
  Table16 level, gap;
  explicit Int4Lanes(float inverse)
      : inv(_mm256_set1_ps(inverse)), level(int4_map<BELIEF>().level),
        gap(int4_map<BELIEF>().gap) {
    for (int j = 1; j < (BELIEF ? 15 : 7); ++j) {
      threshold[j] = _mm256_set1_ps(int4_map<BELIEF>().threshold[j]);
    }
  }
};

// int4_code on 8 lanes, the codes in 32-bit lanes.
template <bool BELIEF>
inline __m256i int4_codes(F8 values, const Int4Lanes<BELIEF>& lanes, __m256i dither) {
  constexpr int top = BELIEF ? 15 : 7;
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  // A belief's negative values become 0 in the clamp below (the same codes as max(x, 0) first).
  const __m256 magnitude =
      BELIEF ? values.v : _mm256_andnot_ps(_mm256_set1_ps(-0.0f), values.v);
  // max returns its second operand, 0, for a NaN product: u = 0 codes 0, as a NaN u does.
  const __m256 u = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(magnitude, lanes.inv), zero), one);
  __m256i low = _mm256_setzero_si256();
  for (int j = 1; j < top; ++j) {
    const __m256 at_least = _mm256_cmp_ps(u, lanes.threshold[j], _CMP_GE_OQ);
    low = _mm256_sub_epi32(low, _mm256_castps_si256(at_least));
  }
  // exp_avg's levels below are 0..6, in the tables' first register.
  const __m256 below = BELIEF ? lanes.level[low] : lanes.level.first8(low);
  const __m256 gap = BELIEF ? lanes.gap[low] : lanes.gap.first8(low);
  __m256 frac = _mm256_div_ps(_mm256_sub_ps(u, below), gap);
  frac = _mm256_min_ps(_mm256_max_ps(frac, zero), one);
  const __m256i fixed = _mm256_cvtps_epi32(_mm256_mul_ps(frac, _mm256_set1_ps(65536.0f)));
  __m256i code = _mm256_add_epi32(low, _mm256_srli_epi32(_mm256_add_epi32(fixed, dither), 16));
  if (BELIEF) {
    const __m256i positive = _mm256_castps_si256(_mm256_cmp_ps(u, zero, _CMP_GT_OQ));
    code = _mm256_max_epi32(code, _mm256_srli_epi32(positive, 31));
  } else {
    code = _mm256_sign_epi32(code, _mm256_castps_si256(values.v));
  }
  return code;
}

// 32 codes (four vectors of 32-bit lanes, in element order) packed into 16 bytes.
inline void store_nibbles(const __m256i (&q)[4], uint8_t* codes) {
  const __m256i mask = _mm256_set1_epi32(15);
  const __m256i bytes = _mm256_packus_epi16(
      _mm256_packus_epi32(_mm256_and_si256(q[0], mask), _mm256_and_si256(q[1], mask)),
      _mm256_packus_epi32(_mm256_and_si256(q[2], mask), _mm256_and_si256(q[3], mask)));
  const __m256i ordered =
      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  // Each 16-bit lane holds codes 2i (low byte) and 2i + 1 (high byte): their byte is the low
  // byte of w | w >> 4.
  const __m256i merged = _mm256_and_si256(
      _mm256_or_si256(ordered, _mm256_srli_epi16(ordered, 4)), _mm256_set1_epi16(0xff));
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi16(merged, merged), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(codes), _mm256_castsi256_si128(packed));
}
#endif

// The codes of n elements (n even) of a block and its scales: with PAIR, a is exp_avg and b
// exp_avg_var, which share a hash; without, a is the AMSGrad maximum, hashed alone. a_max and
// b_max are their int4_block_max, stored as the scales.
template <bool PAIR>
inline void encode_int4(const float* a, const float* b, int64_t n, float a_max, float b_max,
                        uint32_t step_key, uint8_t* a_codes, uint8_t* b_codes, float* a_scale,
                        float* b_scale) {
  constexpr bool a_belief = !PAIR;
  *a_scale = a_max;
  if (PAIR) *b_scale = b_max;
  const float a_inv = int4_inverse(a_max), b_inv = int4_inverse(b_max);
  int64_t j = 0;
#if defined(__AVX2__)
  {
    const __m256i key = _mm256_set1_epi32(int32_t(step_key));
    const Int4Lanes<a_belief> a_lanes(a_inv);
    const Int4Lanes<true> b_lanes(b_inv);
    for (; j + 32 <= n; j += 32) {
      __m256i qa[4], qb[4];
      for (int k = 0; k < 4; ++k) {
        const F8 av = load8(a + j + 8 * k), bv = PAIR ? load8(b + j + 8 * k) : zero8();
        const __m256i h = pair_hash(av, bv, key);
        qa[k] = int4_codes<a_belief>(av, a_lanes, low16(h));
        if (PAIR) qb[k] = int4_codes<true>(bv, b_lanes, high16(h));
      }
      store_nibbles(qa, a_codes + j / 2);
      if (PAIR) store_nibbles(qb, b_codes + j / 2);
    }
  }
#endif
  for (; j < n; j += 2) {
    const uint32_t h0 = pair_hash(a[j], PAIR ? b[j] : 0.0f, step_key);
    const uint32_t h1 = pair_hash(a[j + 1], PAIR ? b[j + 1] : 0.0f, step_key);
    a_codes[j / 2] = int4_pair(int4_code<a_belief>(a[j], a_inv, h0 & 0xffffu),
                               int4_code<a_belief>(a[j + 1], a_inv, h1 & 0xffffu));
    if (PAIR) {
      b_codes[j / 2] = int4_pair(int4_code<true>(b[j], b_inv, h0 >> 16),
                                 int4_code<true>(b[j + 1], b_inv, h1 >> 16));
    }
  }
}

#if defined(__AVX2__)
// Stores values to out and returns the running maximum of their bits as int32, 8 at a time: the
// largest non-negative value's (negatives, and negative NaNs, have negative bits). It takes inf
// and positive NaNs too: int4_max then redoes the block with the scalar maximum in that rare case.
inline __m256i store_and_belief_max(float* out, F8 values, __m256i running) {
  _mm256_storeu_ps(out, values.v);
  return _mm256_max_epi32(running, _mm256_castps_si256(values.v));
}

// int4_block_max of the n values in out, whose store_and_max (magnitudes, exp_avg) or
// store_and_belief_max was running.
template <bool BELIEF> inline float int4_max(__m256i running, const float* out, int64_t n) {
  __m128i m = _mm256_castsi256_si128(running), high = _mm256_extracti128_si256(running, 1);
  if (BELIEF) {
    m = _mm_max_epi32(m, high);
    m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0x4e));
    m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0xb1));
  } else {
    m = _mm_max_epu32(m, high);
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4e));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xb1));
  }
  const uint32_t largest = uint32_t(_mm_cvtsi128_si32(m));
  return largest < 0x7f800000u ? from_bits(largest) : int4_block_max<BELIEF>(out, n);
}

// The int4 format with float32 or bfloat16 parameters, one whole block at b: the codes are
// decoded and the block updated in registers; the new moments go to L1 buffers, their block
// maxima taken on the way, and are encoded from there (the codes need the block's maxima first).
template <typename P, bool L2, bool AMS, int KIND>
void update_int4_block(const adabelief_tensor& t, int64_t b, const Coefficients<F8>& c) {
  P* p = static_cast<P*>(t.param) + b;
  const P* g = static_cast<const P*>(t.grad) + b;
  uint8_t* m_codes = static_cast<uint8_t*>(t.exp_avg) + b / 2;
  uint8_t* s_codes = static_cast<uint8_t*>(t.exp_avg_var) + b / 2;
  uint8_t* max_codes = AMS ? static_cast<uint8_t*>(t.max_exp_avg_var) + b / 2 : nullptr;
  const int64_t block = b / kInt4Block;
  const Table16 signed_nibble(kSignedMap.nibble), belief_nibble(kBeliefMap.nibble);
  const __m256 m_scale = _mm256_set1_ps(t.exp_avg_scale[block]);
  const __m256 s_scale = _mm256_set1_ps(t.exp_avg_var_scale[block]);
  const __m256 max_scale = _mm256_set1_ps(AMS ? t.max_exp_avg_var_scale[block] : 0.0f);
  float avgs[kInt4Block], vars[kInt4Block], max_vars[AMS ? kInt4Block : 1];
  __m256i avg_max = _mm256_setzero_si256(), var_max = avg_max, max_var_max = avg_max;
  for (int64_t j = 0; j < kInt4Block; j += 8) {
    F8 param = load8(p + j), avg = decode_int4(signed_nibble, m_codes + j / 2, m_scale);
    F8 var = decode_int4(belief_nibble, s_codes + j / 2, s_scale);
    F8 max_var = AMS ? decode_int4(belief_nibble, max_codes + j / 2, max_scale) : zero8();
    F8 root = zero8();
    belief_step<L2, AMS, KIND>(param, load8(g + j), avg, var, max_var, root, c);
    store8(p + j, param);
    avg_max = store_and_max(avgs + j, avg, avg_max);
    var_max = store_and_belief_max(vars + j, var, var_max);
    if (AMS) max_var_max = store_and_belief_max(max_vars + j, max_var, max_var_max);
  }
  encode_int4<true>(avgs, vars, kInt4Block, int4_max<false>(avg_max, avgs, kInt4Block),
                    int4_max<true>(var_max, vars, kInt4Block), t.step_key, m_codes, s_codes,
                    t.exp_avg_scale + block, t.exp_avg_var_scale + block);
  if (AMS) {
    encode_int4<false>(max_vars, nullptr, kInt4Block,
                       int4_max<true>(max_var_max, max_vars, kInt4Block), 0.0f, t.step_key,
                       max_codes, nullptr, t.max_exp_avg_var_scale + block, nullptr);
  }
}
#endif

}  // namespace
