// The dither of the compressed formats' stochastic rounding (format version 2; the reference is
// compressed_state.dithers): one 32-bit hash per element serves two moments,
//   h = mix32(bits(a) ^ rotl16(bits(b)) ^ step_key),
// a (exp_avg's coded value) taking its low 16 bits and b (exp_avg_var's) its high 16 bits; the
// AMSGrad maximum c takes the low half of pair_hash(c, +0.0f) = mix32(bits(c) ^ step_key).
#pragma once

#include "lanes.h"

namespace {

// MurmurHash3's 32-bit finalizer.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85ebca6bu;
  x ^= x >> 13;
  x *= 0xc2b2ae35u;
  return x ^ (x >> 16);
}

inline uint32_t pair_hash(float a, float b, uint32_t step_key) {
  const uint32_t v = to_bits(b);
  return mix32(to_bits(a) ^ ((v << 16) | (v >> 16)) ^ step_key);
}

// Stochastic rounding to bfloat16 (the moments' bf16 format, and master_weights="stochastic"):
// the 16-bit dither added to the float32 bits, which are then truncated. A non-finite result
// (non_finite_bf16) is redone with round-to-nearest-even by the caller.
inline uint32_t round_bf16(float v, uint32_t dither) { return (to_bits(v) + dither) >> 16; }

inline bool non_finite_bf16(uint32_t bits) { return (bits & 0x7f80u) == 0x7f80u; }

#if defined(__AVX2__)
inline __m256i mix32(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(int32_t(0x85ebca6bu)));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 13));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(int32_t(0xc2b2ae35u)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

// pair_hash on 8 lanes (rotl16: one byte shuffle that swaps each lane's 16-bit halves).
inline __m256i pair_hash(F8 a, F8 b, __m256i step_key) {
  const __m256i swap = _mm256_setr_epi8(2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13, 2,
                                        3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  const __m256i rotated = _mm256_shuffle_epi8(_mm256_castps_si256(b.v), swap);
  return mix32(_mm256_xor_si256(_mm256_xor_si256(_mm256_castps_si256(a.v), rotated), step_key));
}
inline __m256i low16(__m256i h) { return _mm256_and_si256(h, _mm256_set1_epi32(0xffff)); }
inline __m256i high16(__m256i h) { return _mm256_srli_epi32(h, 16); }
#endif

}  // namespace
