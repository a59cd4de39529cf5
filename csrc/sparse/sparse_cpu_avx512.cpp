// AVX-512 (F/BW/VL/DQ) instance of the CPU sparse kernels: 16 lanes; CSR gathers with masked
// vgatherdps, 2:4 input selection with one two-source permute (vpermt2ps) of 32 inputs. The
// pragma must precede every include; sparse_cpu.cpp calls this unit only after a CPU check.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// GCC 12 warns that its own _mm512_undefined_*() placeholders "may be used uninitialized".
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include <immintrin.h>

#include "common/cpu_vec_avx512.h"

namespace {
struct Isa {
  using V = Vec16;
  using Idx = __m512i;
  using Msk = __mmask16;  // lanes whose index is in range
  using Sel = __m512i;
  static V fma(V a, V b, V c) { return V(_mm512_fmadd_ps(a.x, b.x, c.x)); }
  static float hsum(V v) { return _mm512_reduce_add_ps(v.x); }
  static Idx load_idx(const int32_t* p) { return _mm512_loadu_si512(p); }
  static Msk in_range(Idx i, uint32_t K) { return _mm512_cmplt_epu32_mask(i, _mm512_set1_epi32(int(K))); }
  static bool all(Msk m) { return m == __mmask16(0xffff); }
  static V gather(const float* base, Idx i, const int32_t*) { return V(_mm512_i32gather_ps(i, base, 4)); }
  // 8 meta bytes -> positions 4g + p (0..31) of 16 kept inputs
  static Sel sel_idx(const uint8_t* meta) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(meta));
    const __m512i e = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b));
    const __m512i p = _mm512_and_si512(
        _mm512_srlv_epi32(e, _mm512_setr_epi32(0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2)), _mm512_set1_epi32(3));
    return _mm512_add_epi32(p, _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28));
  }
  static V sel2(Sel s, V lo, V hi) { return V(_mm512_permutex2var_ps(lo.x, s, hi.x)); }
};
}  // namespace

#include "sparse/sparse_cpu_kernels.h"

namespace bigkernels::sparse::cpu {
const Kernels& avx512_kernels() {
  static const Kernels k = make_kernels<Isa>("avx512");
  return k;
}
}  // namespace bigkernels::sparse::cpu
#else
#include "sparse/sparse_cpu.h"
namespace bigkernels::sparse::cpu {
const Kernels& avx512_kernels() { return scalar_kernels(); }  // not an x86 CPU: never chosen
}  // namespace bigkernels::sparse::cpu
#endif
