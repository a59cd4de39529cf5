// AVX-512 (F/BW/VL/DQ) instance of the CPU distillation kernel: 16 lanes, a polynomial exp
// scaled by vscalefps. The pragma must precede every include; distill_cpu.cpp calls this unit
// only after a CPU check.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// GCC 12 warns that its own _mm512_undefined_*() placeholders "may be used uninitialized".
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>

#include "common/cpu_vec_avx512.h"

namespace {
// e^x for 16 lanes: the polynomial of the AVX2 unit (exp8), 2^n applied by vscalefps. Below
// -87.34 the result is 0 (e^-inf = 0); NaN stays NaN.
inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.33654f), hi = _mm512_set1_ps(88.3762626647949f);
  const __m512 xc = _mm512_min_ps(hi, _mm512_max_ps(lo, x));  // operand order keeps NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512 y = _mm512_scalef_ps(p, n);
  return _mm512_maskz_mov_ps(~_mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), y);
}

struct Isa {
  using V = Vec16;
  static V exp(V x) { return V(exp16(x.x)); }
  static V fma(V a, V b, V c) { return V(_mm512_fmadd_ps(a.x, b.x, c.x)); }
  static V pos_or_zero(V cond, V val) {
    return V(_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(cond.x, _mm512_setzero_ps(), _CMP_GT_OQ), val.x));
  }
  static float hmax(V v) {
    alignas(64) float l[16];
    _mm512_store_ps(l, v.x);
    float m = l[0];
    for (int i = 1; i < 16; ++i) m = (m != m || m > l[i]) ? m : l[i];
    return m;
  }
};
}  // namespace

#include "distill/distill_cpu_kernels.h"

namespace bigkernels::distill::cpu {
const Kernels& avx512_kernels() {
  static const Kernels k{"avx512", kd_rows_any<Isa>};
  return k;
}
}  // namespace bigkernels::distill::cpu
#else
#include "distill/distill_cpu.h"
namespace bigkernels::distill::cpu {
const Kernels& avx512_kernels() { return scalar_kernels(); }  // not an x86 CPU: never chosen
}  // namespace bigkernels::distill::cpu
#endif
