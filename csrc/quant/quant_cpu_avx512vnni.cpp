// AVX-512 + AVX512_VNNI instance of the CPU int8 kernels. vpdpbusd multiplies unsigned by signed
// bytes, so b is fed as b + 128 (one xor with 0x80) and a as is, and each tile subtracts
// 128 * (sum of the a row) afterwards; vpdpbusd's int32 lanes wrap, so the result is exact
// whenever the true sum fits in int32 (|sum| <= 128 * 128 * K: K up to 131,071). The pragma must
// precede every include; quant_cpu.cpp calls this unit only after a CPU check.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")

#include <immintrin.h>

#include "common/cpu_vec_avx512.h"

// GCC 12 warns about its own _mm512_undefined_*() placeholders inside the intrinsics.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace {
struct Isa {
  using V = Vec16;
  static constexpr int KW = 64;
  static constexpr bool kOffset = true;
  using A = __m512i;
  using B = __m512i;
  using Acc = __m512i;
  static Acc zero() { return _mm512_setzero_si512(); }
  static A load_a(const int8_t* p) { return _mm512_loadu_si512(p); }
  static B load_b(const int8_t* p) { return _mm512_xor_si512(_mm512_loadu_si512(p), _mm512_set1_epi8(char(0x80))); }
  static Acc dot(Acc c, A a, B b) { return _mm512_dpbusd_epi32(c, b, a); }  // (b + 128) . a
  static uint32_t hsum(Acc c) {
    __m256i s = _mm256_add_epi32(_mm512_castsi512_si256(c), _mm512_extracti64x4_epi64(c, 1));
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
    return uint32_t(_mm_cvtsi128_si32(t));
  }
  static uint32_t row_sum(const int8_t* p, int64_t n) {  // n: a multiple of KW
    const __m512i ones = _mm512_set1_epi8(1);
    Acc c = zero();
    for (int64_t k = 0; k < n; k += KW) c = _mm512_dpbusd_epi32(c, ones, _mm512_loadu_si512(p + k));
    return hsum(c);
  }
  static V load_w(const int8_t* p) {
    return V(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
  }
  static V fma(V a, V b, V c) { return V(_mm512_fmadd_ps(a.x, b.x, c.x)); }
  static void store_q(V t, int8_t* p) {
    const __m512 c = _mm512_min_ps(_mm512_max_ps(t.x, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
    const __m512i i = _mm512_cvtps_epi32(c);  // round half to even (MXCSR default)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtsepi32_epi8(i));
  }
};
}  // namespace

#include "quant/quant_cpu_kernels.h"

namespace bigkernels::quant::cpu {
const Kernels& avx512vnni_kernels() {
  static const Kernels k{"avx512vnni", quantize_rows_any<Isa>, int8_gemm_block<Isa>, w8a16_gemm_block<Isa>,
                         nullptr, nullptr, nullptr, nullptr, dense_gemm_block<Isa>};
  return k;
}
}  // namespace bigkernels::quant::cpu
#else
#include "quant/quant_cpu.h"
namespace bigkernels::quant::cpu {
const Kernels& avx512vnni_kernels() { return scalar_kernels(); }  // not an x86 CPU: never chosen
}  // namespace bigkernels::quant::cpu
#endif
