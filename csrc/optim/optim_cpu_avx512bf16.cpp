// AVX-512 + AVX512_BF16 instance of the CPU optimizer kernels: optim_cpu_avx512.cpp with bf16
// stores by vcvtneps2bf16 (see cpu_vec_avx512.h). The pragma must precede every include.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#define BIGKERNELS_AVX512_BF16 1

#include "common/cpu_vec_avx512.h"
#include "optim/optim_cpu_kernels.h"

namespace bigkernels::optim::cpu {
const Kernels& avx512_bf16_kernels() {
  static const Kernels k{"avx512_bf16", adam_any<Vec16>, sgd_any<Vec16>, sum_of_squares_any<Vec16>};
  return k;
}
}  // namespace bigkernels::optim::cpu
#else
#include "optim/optim_cpu.h"
namespace bigkernels::optim::cpu {
const Kernels& avx512_bf16_kernels() { return scalar_kernels(); }  // not an x86 CPU: never chosen
}  // namespace bigkernels::optim::cpu
#endif
