// AVX2 + FMA + F16C instance of the CPU AdamW8bit kernels: Codec<Vec8>, the 8-bit codec on eight
// lanes (Codec<Vec1> of adamw8bit_cpu_kernels.h, lane for lane). The pragma must precede every include so
// the whole unit (and only it) is compiled for AVX2; adamw8bit_cpu.cpp calls it after a CPU check.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,f16c")

#include "common/cpu_vec_avx2.h"
#include "optim/adamw8bit_cpu_kernels.h"

namespace {

inline __m256i set1(int32_t v) { return _mm256_set1_epi32(v); }
inline __m256i load_codes(const uint8_t* c) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c)));
}
inline void store_codes(uint8_t* c, __m256i v) {  // eight int32 in 0..255 -> eight bytes
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(c), _mm_packus_epi16(w, w));
}
template <int kMant, int kBinades>
inline __m256i encode_magnitude8(__m256i a) {
  constexpr int kShift = 23 - kMant;
  __m256i q = _mm256_srai_epi32(_mm256_add_epi32(a, set1((1 << (kShift - 1)) - min_bits(kBinades))), kShift);
  q = _mm256_min_epi32(_mm256_max_epi32(q, _mm256_setzero_si256()), set1(kBinades << kMant));
  return _mm256_add_epi32(q, set1(1));
}
template <int kMant, int kBinades>
inline __m256 decode_magnitude8(__m256i code) {
  const __m256i bits = _mm256_add_epi32(_mm256_slli_epi32(_mm256_sub_epi32(code, set1(1)), 23 - kMant),
                                        set1(min_bits(kBinades)));
  const __m256i zero = _mm256_cmpeq_epi32(code, _mm256_setzero_si256());
  return _mm256_castsi256_ps(_mm256_andnot_si256(zero, bits));
}

template <>
struct Codec<Vec8> {
  static Vec8 abs(Vec8 a) { return Vec8(_mm256_and_ps(a.x, _mm256_castsi256_ps(set1(0x7fffffff)))); }
  static float max_lanes(Vec8 a) {
    alignas(32) float t[8];
    _mm256_store_ps(t, a.x);
    float m = t[0];
    for (int k = 1; k < 8; ++k) m = nan_max(m, t[k]);
    return m;
  }
  static Vec8 decode_exp_avg(const uint8_t* c) {
    const __m256i code = load_codes(c);
    const __m256 mag = decode_magnitude8<kExpAvgMant, kExpAvgBinades>(_mm256_and_si256(code, set1(127)));
    const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(code, set1(128)), 24);
    return Vec8(_mm256_or_ps(mag, _mm256_castsi256_ps(sign)));
  }
  static Vec8 decode_root(const uint8_t* c) {
    return Vec8(decode_magnitude8<kSqrtMant, kSqrtBinades>(load_codes(c)));
  }
  static void encode_exp_avg(uint8_t* c, Vec8 x) {
    const __m256i bits = _mm256_castps_si256(x.x);
    const __m256i a = _mm256_and_si256(bits, set1(0x7fffffff));
    const __m256i keep = _mm256_cmpgt_epi32(a, set1(min_bits(kExpAvgBinades + 1) - 1));  // not rounded to 0
    const __m256i sign = _mm256_and_si256(_mm256_srai_epi32(bits, 31), set1(128));
    const __m256i code = _mm256_or_si256(encode_magnitude8<kExpAvgMant, kExpAvgBinades>(a), sign);
    store_codes(c, _mm256_and_si256(code, keep));
  }
  static void encode_root(uint8_t* c, Vec8 x) {
    const __m256i a = _mm256_and_si256(_mm256_castps_si256(x.x), set1(0x7fffffff));
    const __m256i zero = _mm256_cmpeq_epi32(a, _mm256_setzero_si256());
    store_codes(c, _mm256_andnot_si256(zero, encode_magnitude8<kSqrtMant, kSqrtBinades>(a)));
  }
};

}  // namespace

namespace bigkernels::optim::cpu8 {
const Kernels& avx2_kernels() {
  static const Kernels k{"avx2", adamw8bit_any<Vec8>};
  return k;
}
}  // namespace bigkernels::optim::cpu8
#else
#include "optim/adamw8bit_cpu.h"
namespace bigkernels::optim::cpu8 {
const Kernels& avx2_kernels() { return scalar_kernels(); }  // not an x86 CPU: never chosen
}  // namespace bigkernels::optim::cpu8
#endif
