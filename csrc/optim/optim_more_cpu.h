// Pointer-level interface of the CPU kernels of fused_rmsprop_, fused_lion_ and fused_adafactor_
// (no torch headers): one instance per instruction set, the same levels as optim_cpu.h's Kernels
// (best_more_kernels() takes the level best_kernels() chose). Maths in fp32 whatever the storage.
#pragma once

#include <cstdint>

#include "optim/optim_cpu.h"

namespace bigkernels::optim::cpu {

struct RmspropArgs {
  float lr, alpha, one_minus_alpha, eps, weight_decay, momentum;
  float grad_mult;  // 1/grad_scale * clip coefficient, negated for maximize
  bool centered, has_momentum;
};

struct LionArgs {
  float lr, beta1, one_minus_beta1, beta2, one_minus_beta2;
  float decay;      // 1 - lr * weight_decay (exactly 1 without weight decay)
  float grad_mult;  // negated for maximize
};

// Adafactor, one param tensor. Factored params are a batch of rows x cols matrices; the kernels
// see a run of whole rows of one matrix. `lerp_w` is 1 - beta2_t = t^beta2_decay; torch.lerp's
// formula switches at w = 0.5.
struct AdafactorArgs {
  float grad_mult;   // for the statistics (its sign does not matter there)
  float apply_mult;  // grad_mult, negated for maximize
  float lerp_w, lerp_one_minus_w;
  bool lerp_small;   // lerp_w < 0.5
  float eps1_sq;     // vectors: V clamped to eps1^2 before the reciprocal square root
  float inv_eps1;    // factored: 1/sqrt(max(V, eps1^2)) = min(row_scale * col_scale, 1/eps1)
  float decay;       // 1 - lr * weight_decay
  float step;        // alpha / max(1, RMS(U) / d): what multiplies U in the update
};

struct MoreKernels {
  const char* isa;
  void (*rmsprop)(DType, void* p, const void* g, void* sq, void* ga, void* buf, const uint8_t* keep, int64_t n,
                  const RmspropArgs&);
  void (*lion)(DType, void* p, const void* g, void* m, const uint8_t* keep, int64_t n, const LionArgs&);
  // Factored pass 1 over `rows` rows of `cols`: row_sums[r] = sum_c (g mult)^2 (written),
  // col_sums[c] += (g mult)^2 (accumulated); returns sum p^2.
  double (*adafactor_stats)(DType, const void* g, const void* p, double* row_sums, float* col_sums, int64_t rows,
                            int64_t cols, const AdafactorArgs&);
  // Factored pass 2: sum of U^2, U = g mult min(row_scale[r] col_scale[c], 1/eps1).
  double (*adafactor_update_sq)(DType, const void* g, const float* row_scale, const float* col_scale, int64_t rows,
                                int64_t cols, const AdafactorArgs&);
  // Factored pass 3: p = p decay - step U (pruned elements stored as 0 when keep is given).
  void (*adafactor_apply)(DType, void* p, const void* g, const float* row_scale, const float* col_scale,
                          const uint8_t* keep, int64_t rows, int64_t cols, const AdafactorArgs&);
  // Vectors pass 1 over n elements (variance not written): sums[0] += sum p^2, sums[1] += sum U^2
  // with v' = lerp(v, g^2, w), U = g / sqrt(max(v', eps1^2)).
  void (*adafactor_vec_stats)(DType, const void* g, const void* v, const void* p, int64_t n, const AdafactorArgs&,
                              double* sums);
  // Vectors pass 2: v = v' (as pass 1), p = p decay - step U.
  void (*adafactor_vec_apply)(DType, void* p, const void* g, void* v, const uint8_t* keep, int64_t n,
                              const AdafactorArgs&);
};

const MoreKernels& more_scalar_kernels();
const MoreKernels& more_avx2_kernels();
const MoreKernels& more_avx512_kernels();
const MoreKernels& more_avx512_bf16_kernels();
// The instance of the level best_kernels() picks (CPU features, BIGKERNELS_CPU_ISA).
const MoreKernels& best_more_kernels();

}  // namespace bigkernels::optim::cpu
