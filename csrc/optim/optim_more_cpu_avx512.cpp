// AVX-512 (F/BW/VL/DQ + FMA + F16C) instance of the RMSprop / Lion / Adafactor CPU kernels (see
// optim_cpu_avx512.cpp).
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

// GCC 12 warns about the _mm512_undefined_* inside avx512fintrin.h's lane reductions (a false
// positive, reached through SquareSum::flush).
#pragma GCC diagnostic ignored "-Wuninitialized"
#include "common/cpu_vec_avx512.h"
#include "optim/optim_more_cpu_kernels.h"

namespace bigkernels::optim::cpu {
const MoreKernels& more_avx512_kernels() {
  static const MoreKernels k = make_more_kernels<Vec16>("avx512");
  return k;
}
}  // namespace bigkernels::optim::cpu
#else
#include "optim/optim_more_cpu.h"
namespace bigkernels::optim::cpu {
const MoreKernels& more_avx512_kernels() { return more_scalar_kernels(); }  // not an x86 CPU: never chosen
}  // namespace bigkernels::optim::cpu
#endif
