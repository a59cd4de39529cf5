// Baseline (no SIMD assumption) instance of the CPU sparse kernels: one lane.
#include "sparse/sparse_cpu_kernels.h"

namespace bigkernels::sparse::cpu {
const Kernels& scalar_kernels() {
  static const Kernels k = make_kernels<ScalarIsa>("scalar");
  return k;
}
}  // namespace bigkernels::sparse::cpu
