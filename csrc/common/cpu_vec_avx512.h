// Sixteen fp32 lanes in an AVX-512 register with fp32 / fp16 / bf16 loads and stores: the AVX-512
// twin of Vec1 (cpu_vec.h) and Vec8 (cpu_vec_avx2.h). Include only from a translation unit whose
// first line is `#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")`, and
// call it only after a CPU check (bigkernels::cpu_has_avx512()).
//
// bf16 stores: in a unit that also adds avx512bf16 to its target and defines
// BIGKERNELS_AVX512_BF16 before this include (GCC's target pragma does not define
// __AVX512BF16__), one vcvtneps2bf16 per 16 lanes. It rounds to nearest even and quiets NaNs
// bit for bit like float_to_bf16(), except that fp32 subnormal inputs (|x| < 1.2e-38) become a
// signed zero. Otherwise the integer rounding of Vec8, ~4x the instructions.
#pragma once

#include <immintrin.h>

#include "common/cpu_vec.h"

// GCC 12 warns that its own _mm512_undefined_epi32() placeholder "may be used uninitialized".
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace {

struct Vec16 {
  static constexpr int W = 16;
  __m512 x;
  Vec16() = default;
  explicit Vec16(float v) : x(_mm512_set1_ps(v)) {}
  explicit Vec16(__m512 v) : x(v) {}
  static Vec16 load(const float* p) { return Vec16(_mm512_loadu_ps(p)); }
  static Vec16 load(const bf16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return Vec16(_mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
  }
  static Vec16 load(const fp16_t* p) {
    return Vec16(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
  }
  void store(float* p) const { _mm512_storeu_ps(p, x); }
  void store(bf16_t* p) const {
#ifdef BIGKERNELS_AVX512_BF16
    const __m256i packed = (__m256i)_mm512_cvtneps_pbh(x);
#else
    // round to nearest even; NaN lanes become a quiet NaN
    const __m512i u = _mm512_castps_si512(x);
    const __m512i hi = _mm512_srli_epi32(u, 16);
    const __m512i lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __mmask16 is_nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    const __m512i r = _mm512_mask_or_epi32(rounded, is_nan, hi, _mm512_set1_epi32(0x40));
    const __m256i packed = _mm512_cvtepi32_epi16(r);
#endif
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
  }
  void store(fp16_t* p) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
  }
  double sum_lanes() const {
    const __m512d d = _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(x)),
                                    _mm512_cvtps_pd(_mm512_extractf32x8_ps(x, 1)));
    return _mm512_reduce_add_pd(d);
  }
};

// Free functions, not in-class friends: GCC does not apply `#pragma GCC target` to the latter.
inline Vec16 operator+(Vec16 a, Vec16 b) { return Vec16(_mm512_add_ps(a.x, b.x)); }
inline Vec16 operator-(Vec16 a, Vec16 b) { return Vec16(_mm512_sub_ps(a.x, b.x)); }
inline Vec16 operator*(Vec16 a, Vec16 b) { return Vec16(_mm512_mul_ps(a.x, b.x)); }
inline Vec16 operator/(Vec16 a, Vec16 b) { return Vec16(_mm512_div_ps(a.x, b.x)); }
inline Vec16 operator-(Vec16 a) { return Vec16(_mm512_castsi512_ps(
    _mm512_xor_si512(_mm512_castps_si512(a.x), _mm512_set1_epi32(int(0x80000000u))))); }
inline Vec16 vmax(Vec16 a, Vec16 b) {  // NaN in either propagates, like torch.maximum
  const __m512 m = _mm512_max_ps(a.x, b.x);
  return Vec16(_mm512_mask_add_ps(m, _mm512_cmp_ps_mask(a.x, b.x, _CMP_UNORD_Q), a.x, b.x));
}
inline Vec16 vsqrt(Vec16 a) { return Vec16(_mm512_sqrt_ps(a.x)); }
inline Vec16 keep_or_zero(Vec16 a, const uint8_t* keep) {  // 16 mask bytes -> a lane mask
  const __m512i k = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(keep)));
  return Vec16(_mm512_maskz_mov_ps(_mm512_test_epi32_mask(k, k), a.x));
}
// 1/a to within 1 ulp: the 14-bit hardware estimate plus one Newton step. 1/inf stays 0 and 1/0
// stays inf (where the Newton step alone would give NaN).
inline Vec16 vrcp(Vec16 a) {
  const __m512 r = _mm512_rcp14_ps(a.x);
  const __m512 refined = _mm512_mul_ps(r, _mm512_fnmadd_ps(a.x, r, _mm512_set1_ps(2.0f)));
  const __mmask16 keep = _mm512_cmp_ps_mask(r, _mm512_setzero_ps(), _CMP_EQ_OQ) |
                         _mm512_cmp_ps_mask(a.x, _mm512_setzero_ps(), _CMP_EQ_OQ);
  return Vec16(_mm512_mask_mov_ps(refined, keep, r));
}

}  // namespace

#pragma GCC diagnostic pop
