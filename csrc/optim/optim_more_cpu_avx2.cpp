// AVX2 + FMA + F16C instance of the RMSprop / Lion / Adafactor CPU kernels (see
// optim_cpu_avx2.cpp: the pragma precedes every include; called only after a CPU check).
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,f16c")

#include "common/cpu_vec_avx2.h"
#include "optim/optim_more_cpu_kernels.h"

namespace bigkernels::optim::cpu {
const MoreKernels& more_avx2_kernels() {
  static const MoreKernels k = make_more_kernels<Vec8>("avx2");
  return k;
}
}  // namespace bigkernels::optim::cpu
#else
#include "optim/optim_more_cpu.h"
namespace bigkernels::optim::cpu {
const MoreKernels& more_avx2_kernels() { return more_scalar_kernels(); }  // not an x86 CPU: never chosen
}  // namespace bigkernels::optim::cpu
#endif
