// Baseline (no SIMD assumption) instance of the RMSprop / Lion / Adafactor CPU kernels.
#include "optim/optim_more_cpu_kernels.h"

namespace bigkernels::optim::cpu {
const MoreKernels& more_scalar_kernels() {
  static const MoreKernels k = make_more_kernels<Vec1>("scalar");
  return k;
}
}  // namespace bigkernels::optim::cpu
