// AVX2 + FMA + F16C instance of the CPU distillation kernel: 8 lanes, a polynomial exp. The
// pragma must precede every include; distill_cpu.cpp calls this unit only after a CPU check.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,f16c")

#include <immintrin.h>

#include "common/cpu_vec_avx2.h"

namespace {
// e^x for 8 lanes within 2 ulp (Cephes' expf: x = n·ln2 + r, |r| <= ln2/2, a degree-6 polynomial
// in r, 2^n built in the exponent bits). Below -87.34 (where e^x leaves the normal range) the
// result is 0, so e^-inf = 0; NaN stays NaN; above 88.38 it saturates (inputs here are <= 0).
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f), hi = _mm256_set1_ps(88.3762626647949f);
  const __m256 xc = _mm256_min_ps(hi, _mm256_max_ps(lo, x));  // operand order keeps NaN
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), y);
}

struct Isa {
  using V = Vec8;
  static V exp(V x) { return V(exp8(x.x)); }
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
