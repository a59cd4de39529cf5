// AVX-512 (F/BW/VL/DQ + FMA + F16C) instance of the CPU optimizer kernels; bf16 stores by integer
// rounding. The pragma must precede every include so the whole unit (and only it) is compiled for
// AVX-512; optim_cpu.cpp calls it after a CPU check.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

#include "common/cpu_vec_avx512.h"
#include "optim/optim_cpu_kernels.h"

namespace bigkernels::optim::cpu {
const Kernels& avx512_kernels() {
  static const Kernels k{"avx512", adam_any<Vec16>, sgd_any<Vec16>, sum_of_squares_any<Vec16>};
  return k;
}
}  // namespace bigkernels::optim::cpu
#else
#include "optim/optim_cpu.h"
namespace bigkernels::optim::cpu {
const Kernels& avx512_kernels() { return scalar_kernels(); }  // not an x86 CPU: never chosen
}  // namespace bigkernels::optim::cpu
#endif
