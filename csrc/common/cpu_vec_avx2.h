// Eight fp32 lanes in an AVX2 register with fp32 / fp16 (F16C) / bf16 loads and stores: the
// AVX2 twin of Vec1 in cpu_vec.h. Include only from a translation unit compiled for AVX2+FMA+F16C
// (its first line `#pragma GCC target("avx2,fma,f16c")`) and called only after a CPU check.
#pragma once

#include <immintrin.h>

#include "common/cpu_vec.h"

namespace {

struct Vec8 {
  static constexpr int W = 8;
  __m256 x;
  Vec8() = default;
  explicit Vec8(float v) : x(_mm256_set1_ps(v)) {}
  explicit Vec8(__m256 v) : x(v) {}
  static Vec8 load(const float* p) { return Vec8(_mm256_loadu_ps(p)); }
  static Vec8 load(const bf16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return Vec8(_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  static Vec8 load(const fp16_t* p) {
    return Vec8(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  void store(float* p) const { _mm256_storeu_ps(p, x); }
  void store(bf16_t* p) const {
    // round to nearest even; NaN lanes become a quiet NaN
    const __m256i u = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), is_nan);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xd8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  void store(fp16_t* p) const {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
  }
  double sum_lanes() const {
    const __m256d d = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(x)),
                                    _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
    alignas(32) double t[4];
    _mm256_store_pd(t, d);
    return (t[0] + t[1]) + (t[2] + t[3]);
  }
};

// Free functions, not in-class friends: GCC does not apply `#pragma GCC target` to the latter.
inline Vec8 operator+(Vec8 a, Vec8 b) { return Vec8(_mm256_add_ps(a.x, b.x)); }
inline Vec8 operator-(Vec8 a, Vec8 b) { return Vec8(_mm256_sub_ps(a.x, b.x)); }
inline Vec8 operator*(Vec8 a, Vec8 b) { return Vec8(_mm256_mul_ps(a.x, b.x)); }
inline Vec8 operator/(Vec8 a, Vec8 b) { return Vec8(_mm256_div_ps(a.x, b.x)); }
inline Vec8 operator-(Vec8 a) { return Vec8(_mm256_xor_ps(a.x, _mm256_set1_ps(-0.0f))); }
inline Vec8 vmax(Vec8 a, Vec8 b) {  // NaN in either propagates, like torch.maximum
  const __m256 m = _mm256_max_ps(a.x, b.x);
  const __m256 nan = _mm256_cmp_ps(a.x, b.x, _CMP_UNORD_Q);
  return Vec8(_mm256_blendv_ps(m, _mm256_add_ps(a.x, b.x), nan));
}
inline Vec8 vsqrt(Vec8 a) { return Vec8(_mm256_sqrt_ps(a.x)); }
inline Vec8 keep_or_zero(Vec8 a, const uint8_t* keep) {  // 8 mask bytes -> all-ones / zero lanes
  const __m256i k = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(keep)));
  return Vec8(_mm256_and_ps(a.x, _mm256_castsi256_ps(_mm256_cmpgt_epi32(k, _mm256_setzero_si256()))));
}
// 1/a to within 2 ulp: the 12-bit hardware estimate plus one Newton step, ~4x the throughput of
// a division. 1/inf stays 0 (the Newton step alone would make it NaN); 1/0 stays inf.
inline Vec8 vrcp(Vec8 a) {
  const __m256 r = _mm256_rcp_ps(a.x);
  const __m256 refined = _mm256_mul_ps(r, _mm256_sub_ps(_mm256_set1_ps(2.0f), _mm256_mul_ps(a.x, r)));
  const __m256 keep = _mm256_or_ps(_mm256_cmp_ps(r, _mm256_setzero_ps(), _CMP_EQ_OQ),
                                   _mm256_cmp_ps(a.x, _mm256_setzero_ps(), _CMP_EQ_OQ));
  return Vec8(_mm256_blendv_ps(refined, r, keep));
}

}  // namespace
