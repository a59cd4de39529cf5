// AVX2 + FMA + F16C instance of the CPU distillation kernel: 8 lanes, poly_exp with 2^n built in
// the exponent bits. The pragma must precede every include; distill_cpu.cpp calls this unit only
// after a CPU check.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,f16c")

#include <immintrin.h>

#include "common/cpu_vec_avx2.h"

namespace {
struct Isa {
  using V = Vec8;
  static V clamp(V x, V lo, V hi) { return V(_mm256_min_ps(hi.x, _mm256_max_ps(lo.x, x.x))); }  // keeps NaN
  static V round(V x) { return V(_mm256_round_ps(x.x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)); }
  static V scale2n(V p, V n) {  // p * 2^n for integral n in [-126, 127], built in the exponent bits
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.x), _mm256_set1_epi32(127)), 23);
    return V(_mm256_mul_ps(p.x, _mm256_castsi256_ps(e)));
  }
  static V zero_below(V x, V lo, V y) { return V(_mm256_andnot_ps(_mm256_cmp_ps(x.x, lo.x, _CMP_LT_OQ), y.x)); }
  static V fma(V a, V b, V c) { return V(_mm256_fmadd_ps(a.x, b.x, c.x)); }
  static V pos_or_zero(V cond, V val) {
    return V(_mm256_and_ps(_mm256_cmp_ps(cond.x, _mm256_setzero_ps(), _CMP_GT_OQ), val.x));
  }
  static float hmax(V v) {
    alignas(32) float l[8];
    _mm256_store_ps(l, v.x);
    float m = l[0];
    for (int i = 1; i < 8; ++i) m = (m != m || m > l[i]) ? m : l[i];
    return m;
  }
};
}  // namespace

#include "distill/distill_cpu_kernels.h"

namespace bigkernels::distill::cpu {
const Kernels& avx2_kernels() {
  static const Kernels k{"avx2", kd_rows_any<Isa>};
  return k;
}
}  // namespace bigkernels::distill::cpu
#else
#include "distill/distill_cpu.h"
namespace bigkernels::distill::cpu {
const Kernels& avx2_kernels() { return scalar_kernels(); }  // not an x86 CPU: never chosen
}  // namespace bigkernels::distill::cpu
#endif
