// Baseline (no SIMD assumption) instance of the CPU optimizer kernels.
#include "optim/optim_cpu_kernels.h"

namespace bigkernels::optim::cpu {
const Kernels& scalar_kernels() {
  static const Kernels k{"scalar", adam_any<Vec1>, sgd_any<Vec1>, sum_of_squares_any<Vec1>};
  return k;
}
}  // namespace bigkernels::optim::cpu
