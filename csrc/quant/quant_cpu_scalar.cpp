// Baseline (no SIMD assumption) instance of the CPU int8 kernels: one lane, one byte per step.
#include "common/cpu_vec.h"

namespace {
struct Isa {
  using V = Vec1;
  static constexpr int KW = 1;
  static constexpr bool kOffset = false;
  using A = int32_t;
  using B = int32_t;
  using Acc = uint32_t;  // wrapping sum
  static Acc zero() { return 0u; }
  static A load_a(const int8_t* p) { return *p; }
  static B load_b(const int8_t* p) { return *p; }
  static Acc dot(Acc c, A a, B b) { return c + uint32_t(a * b); }
  static uint32_t hsum(Acc c) { return c; }
  static uint32_t row_sum(const int8_t*, int64_t) { return 0u; }
  static V load_w(const int8_t* p) { return V(float(*p)); }
  static V fma(V a, V b, V c) { return V(a.x * b.x + c.x); }
  static void store_q(V t, int8_t* p);
};
}  // namespace

#include "quant/quant_cpu_kernels.h"

namespace {
void Isa::store_q(V t, int8_t* p) { store_q1(t.x, p); }
}  // namespace

namespace bigkernels::quant::cpu {
const Kernels& scalar_kernels() {
  static const Kernels k{"scalar", quantize_rows_any<Isa>, int8_gemm_block<Isa>, w8a16_gemm_block<Isa>,
                         nullptr, nullptr, nullptr, nullptr, dense_gemm_block<Isa>};
  return k;
}
}  // namespace bigkernels::quant::cpu
