// Baseline (no SIMD assumption) instance of the CPU distillation kernel: the C library's exp.
#include "distill/distill_cpu_kernels.h"

namespace bigkernels::distill::cpu {
const Kernels& scalar_kernels() {
  static const Kernels k{"scalar", kd_rows_any<ScalarIsa>};
  return k;
}
}  // namespace bigkernels::distill::cpu
