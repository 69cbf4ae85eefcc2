// The bfloat16 format (compressed_state's reference): the moments stored as bfloat16, rounded
// stochastically: a 16-bit dither (dither.h) added to the float32 bits, which are then
// truncated. A non-finite result (of an inf or NaN, or of a value that rounds past the largest
// bfloat16) takes round-to-nearest-even instead.
#pragma once

#include "abi.h"
#include "belief_update.h"
#include "dither.h"
#include "lanes.h"

namespace {

inline void decode_bf16(const uint16_t* bits, int64_t n, float* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = from_bits(uint32_t(bits[j]) << 16);
}

// Those are rare, so the vectorised loops only note that a group has one, and this redoes the
// group.
inline void redo_non_finite(const float* values, int64_t n, uint16_t* bits) {
  for (int64_t k = 0; k < n; ++k) {
    if (non_finite_bf16(bits[k])) bits[k] = bf16_nearest(values[k]);
  }
}

#if defined(__AVX2__)
// round_bf16 of 16 values (two F8) with their dithers (16 bits in 32-bit lanes) into bits, in
// element order; returns all ones in the 16-bit lanes that hold a non-finite result.
inline __m256i round16(const F8 (&values)[2], const __m256i (&dither)[2], uint16_t* bits) {
  const __m256i a = _mm256_srli_epi32(
      _mm256_add_epi32(_mm256_castps_si256(values[0].v), dither[0]), 16);
  const __m256i b = _mm256_srli_epi32(
      _mm256_add_epi32(_mm256_castps_si256(values[1].v), dither[1]), 16);
  // packus interleaves the two by 128-bit lane; permute4x64 puts them in order.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xd8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(bits), packed);
  const __m256i exponent = _mm256_set1_epi16(0x7f80);
  return _mm256_cmpeq_epi16(_mm256_and_si256(packed, exponent), exponent);
}

inline void redo16(const F8 (&values)[2], uint16_t* bits) {
  float spilled[16];
  _mm256_storeu_ps(spilled, values[0].v);
  _mm256_storeu_ps(spilled + 8, values[1].v);
  redo_non_finite(spilled, 16, bits);
}
#endif

// The bfloat16 bits of n values a (and b, with PAIR: the two moments that share a hash; without,
// a is the AMSGrad maximum, hashed alone).
template <bool PAIR>
inline void encode_bf16(const float* a, const float* b, int64_t n, uint32_t step_key,
                        uint16_t* a_bits, uint16_t* b_bits) {
  uint32_t non_finite = 0;
  int64_t j = 0;
#if defined(__AVX2__)
  {
    const __m256i key = _mm256_set1_epi32(int32_t(step_key));
    __m256i flags = _mm256_setzero_si256();
    for (; j + 16 <= n; j += 16) {
      const F8 as[2] = {load8(a + j), load8(a + j + 8)};
      const F8 bs[2] = {PAIR ? load8(b + j) : zero8(), PAIR ? load8(b + j + 8) : zero8()};
      const __m256i h[2] = {pair_hash(as[0], bs[0], key), pair_hash(as[1], bs[1], key)};
      const __m256i low[2] = {low16(h[0]), low16(h[1])};
      flags = _mm256_or_si256(flags, round16(as, low, a_bits + j));
      if (PAIR) {
        const __m256i high[2] = {high16(h[0]), high16(h[1])};
        flags = _mm256_or_si256(flags, round16(bs, high, b_bits + j));
      }
    }
    non_finite = uint32_t(!_mm256_testz_si256(flags, flags));
  }
#endif
  for (; j < n; ++j) {
    const uint32_t h = pair_hash(a[j], PAIR ? b[j] : 0.0f, step_key);
    const uint32_t rounded = round_bf16(a[j], h & 0xffffu);
    non_finite |= uint32_t(non_finite_bf16(rounded));
    a_bits[j] = uint16_t(rounded);
    if (PAIR) {
      const uint32_t other = round_bf16(b[j], h >> 16);
      non_finite |= uint32_t(non_finite_bf16(other));
      b_bits[j] = uint16_t(other);
    }
  }
  if (non_finite != 0) {
    redo_non_finite(a, n, a_bits);
    if (PAIR) redo_non_finite(b, n, b_bits);
  }
}

#if defined(__AVX2__)
// The bfloat16 format with float32 or bfloat16 parameters, 16 elements at a time: the moments
// are widened, updated and rounded in registers (no buffers), and each moment's 16 results are
// packed into one store. Returns where it stopped: the last (end - begin) mod 16 elements are
// the caller's.
template <typename P, bool L2, bool AMS, int KIND>
int64_t update_bf16_lanes(const adabelief_tensor& t, int64_t begin, int64_t end,
                          const Coefficients<F8>& c) {
  P* p = static_cast<P*>(t.param);
  const P* g = static_cast<const P*>(t.grad);
  uint16_t* m = static_cast<uint16_t*>(t.exp_avg);
  uint16_t* s = static_cast<uint16_t*>(t.exp_avg_var);
  uint16_t* s_max = static_cast<uint16_t*>(t.max_exp_avg_var);
  const __m256i key = _mm256_set1_epi32(int32_t(t.step_key));
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    F8 avg[2], var[2], max_var[2];
    __m256i low[2], high[2], max_low[2];
    for (int k = 0; k < 2; ++k) {
      const int64_t j = i + 8 * k;
      F8 param = load8(p + j), root = zero8();
      avg[k] = F8{widen_bf16(m + j)};
      var[k] = F8{widen_bf16(s + j)};
      max_var[k] = AMS ? F8{widen_bf16(s_max + j)} : zero8();
      belief_step<L2, AMS, KIND>(param, load8(g + j), avg[k], var[k], max_var[k], root, c);
      store8(p + j, param);
      const __m256i h = pair_hash(avg[k], var[k], key);
      low[k] = low16(h);
      high[k] = high16(h);
      if (AMS) max_low[k] = low16(pair_hash(max_var[k], zero8(), key));
    }
    __m256i flags = _mm256_or_si256(round16(avg, low, m + i), round16(var, high, s + i));
    if (AMS) flags = _mm256_or_si256(flags, round16(max_var, max_low, s_max + i));
    if (!_mm256_testz_si256(flags, flags)) {
      redo16(avg, m + i);
      redo16(var, s + i);
      if (AMS) redo16(max_var, s_max + i);
    }
  }
  return i;
}
#endif

}  // namespace
