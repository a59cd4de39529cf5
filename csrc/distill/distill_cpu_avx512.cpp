// AVX-512 (F/BW/VL/DQ) instance of the CPU distillation kernel: 16 lanes, poly_exp with 2^n
// applied by vscalefps. The pragma must precede every include; distill_cpu.cpp calls this unit
// only after a CPU check.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// GCC 12 warns that its own _mm512_undefined_*() placeholders "may be used uninitialized".
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>

#include "common/cpu_vec_avx512.h"

namespace {
struct Isa {
  using V = Vec16;
  static V clamp(V x, V lo, V hi) { return V(_mm512_min_ps(hi.x, _mm512_max_ps(lo.x, x.x))); }  // keeps NaN
  static V round(V x) { return V(_mm512_roundscale_ps(x.x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)); }
  static V scale2n(V p, V n) { return V(_mm512_scalef_ps(p.x, n.x)); }
  static V zero_below(V x, V lo, V y) {
    return V(_mm512_maskz_mov_ps(~_mm512_cmp_ps_mask(x.x, lo.x, _CMP_LT_OQ), y.x));
  }
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
