// The fused AdaBelief step on the CPU: one parallel pass that reads and writes every element of
// a parameter, its gradient and its moments once, with no parameter-sized temporaries.
//
// adabelief/kernels/cpu.py builds this file with the headers beside it (all their bytes are the
// build-cache key) and calls adabelief_update through ctypes with one adabelief_call (abi.h).
// The files, by concern:
//   abi.h            the C ABI: the call and tensor structs (cpu.py mirrors them);
//   lanes.h          element loads and stores, and the lane types (float, double, AVX2's F8);
//   belief_update.h  the per-element update, written once over a lane type (docs/algorithm.md);
//   dither.h         the hashed dither of the stochastic rounding (format version 2);
//   codes_bf16.h     the bfloat16 format;
//   codes_int8.h     the block-wise int8 format (its decoding written once, over lanes);
//   codes_int4.h     the block-wise int4 format (two codes per byte);
//   master_weights.h the master weights of 16-bit parameters (master_weights="residual", ...);
//   adabelief_cpu.cpp  this file: the dispatch over dtype, format and options, the threads.
//
// Compressed moments (adabelief/compressed_state.py is the reference) use the same hashed dither
// as the reference, so a resumed run is bit-identical and needs no RNG state. They are decoded,
// updated and encoded a block at a time (256 elements; int4: its 128-element block), through
// float32 buffers on the stack that stay in the L1 cache. On AVX2, with float32 and bfloat16
// parameters, the update runs on F8 lanes and the buffers are mostly skipped: bfloat16 moments
// are stepped 16 elements at a time in registers (update_bf16_lanes); int8 and int4 blocks are
// decoded and updated in registers, and only the values to encode go through buffers, their block
// maxima taken on the way, since the codes need them first (update_int8_block,
// update_int4_block). A build without AVX2 takes the portable loops, with the same results
// (tests/test_compressed_kernels.py checks both against the reference).

#include <atomic>
#include <cstdint>
#include <type_traits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "abi.h"
#include "belief_update.h"
#include "codes_bf16.h"
#include "codes_int4.h"
#include "codes_int8.h"
#include "lanes.h"

