// AVX2 + FMA + F16C instance of the CPU int8 kernels. int8 products go through int16: sixteen
// bytes sign-extended (vpmovsxbw) and multiplied in pairs into int32 (vpmaddwd), which is exact
// for every int8 value (unlike vpmaddubsw, whose int16 pair sums saturate). Small batches run the
// tiles of quant_cpu_kernels.h (each weight row streamed once); larger ones the panel engine
// (quant_cpu_panels.h: packed operands, register-blocked micro-kernels). The pragma must
// precede every include; quant_cpu.cpp calls this unit only after a CPU check.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,f16c")

#include <immintrin.h>

#include "common/cpu_vec_avx2.h"

namespace {
struct Isa {
  using V = Vec8;
  static constexpr int KW = 16;
  static constexpr bool kOffset = false;
  static constexpr int kTileRows = 2;  // 2 x 6 accumulators: 4 x 6 would spill (16 ymm registers)
  using A = __m256i;  // 16 x int16
  using B = __m256i;
  using Acc = __m256i;  // 8 x int32
  static Acc zero() { return _mm256_setzero_si256(); }
  static A load_a(const int8_t* p) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static B load_b(const int8_t* p) { return load_a(p); }
  static Acc dot(Acc c, A a, B b) { return _mm256_add_epi32(c, _mm256_madd_epi16(a, b)); }
  static uint32_t hsum(Acc c) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return uint32_t(_mm_cvtsi128_si32(s));
  }
  static uint32_t row_sum(const int8_t*, int64_t) { return 0u; }
  static V load_w(const int8_t* p) {
    return V(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
  }
  static V fma(V a, V b, V c) { return V(_mm256_fmadd_ps(a.x, b.x, c.x)); }
  static void store_q(V t, int8_t* p) {
    const __m256 c = _mm256_min_ps(_mm256_max_ps(t.x, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
    const __m256i i = _mm256_cvtps_epi32(c);  // round half to even (MXCSR default)
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(w, w));
  }
};
}  // namespace

#include "quant/quant_cpu_kernels.h"
#include "quant/quant_cpu_panels.h"

namespace bigkernels::quant::cpu {
const Kernels& avx2_kernels() {
  static const Kernels k{"avx2",         quantize_rows_any<Isa>, int8_gemm_block<Isa>, w8a16_gemm_block<Isa>,
                         pack_a_f32_any, gemm::pack_a_i8,       w8a16_panels,         int8_panels,
                         dense_gemm_block<Isa>};
  return k;
}
}  // namespace bigkernels::quant::cpu
#else
#include "quant/quant_cpu.h"
namespace bigkernels::quant::cpu {
const Kernels& avx2_kernels() { return scalar_kernels(); }  // not an x86 CPU: never chosen
}  // namespace bigkernels::quant::cpu
#endif
