// Baseline (no SIMD assumption) instance of the CPU codebook kernels: one lane, one index per step.
#include "codebook/codebook_cpu.h"
#include "common/cpu_vec.h"

namespace {
template <int BITS>
struct ScalarDec;
struct Isa {
  using V = Vec1;
  static constexpr bool kNibbleGemm = false;
  static constexpr int64_t kNibbleRows = 0;
  static void nibble_gemm(const bigkernels::codebook::cpu::GemmArgs&, int64_t, int64_t, int64_t, int64_t) {}
  static V fma(V a, V b, V c) { return V(a.x * b.x + c.x); }
  template <int BITS>
  using Dec = ScalarDec<BITS>;
};
}  // namespace

#include "codebook/codebook_cpu_kernels.h"

namespace bigkernels::codebook::cpu {
const Kernels& scalar_kernels() {
  static const Kernels k{"scalar", lut_gemm_block<Isa>, dequantize_rows<Isa>, nullptr, 0, nullptr, nullptr, nullptr};
  return k;
}
}  // namespace bigkernels::codebook::cpu