namespace {

// The elements the portable loops decode, update and encode at a time: a block of the format.
template <int FORMAT>
constexpr int64_t kTile = FORMAT == ADABELIEF_STATE_INT4 ? kInt4Block : kBlock;
static_assert(kInt4Block <= kBlock, "the portable loops' buffers hold kBlock elements");

// The compressed formats, up to kTile elements at a time (for int8 and int4, b is a multiple of
// their block): decode the moments into float32 buffers on the stack, update, encode. Each of the
// three loops is short and vectorises; the buffers stay in the L1 cache.
template <int FORMAT, bool AMS>
void decode_block(const adabelief_tensor& t, int64_t b, int64_t n, float* m, float* s,
                  float* s_max) {
  if constexpr (FORMAT == ADABELIEF_STATE_BF16) {
    decode_bf16(static_cast<const uint16_t*>(t.exp_avg) + b, n, m);
    decode_bf16(static_cast<const uint16_t*>(t.exp_avg_var) + b, n, s);
    if (AMS) decode_bf16(static_cast<const uint16_t*>(t.max_exp_avg_var) + b, n, s_max);
  } else if constexpr (FORMAT == ADABELIEF_STATE_INT4) {  // n is even: whole bytes
    const int64_t block = b / kInt4Block;
    decode_int4_block<false>(static_cast<const uint8_t*>(t.exp_avg) + b / 2,
                             t.exp_avg_scale[block], n, m);
    decode_int4_block<true>(static_cast<const uint8_t*>(t.exp_avg_var) + b / 2,
                            t.exp_avg_var_scale[block], n, s);
    if (AMS) {
      decode_int4_block<true>(static_cast<const uint8_t*>(t.max_exp_avg_var) + b / 2,
                              t.max_exp_avg_var_scale[block], n, s_max);
    }
  } else {
    const int64_t block = b / kBlock;
    decode_int8_block<true>(static_cast<const int8_t*>(t.exp_avg) + b, t.exp_avg_scale[block], n,
                            m);
    decode_int8_block<false>(static_cast<const uint8_t*>(t.exp_avg_var) + b,
                             t.exp_avg_var_scale[block], n, s);
    if (AMS) {
      decode_int8_block<false>(static_cast<const uint8_t*>(t.max_exp_avg_var) + b,
                               t.max_exp_avg_var_scale[block], n, s_max);
    }
  }
}

// ``belief_root``: with ROOTS, the square roots of the belief that the update took (int8 only):
// those of exp_avg_var, or with AMSGrad of its maximum, which need not be taken again.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push  // GCC 12 at -O1 cannot see that square_roots fills ``roots``
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
template <int FORMAT, bool AMS, bool ROOTS>
void encode_block(const adabelief_tensor& t, int64_t b, int64_t n, const float* m, const float* s,
                  const float* s_max, const float* belief_root) {
  if constexpr (FORMAT == ADABELIEF_STATE_BF16) {
    encode_bf16<true>(m, s, n, t.step_key, static_cast<uint16_t*>(t.exp_avg) + b,
                      static_cast<uint16_t*>(t.exp_avg_var) + b);
    if (AMS) {
      encode_bf16<false>(s_max, nullptr, n, t.step_key,
                         static_cast<uint16_t*>(t.max_exp_avg_var) + b, nullptr);
    }
  } else if constexpr (FORMAT == ADABELIEF_STATE_INT4) {  // the values themselves, not roots
    const int64_t block = b / kInt4Block;
    encode_int4<true>(m, s, n, int4_block_max<false>(m, n), int4_block_max<true>(s, n),
                      t.step_key, static_cast<uint8_t*>(t.exp_avg) + b / 2,
                      static_cast<uint8_t*>(t.exp_avg_var) + b / 2, t.exp_avg_scale + block,
                      t.exp_avg_var_scale + block);
    if (AMS) {
      encode_int4<false>(s_max, nullptr, n, int4_block_max<true>(s_max, n), 0.0f, t.step_key,
                         static_cast<uint8_t*>(t.max_exp_avg_var) + b / 2, nullptr,
                         t.max_exp_avg_var_scale + block, nullptr);
    }
  } else {
    const int64_t block = b / kBlock;
    float roots[kBlock];
    const float* s_roots = !ROOTS || AMS ? square_roots(s, n, roots) : belief_root;
    encode_int8<true>(m, s_roots, n, block_absmax(m, n), block_absmax(s_roots, n), t.step_key,
                      static_cast<int8_t*>(t.exp_avg) + b,
                      static_cast<uint8_t*>(t.exp_avg_var) + b, t.exp_avg_scale + block,
                      t.exp_avg_var_scale + block);
    if (AMS) {
      const float* max_roots = ROOTS ? belief_root : square_roots(s_max, n, roots);
      encode_int8<false>(max_roots, nullptr, n, block_absmax(max_roots, n), 0.0f, t.step_key,
                         static_cast<uint8_t*>(t.max_exp_avg_var) + b, nullptr,
                         t.max_exp_avg_var_scale + block, nullptr);
    }
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

using Fn = void (*)(const adabelief_tensor&, int64_t, int64_t, const adabelief_options&, int);

template <typename P>
constexpr bool kSixteenBit = std::is_same_v<P, BF16> || std::is_same_v<P, F16>;

// The portable loops: update_range on the fp32 moments, or on blocks of decoded compressed ones.
// With a MASTER mode, the parameters' master weights (master_weights.h; 16-bit types only).
template <typename P, int FORMAT, bool L2, bool AMS, int KIND, int MASTER>
void update_portable(const adabelief_tensor& t, int64_t begin, int64_t end,
                     const adabelief_options& o, const MasterWeights& mw) {
  using T = typename Math<P>::T;
  P* p = static_cast<P*>(t.param);
  const P* g = static_cast<const P*>(t.grad);
  if constexpr (FORMAT == ADABELIEF_STATE_FP32) {
    update_range<P, L2, AMS, KIND, false, T, MASTER>(
        p, g, static_cast<T*>(t.exp_avg), static_cast<T*>(t.exp_avg_var),
        static_cast<T*>(t.max_exp_avg_var), begin, end, o, t.step_size, t.sqrt_bc2, nullptr, mw);
  } else {
    constexpr bool roots = FORMAT == ADABELIEF_STATE_INT8 && KIND == kAdaptive;
    constexpr int64_t tile = kTile<FORMAT>;
    float m[tile], s[tile], s_max[tile], belief_root[roots ? tile : 1];
    for (int64_t b = begin; b < end; b += tile) {
      const int64_t n = end - b < tile ? end - b : tile;
      decode_block<FORMAT, AMS>(t, b, n, m, s, s_max);
      const MasterWeights at{master_at<MASTER>(mw.master, b), mw.step_key};
      update_range<P, L2, AMS, KIND, roots, float, MASTER>(
          p + b, g + b, m, s, s_max, 0, n, o, t.step_size, t.sqrt_bc2, belief_root, at);
      encode_block<FORMAT, AMS, roots>(t, b, n, m, s, s_max, belief_root);
    }
  }
}

template <typename P, int FORMAT, bool L2, bool AMS, int KIND>
void update_erased(const adabelief_tensor& t, int64_t begin, int64_t end,
                   const adabelief_options& o, int master) {
  if constexpr (kSixteenBit<P>) {  // master weights: on the portable loops
    const MasterWeights mw{t.master, t.step_key};
    switch (master) {
      case kMasterResidual:
        return update_portable<P, FORMAT, L2, AMS, KIND, kMasterResidual>(t, begin, end, o, mw);
      case kMasterFp32:
        return update_portable<P, FORMAT, L2, AMS, KIND, kMasterFp32>(t, begin, end, o, mw);
      case kMasterStochastic:
        return update_portable<P, FORMAT, L2, AMS, KIND, kMasterStochastic>(t, begin, end, o, mw);
      default:
        break;
    }
  }
#if defined(__AVX2__)
  if constexpr (FORMAT != ADABELIEF_STATE_FP32 &&
                (std::is_same_v<P, float> || std::is_same_v<P, BF16>)) {
    const Coefficients<F8> c(o, t.step_size, t.sqrt_bc2);
    if constexpr (FORMAT == ADABELIEF_STATE_BF16) {
      begin = update_bf16_lanes<P, L2, AMS, KIND>(t, begin, end, c);
    } else if constexpr (FORMAT == ADABELIEF_STATE_INT4) {
      for (; begin + kInt4Block <= end; begin += kInt4Block) {
        update_int4_block<P, L2, AMS, KIND>(t, begin, c);
      }
    } else {
      for (; begin + kBlock <= end; begin += kBlock) {
        update_int8_block<P, L2, AMS, KIND>(t, begin, c);
      }
    }
  }
#endif
  update_portable<P, FORMAT, L2, AMS, KIND, kMasterRound>(t, begin, end, o, {nullptr, 0});
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
    case ADABELIEF_STATE_INT4: return pick_flags<P, ADABELIEF_STATE_INT4>(l2, ams, kind);
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
// Each chunk, and so each thread's work, is whole blocks (and int4's whole bytes): no block's scale
// or byte is written by two threads.
static_assert(kChunk % kBlock == 0, "int8 blocks must not straddle chunks");
static_assert(kChunk % kInt4Block == 0 && kInt4Block % 2 == 0, "nor int4 blocks or bytes");

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

// 1 when the compressed formats run on AVX2 vectors (built for a CPU that has them).
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

// One step of call->n tensors (abi.h). Returns 0, or 1 for a dtype/format pair that has no
// kernel or an unknown master_weights mode.
int adabelief_update(const adabelief_call* call) {
  if (pick(call->dtype, call->format, false, false, kAdaptive) == nullptr) return 1;
  if (call->master_weights < kMasterRound || call->master_weights > kMasterStochastic) return 1;
  const adabelief_tensor* tensors = call->tensors;
  const int64_t n = call->n;
  std::vector<int64_t> work;  // (tensor, first element) of each chunk
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    total += tensors[i].numel;
    for (int64_t b = 0; b < tensors[i].numel; b += kChunk) {
      work.push_back(i);
      work.push_back(b);
    }
  }
  const int64_t chunks = int64_t(work.size() / 2);
  // A thread only where it gets enough elements to pay for waking it.
  int num_threads = call->num_threads;
  if (int64_t(num_threads) > total / kMinPerThread) num_threads = int(total / kMinPerThread);
  if (num_threads < 1) num_threads = 1;
  auto run = [&](int64_t c) {
    const adabelief_tensor& t = tensors[work[size_t(2 * c)]];
    const int64_t begin = work[size_t(2 * c + 1)];
    const int64_t end = begin + kChunk < t.numel ? begin + kChunk : t.numel;
    const Fn fn = pick(call->dtype, call->format, call->l2 != 0, call->amsgrad != 0, t.kind);
    fn(t, begin, end, call->options, call->master_weights);
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
