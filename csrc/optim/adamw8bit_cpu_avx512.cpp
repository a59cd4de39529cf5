// AVX-512 (F/BW/VL/DQ + FMA + F16C) instance of the CPU AdamW8bit kernels: Codec<Vec16>, the 8-bit
// codec on sixteen lanes (Codec<Vec1> of adamw8bit_cpu_kernels.h, lane for lane). The pragma must
// precede every include so the whole unit (and only it) is compiled for AVX-512;
// adamw8bit_cpu.cpp calls it after a CPU check.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

#include "common/cpu_vec_avx512.h"
#include "optim/adamw8bit_cpu_kernels.h"

// GCC 12 warns that its own _mm512_undefined_epi32() placeholder "may be used uninitialized".
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace {

inline __m512i set1(int32_t v) { return _mm512_set1_epi32(v); }
inline __m512i load_codes(const uint8_t* c) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
}
inline void store_codes(uint8_t* c, __m512i v) {  // sixteen int32 in 0..255 -> sixteen bytes
  _mm_storeu_si128(reinterpret_cast<__m128i*>(c), _mm512_cvtepi32_epi8(v));
}
template <int kMant, int kBinades>
inline __m512i encode_magnitude16(__m512i a) {
  constexpr int kShift = 23 - kMant;
  __m512i q = _mm512_srai_epi32(_mm512_add_epi32(a, set1((1 << (kShift - 1)) - min_bits(kBinades))), kShift);
  q = _mm512_min_epi32(_mm512_max_epi32(q, _mm512_setzero_si512()), set1(kBinades << kMant));
  return _mm512_add_epi32(q, set1(1));
}
template <int kMant, int kBinades>
inline __m512 decode_magnitude16(__m512i code) {
  const __m512i bits = _mm512_add_epi32(_mm512_slli_epi32(_mm512_sub_epi32(code, set1(1)), 23 - kMant),
                                        set1(min_bits(kBinades)));
  return _mm512_castsi512_ps(_mm512_maskz_mov_epi32(_mm512_test_epi32_mask(code, code), bits));
}

template <>
struct Codec<Vec16> : CodecDefaults<Vec16> {
  static Vec16 abs(Vec16 a) { return Vec16(_mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a.x),
                                                                                  set1(0x7fffffff)))); }
  static float max_lanes(Vec16 a) {
    alignas(64) float t[16];
    _mm512_store_ps(t, a.x);
    float m = t[0];
    for (int k = 1; k < 16; ++k) m = nan_max(m, t[k]);
    return m;
  }
  static Vec16 decode_exp_avg(const uint8_t* c) {
    const __m512i code = load_codes(c);
    const __m512 mag = decode_magnitude16<kExpAvgMant, kExpAvgBinades>(_mm512_and_si512(code, set1(127)));
    const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(code, set1(128)), 24);
    return Vec16(_mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(mag), sign)));
  }
  static Vec16 decode_root(const uint8_t* c) {
    return Vec16(decode_magnitude16<kSqrtMant, kSqrtBinades>(load_codes(c)));
  }
  static void encode_exp_avg(uint8_t* c, Vec16 x) {
    const __m512i bits = _mm512_castps_si512(x.x);
    const __m512i a = _mm512_and_si512(bits, set1(0x7fffffff));
    const __mmask16 keep = _mm512_cmpge_epi32_mask(a, set1(min_bits(kExpAvgBinades + 1)));  // not rounded to 0
    const __m512i sign = _mm512_and_si512(_mm512_srai_epi32(bits, 31), set1(128));
    const __m512i code = _mm512_or_si512(encode_magnitude16<kExpAvgMant, kExpAvgBinades>(a), sign);
    store_codes(c, _mm512_maskz_mov_epi32(keep, code));
  }
  static void encode_root(uint8_t* c, Vec16 x) {
    const __m512i a = _mm512_and_si512(_mm512_castps_si512(x.x), set1(0x7fffffff));
    store_codes(c, _mm512_maskz_mov_epi32(_mm512_test_epi32_mask(a, a), encode_magnitude16<kSqrtMant, kSqrtBinades>(a)));
  }
};

}  // namespace

namespace bigkernels::optim::cpu8 {
const Kernels& avx512_kernels() {
  static const Kernels k{"avx512", adamw8bit_any<Vec16>};
  return k;
}
}  // namespace bigkernels::optim::cpu8
#else
#include "optim/adamw8bit_cpu.h"
namespace bigkernels::optim::cpu8 {
const Kernels& avx512_kernels() { return scalar_kernels(); }  // not an x86 CPU: never chosen
}  // namespace bigkernels::optim::cpu8
#endif
