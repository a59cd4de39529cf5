// Baseline (no SIMD assumption) instance of the CPU AdamW8bit kernels.
#include "optim/adamw8bit_cpu_kernels.h"

namespace bigkernels::optim::cpu8 {
const Kernels& scalar_kernels() {
  static const Kernels k{"scalar", adamw8bit_any<Vec1>};
  return k;
}
}  // namespace bigkernels::optim::cpu8
