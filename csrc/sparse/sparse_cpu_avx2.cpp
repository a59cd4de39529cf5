// AVX2 + FMA + F16C instance of the CPU sparse kernels: 8 lanes; CSR gathers (vgatherdps, or
// scalar loads and inserts on AMD: kScalarGather);
// 2:4 below kSparse24LanesMinRows rows with in-lane permutes
// (sparse24_permil), from there with rows along the lanes; for larger batches BSR and dense-enough
// CSR on the panel engine (all in sparse_cpu_panels.h). The pragma must
// precede every include; sparse_cpu.cpp calls this unit only after a CPU check.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,f16c")

#include <immintrin.h>

#include <cstring>

#include "common/cpu_vec_avx2.h"

namespace {
// AMD's Zen cores run vgatherdps slower than eight scalar loads and inserts (Zen 3, one thread,
// M = 1, 1024 x 1024, the CSR kernel: 141 vs 180 us at 30% density, 222 vs 287 us at 50%). Other
// CPUs keep the gather: Intel's is expected to be the faster there (its inserts share one shuffle
// port), not measured on this project's machines.
const bool kScalarGather = [] {
  __builtin_cpu_init();
  return bool(__builtin_cpu_is("amd"));
}();
struct Isa {
  using V = Vec8;
  using Idx = __m256i;
  using Msk = __m256i;  // all-ones lanes where the index is in range
  using Sel = __m256i;
  static V fma(V a, V b, V c) { return V(_mm256_fmadd_ps(a.x, b.x, c.x)); }
  static float hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v.x), _mm256_extractf128_ps(v.x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static Idx load_idx(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static Msk all_true() { return _mm256_set1_epi32(-1); }
  static Msk in_range(Idx i, uint32_t K) {
    return _mm256_and_si256(_mm256_cmpgt_epi32(i, _mm256_set1_epi32(-1)), _mm256_cmpgt_epi32(_mm256_set1_epi32(int(K)), i));
  }
  static Msk mand(Msk a, Msk b) { return _mm256_and_si256(a, b); }
  static bool all(Msk m) { return _mm256_movemask_epi8(m) == -1; }
  static inline __attribute__((always_inline)) V gather(const float* base, Idx i, Msk m) {
    if (!kScalarGather) return V(_mm256_mask_i32gather_ps(_mm256_setzero_ps(), base, i, _mm256_castsi256_ps(m), 4));
    const __m256i c = _mm256_and_si256(i, m);  // lanes outside m: x[0] (K >= 1: the binding), zeroed below
    const int64_t c01 = _mm256_extract_epi64(c, 0), c23 = _mm256_extract_epi64(c, 1);
    const int64_t c45 = _mm256_extract_epi64(c, 2), c67 = _mm256_extract_epi64(c, 3);
    auto lo32 = [](int64_t v) { return uint32_t(v); };
    auto hi32 = [](int64_t v) { return uint32_t(uint64_t(v) >> 32); };
    __m128 lo = _mm_load_ss(base + lo32(c01)), hi = _mm_load_ss(base + lo32(c45));
    lo = _mm_insert_ps(lo, _mm_load_ss(base + hi32(c01)), 0x10);
    hi = _mm_insert_ps(hi, _mm_load_ss(base + hi32(c45)), 0x10);
    lo = _mm_insert_ps(lo, _mm_load_ss(base + lo32(c23)), 0x20);
    hi = _mm_insert_ps(hi, _mm_load_ss(base + lo32(c67)), 0x20);
    lo = _mm_insert_ps(lo, _mm_load_ss(base + hi32(c23)), 0x30);
    hi = _mm_insert_ps(hi, _mm_load_ss(base + hi32(c67)), 0x30);
    return V(_mm256_and_ps(_mm256_set_m128(hi, lo), _mm256_castsi256_ps(m)));
  }
  // 4 meta bytes -> positions 4g + p (0..15) of 8 kept inputs
  static Sel sel_idx(const uint8_t* meta) {
    int32_t word;
    std::memcpy(&word, meta, 4);
    const __m128i b = _mm_cvtsi32_si128(word);
    const __m256i e = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(b, b));
    const __m256i p = _mm256_and_si256(_mm256_srlv_epi32(e, _mm256_setr_epi32(0, 2, 0, 2, 0, 2, 0, 2)),
                                       _mm256_set1_epi32(3));
    return _mm256_add_epi32(p, _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12));
  }
  static V sel2(Sel s, V lo_in, V hi_in) {
    const __m256 lo = _mm256_permutevar8x32_ps(lo_in.x, s);
    const __m256 hi = _mm256_permutevar8x32_ps(hi_in.x, s);
    return V(_mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_cmpgt_epi32(s, _mm256_set1_epi32(7)))));
  }
};
}  // namespace

#include "sparse/sparse_cpu_kernels.h"
#include "sparse/sparse_cpu_panels.h"

namespace bigkernels::sparse::cpu {
const Kernels& avx2_kernels() {
  static const Kernels k = [] {
    Kernels r = make_kernels<Isa>("avx2");
    r.pack_a_f32 = ::pack_a_f32;
    r.bsr_panels = ::bsr_panels;
    r.csr_panels = ::csr_panels;
    r.sparse24_lanes = ::sparse24_lanes;
    r.sparse24_permil = ::sparse24_permil;
    r.sparse24_to_dense_f32 = ::sparse24_to_dense_f32;
    return r;
  }();
  return k;
}
}  // namespace bigkernels::sparse::cpu
#else
#include "sparse/sparse_cpu.h"
namespace bigkernels::sparse::cpu {
const Kernels& avx2_kernels() { return scalar_kernels(); }  // not an x86 CPU: never chosen
}  // namespace bigkernels::sparse::cpu
#endif
