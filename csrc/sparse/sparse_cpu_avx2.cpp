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
// M = 1, 1024 x 1024, the CSR kernel: 141 vs 180 us at 30% density, 222 vs 287 us at 50%), and
// the loads take their indices from memory again rather than out of the index vector (a C
// microbenchmark of the loop, one thread, 30% density: 1.22 cycles per entry vs 1.73 with
// vpextrq; vgatherdps 1.44). Other CPUs keep the gather: Intel's is expected to be the faster
// there (its inserts share one shuffle port), not measured on this project's machines.
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
  static Msk in_range(Idx i, uint32_t K) {  // unsigned i <= K - 1 (K >= 1 wherever an index is read)
    const __m256i last = _mm256_set1_epi32(int(K - 1));
    return _mm256_cmpeq_epi32(_mm256_max_epu32(i, last), last);
  }
  static bool all(Msk m) { return _mm256_movemask_epi8(m) == -1; }
  static inline __attribute__((always_inline)) V gather(const float* base, Idx i, const int32_t* cols) {
    if (!kScalarGather) return V(_mm256_i32gather_ps(base, i, 4));
    // the indices loaded again as scalars: cheaper than extracting them from i
    const uint32_t* c = reinterpret_cast<const uint32_t*>(cols);
    __m128 lo = _mm_load_ss(base + c[0]), hi = _mm_load_ss(base + c[4]);
    lo = _mm_insert_ps(lo, _mm_load_ss(base + c[1]), 0x10);
    hi = _mm_insert_ps(hi, _mm_load_ss(base + c[5]), 0x10);
    lo = _mm_insert_ps(lo, _mm_load_ss(base + c[2]), 0x20);
    hi = _mm_insert_ps(hi, _mm_load_ss(base + c[6]), 0x20);
    lo = _mm_insert_ps(lo, _mm_load_ss(base + c[3]), 0x30);
    hi = _mm_insert_ps(hi, _mm_load_ss(base + c[7]), 0x30);
    return V(_mm256_set_m128(hi, lo));
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
