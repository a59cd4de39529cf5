// Pointer-level interface of the CPU optimizer kernels (no torch headers): one instance per
// instruction set, chosen at run time by the binding in optim_cpu.cpp.
#pragma once

#include <cstdint>

namespace bigkernels::optim::cpu {

enum class DType { f32, f16, bf16 };

// Per-tensor scalars of one Adam step; maths in fp32 whatever the storage dtype.
// Differences such as 1 - beta2 are taken in double by the binding (as torch does): in fp32,
// 1 - float(0.999) is off by 1.3e-5 relative, which shows after a few steps.
struct AdamArgs {
  float lr, beta1, one_minus_beta1, beta2, one_minus_beta2, weight_decay, eps;
  float decay;          // 1 - lr * weight_decay (AdamW)
  float grad_mult;      // 1/grad_scale * clip coefficient
  float step_size;      // lr / (1 - beta1^step)
  float bc2_sqrt;       // sqrt(1 - beta2^step)
  bool amsgrad, maximize, decoupled;
};

struct SgdArgs {
  float lr, momentum, one_minus_dampening, weight_decay, grad_mult;
  bool nesterov, maximize, first_step, has_momentum;
};

// One element range [0, n) of one tensor. `keep` (or nullptr): the params' pruning mask, one byte
// per element; params are stored as +0 where it is 0, in the same pass.
struct Kernels {
  const char* isa;
  void (*adam)(DType, void* p, const void* g, void* m, void* v, void* vmax, const uint8_t* keep, int64_t n,
               const AdamArgs&);
  void (*sgd)(DType, void* p, const void* g, void* buf, const uint8_t* keep, int64_t n, const SgdArgs&);
  double (*sum_of_squares)(DType, const void* x, int64_t n);
};

const Kernels& scalar_kernels();
const Kernels& avx2_kernels();
const Kernels& avx512_kernels();
const Kernels& avx512_bf16_kernels();
// The widest the CPU has: avx512_bf16, avx512, avx2 (AVX2+FMA+F16C), scalar.
// BIGKERNELS_CPU_ISA=scalar|avx2|avx512|avx512_bf16 caps the choice at that level (a level the CPU
// lacks falls to the best one below it).
const Kernels& best_kernels();

}  // namespace bigkernels::optim::cpu
