// The kernel's C ABI: one call is one adabelief_call, which cpu.py builds as a ctypes.Structure
// (_Call and _Tensor there mirror these two structs field for field). The constants (dtype codes,
// state formats, step kinds, the int8 and int4 block sizes and code-map powers,
// ADABELIEF_ABI_VERSION) are cpu.py's CPU_ABI table, passed to the compiler as macros. Version 5
// added the master weights (tensor.master, call.master_weights, which took the place of a
// reserved 0). Version 6 added the int4 format (ADABELIEF_STATE_INT4, ADABELIEF_INT4_BLOCK and its
// code maps' powers; the structs are unchanged: int4 codes and scales take the int8 fields).
#pragma once

#include <cstdint>

#if !defined(ADABELIEF_ABI_VERSION) || !defined(ADABELIEF_DTYPE_FLOAT32) ||     \
    !defined(ADABELIEF_DTYPE_FLOAT64) || !defined(ADABELIEF_DTYPE_BFLOAT16) ||  \
    !defined(ADABELIEF_DTYPE_FLOAT16) || !defined(ADABELIEF_STATE_FP32) ||      \
    !defined(ADABELIEF_STATE_BF16) || !defined(ADABELIEF_STATE_INT8) ||         \
    !defined(ADABELIEF_KIND_ADAPTIVE) || !defined(ADABELIEF_KIND_MOMENTUM) ||   \
    !defined(ADABELIEF_KIND_NO_STEP) || !defined(ADABELIEF_INT8_BLOCK) ||       \
    !defined(ADABELIEF_MASTER_ROUND) || !defined(ADABELIEF_MASTER_RESIDUAL) ||  \
    !defined(ADABELIEF_MASTER_FP32) || !defined(ADABELIEF_MASTER_STOCHASTIC) || \
    !defined(ADABELIEF_STATE_INT4) || !defined(ADABELIEF_INT4_BLOCK) ||         \
    !defined(ADABELIEF_INT4_SIGNED_POWER) || !defined(ADABELIEF_INT4_BELIEF_POWER)
#error "build through adabelief/kernels/cpu.py, which defines the ABI macros"
#endif

extern "C" {

// One tensor: its operands and its step scalars.
struct adabelief_tensor {
  void* param;
  const void* grad;
  void* exp_avg;                 // float32 (float64 for float64 parameters), bfloat16, int8
                                 // codes, or int4 codes (uint8, two per byte)
  void* exp_avg_var;             // the same, or uint8 codes for int8
  void* max_exp_avg_var;         // AMSGrad only
  float* exp_avg_scale;          // int8 and int4 only: one scale per block
  float* exp_avg_var_scale;      // int8 and int4 only
  float* max_exp_avg_var_scale;  // int8 and int4 with AMSGrad only
  int64_t numel;                 // elements (complex tensors count their real and imaginary parts)
  double step_size;
  double sqrt_bc2;               // sqrt(1 - beta2^step)
  uint32_t step_key;             // the dither's step key (compressed_state.step_key)
  int32_t kind;                  // ADABELIEF_KIND_*
  void* master;                  // 16-bit parameters: int8 residual codes (MASTER_RESIDUAL) or
                                 // the float32 master (MASTER_FP32); else null
};

// The hyperparameters shared by the tensors of a call.
struct adabelief_options {
  // gradient_factor: +-1/grad_scale (- to maximize), a power of two, so g * factor is exactly
  // (+-g) / grad_scale (the caller divides beforehand when the scale is not a power of two).
  double beta1, beta2, eps, decay, weight_decay, gradient_factor;
};

// One step of n tensors of one parameter dtype and one state format.
struct adabelief_call {
  int32_t dtype;   // ADABELIEF_DTYPE_*
  int32_t format;  // ADABELIEF_STATE_*
  int32_t l2;      // weight decay added to the gradient (else decoupled, through options.decay)
  int32_t amsgrad;
  int32_t num_threads;
  int32_t master_weights;  // ADABELIEF_MASTER_* (ROUND for 32- and 64-bit parameters)
  int64_t n;
  adabelief_tensor* tensors;
  adabelief_options options;
};

}  // extern "C"
