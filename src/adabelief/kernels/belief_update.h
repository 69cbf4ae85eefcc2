// The per-element update (docs/algorithm.md), written once over a lane type (lanes.h).
//
// Arithmetic: operation for operation the reference (torch's vectorised CPU kernels):
// add(alpha=a) is fma(b, a, x), addcmul(value=v) is fma(v*b, c, x), addcdiv(value=v) is
// x + (v*b)/c; nothing else is contracted (-ffp-contract=off). std::sqrt is correctly rounded;
// torch's CPU sqrt is not always, so results differ from the single-tensor path by an ulp now and
// then. 16-bit parameters are widened to float32 and rounded back to nearest even, as copy_ does.
#pragma once

#include <type_traits>

#include "abi.h"
#include "lanes.h"
#include "master_weights.h"

namespace {

constexpr int kAdaptive = ADABELIEF_KIND_ADAPTIVE;
constexpr int kMomentum = ADABELIEF_KIND_MOMENTUM;
constexpr int kNoStep = ADABELIEF_KIND_NO_STEP;

// The step's coefficients in the lane type (each rounded from double once, as T(x)).
template <typename V> struct Coefficients {
  V beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, weight_decay, gradient_factor;
  V neg_step, bc2;
  Coefficients(const adabelief_options& o, double step_size, double sqrt_bc2)
      : beta1(broadcast<V>(o.beta1)), one_minus_beta1(broadcast<V>(1.0 - o.beta1)),
        beta2(broadcast<V>(o.beta2)), one_minus_beta2(broadcast<V>(1.0 - o.beta2)),
        eps(broadcast<V>(o.eps)), decay(broadcast<V>(o.decay)),
        weight_decay(broadcast<V>(o.weight_decay)),
        gradient_factor(broadcast<V>(o.gradient_factor)), neg_step(broadcast<V>(-step_size)),
        bc2(broadcast<V>(sqrt_bc2)) {}
};

// The update in place on the lanes of param, avg (exp_avg), var (exp_avg_var) and, with AMSGrad,
// max_var; grad is the raw gradient. For the adaptive kind, root receives the square root of the
// belief (var, or max_var with AMSGrad), which the int8 encoder needs too.
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

// The master weight of a 16-bit parameter (master_weights.h): the residual codes or float32
// master (indexed as the parameter), and the dither's step key.
struct MasterWeights {
  void* master;
  uint32_t step_key;
};

// belief_step over elements [begin, end): on the moments themselves for the fp32 format, on a
// block of decoded float32 moments for the compressed ones. With ROOTS (the adaptive kind only),
// belief_root receives the square roots of the belief. With a MASTER mode other than round
// (16-bit parameters only), the update starts from the master and splits it back.
template <typename P, bool L2, bool AMS, int KIND, bool ROOTS = false,
          typename T = typename Math<P>::T, int MASTER = kMasterRound>
void update_range(P* __restrict p, const P* __restrict g, T* __restrict m, T* __restrict s,
                  T* __restrict s_max, int64_t begin, int64_t end, const adabelief_options& o,
                  double step_size, double sqrt_bc2, T* __restrict belief_root = nullptr,
                  const MasterWeights& mw = {nullptr, 0}) {
  static_assert(!ROOTS || KIND == kAdaptive, "only the adaptive step takes the square root");
#if defined(__AVX2__)
  if constexpr (MASTER == kMasterResidual && std::is_same_v<P, BF16> && std::is_same_v<T, float>) {
    // bfloat16 weights with a residual: 8 elements at a time, on F8 lanes (the same bits).
    const Coefficients<F8> c8(o, step_size, sqrt_bc2);
    const __m256i key = _mm256_set1_epi32(int32_t(mw.step_key));
    int8_t* codes = static_cast<int8_t*>(mw.master);
    for (; begin + 8 <= end; begin += 8) {
      F8 param = merge_residual8(p + begin, codes + begin);
      F8 avg = load8(m + begin), var = load8(s + begin);
      F8 max_var = AMS ? load8(s_max + begin) : zero8(), root = zero8();
      belief_step<L2, AMS, KIND>(param, load8(g + begin), avg, var, max_var, root, c8);
      if (AMS) store8(s_max + begin, max_var);
      if (ROOTS) store8(belief_root + begin, root);
      store8(m + begin, avg);
      store8(s + begin, var);
      split_residual8(param, key, p + begin, codes + begin);
    }
  }
#endif
  const Coefficients<T> c(o, step_size, sqrt_bc2);
  for (int64_t i = begin; i < end; ++i) {
    T param = T(0), avg = m[i], var = s[i];
    if constexpr (MASTER != kMasterRound) {
      param = load_master<MASTER>(p, mw.master, i);
    } else {
      param = load(p, i);
    }
    T max_var = AMS ? s_max[i] : T(0), root = T(0);
    belief_step<L2, AMS, KIND>(param, load(g, i), avg, var, max_var, root, c);
    if (AMS) s_max[i] = max_var;
    if (ROOTS) belief_root[i] = root;
    m[i] = avg;
    s[i] = var;
    if constexpr (MASTER != kMasterRound) {
      store_master<MASTER>(p, mw.master, mw.step_key, i, param);
    } else {
      store(p, i, param);
    }
  }
}

}  // namespace
