// AVX2 + FMA + F16C instance of the CPU optimizer kernels. The pragma must precede every include
// so the whole unit (and only it) is compiled for AVX2; optim_cpu.cpp calls it after a CPU check.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,f16c")

#include "common/cpu_vec_avx2.h"
#include "optim/optim_cpu_kernels.h"

namespace bigkernels::optim::cpu {
const Kernels& avx2_kernels() {
  static const Kernels k{"avx2", adam_any<Vec8>, sgd_any<Vec8>, sum_of_squares_any<Vec8>};
  return k;
}
}  // namespace bigkernels::optim::cpu
#else
#include "optim/optim_cpu.h"
namespace bigkernels::optim::cpu {
const Kernels& avx2_kernels() { return scalar_kernels(); }  // not an x86 CPU: never chosen
}  // namespace bigkernels::optim::cpu
#endif
