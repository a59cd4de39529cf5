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

// Pass 2 on sixteen lanes in 16-bit integers: a code depends only on the top 16 bits of the
// normalised fp32 (the rounding bit is at bit kShift - 1 >= 16 and the constants' low 16 bits are 0),
// so one 16-bit operation does what Codec<Vec1>::encode_* does on sixteen elements.
// fp32 bits >> 16 of x0 (elements 0-7) and x1 (8-15) as 16-bit lanes ordered [0-3, 8-11 | 4-7, 12-15].
inline __m256i top16(__m256 x0, __m256 x1) {
  return _mm256_packus_epi32(_mm256_srli_epi32(_mm256_castps_si256(x0), 16),
                             _mm256_srli_epi32(_mm256_castps_si256(x1), 16));
}
// min(max(q, 0), kBinades << kMant) + 1 of encode_magnitude, on top-16 magnitudes a16.
template <int kMant, int kBinades>
inline __m256i encode_magnitude16(__m256i a16) {
  constexpr int kShift = 23 - kMant;
  static_assert(kShift - 1 >= 16, "the rounding bit must lie in the top 16 bits");
  constexpr int32_t kAdd = (1 << (kShift - 1)) - min_bits(kBinades) + (1 << kShift);  // + 1 folded in
  const __m256i q = _mm256_srai_epi16(_mm256_add_epi16(a16, _mm256_set1_epi16(int16_t(kAdd >> 16))), kShift - 16);
  return _mm256_min_epi16(_mm256_max_epi16(q, _mm256_set1_epi16(1)), _mm256_set1_epi16((kBinades << kMant) + 1));
}

// Pass 1's decode on sixteen lanes in 16-bit integers: a decoded magnitude's fp32 bits have 16 zero low
// bits (kMant <= 7), so the top halves are computed sixteen at a time and unpacked against zeros.
// Sixteen codes as 16-bit lanes ordered [0-3, 8-11 | 4-7, 12-15]: unpacklo / unpackhi then give
// elements 0-7 / 8-15.
inline __m256i load_codes16(const uint8_t* c) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c));
  return _mm256_cvtepu8_epi16(_mm_shuffle_epi32(b, 0xd8));
}
// Top 16 bits of decode_magnitude for 16-bit codes (0 for code 0).
template <int kMant, int kBinades>
inline __m256i decode_magnitude16(__m256i code) {
  const __m256i bits = _mm256_add_epi16(_mm256_slli_epi16(code, 7 - kMant),
                                        _mm256_set1_epi16(int16_t((min_bits(kBinades) >> 16) - (1 << (7 - kMant)))));
  return _mm256_andnot_si256(_mm256_cmpeq_epi16(code, _mm256_setzero_si256()), bits);
}

template <>
struct Codec<Vec8> : CodecDefaults<Vec8> {
  static Vec8 abs(Vec8 a) { return Vec8(_mm256_and_ps(a.x, _mm256_castsi256_ps(set1(0x7fffffff)))); }
  // The block maxima as integer maxima of the fp32 bits of |x| (one operation; ordered like the floats
  // for x >= 0, NaN above infinity so it propagates); max_lanes reads the float back.
  static Vec8 max_abs(Vec8 acc, Vec8 x) {
    return Vec8(_mm256_castsi256_ps(_mm256_max_epi32(_mm256_castps_si256(acc.x),
                                                     _mm256_and_si256(_mm256_castps_si256(x.x), set1(0x7fffffff)))));
  }
  static Vec8 max_root(Vec8 acc, Vec8 r) { return max_abs(acc, r); }
  static float max_lanes(Vec8 acc) {
    const __m256i a = _mm256_castps_si256(acc.x);
    __m128i v = _mm_max_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    v = _mm_max_epi32(v, _mm_shuffle_epi32(v, 0x4e));
    v = _mm_max_epi32(v, _mm_shuffle_epi32(v, 0xb1));
    return bits_to_float(uint32_t(_mm_cvtsi128_si32(v)));
  }
  // param - step_size * m / (r * inv_bc2_sqrt + eps) with FMAs and the refined reciprocal; a NaN
  // Newton term (denominator 0 or infinite) keeps the hardware estimate (inf / 0), as vrcp does.
  static Vec8 param_update(Vec8 param, Vec8 m, Vec8 r, const Consts8<Vec8>& c) {
    const __m256 d = _mm256_fmadd_ps(r.x, c.inv_bc2_sqrt.x, c.eps.x);
    const __m256 y0 = _mm256_rcp_ps(d);
    const __m256 e = _mm256_fnmadd_ps(d, y0, _mm256_set1_ps(2.0f));
    const __m256 y = _mm256_blendv_ps(_mm256_mul_ps(y0, e), y0, _mm256_cmp_ps(e, e, _CMP_UNORD_Q));
    return Vec8(_mm256_fnmadd_ps(_mm256_mul_ps(c.step_size.x, m.x), y, param.x));
  }
  template <bool kWeightDecay, class T>
  static int64_t update_wide(T* p, const T* g, const uint8_t* mc, const uint8_t* rc, const uint8_t* keep, int64_t n,
                             const Vec8& m_scale, const Vec8& r_scale, const Consts8<Vec8>& c, float* m_buf,
                             float* r_buf, Vec8& m_max, Vec8& r_max) {
    static_assert(kExpAvgMant <= 7 && kSqrtMant <= 7, "decoded values must have 16 zero low bits");
    const __m256i zero = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m256i cm = load_codes16(mc + i);
      const __m256i tm = _mm256_or_si256(
          decode_magnitude16<kExpAvgMant, kExpAvgBinades>(_mm256_and_si256(cm, _mm256_set1_epi16(127))),
          _mm256_slli_epi16(_mm256_and_si256(cm, _mm256_set1_epi16(128)), 8));  // sign: bit 7 -> bit 15
      const __m256i tr = decode_magnitude16<kSqrtMant, kSqrtBinades>(load_codes16(rc + i));
      update_decoded<Vec8, kWeightDecay>(p, g, keep, i,
                                         Vec8(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, tm))) * m_scale,
                                         Vec8(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, tr))) * r_scale, c,
                                         m_buf, r_buf, m_max, r_max);
      update_decoded<Vec8, kWeightDecay>(p, g, keep, i + 8,
                                         Vec8(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, tm))) * m_scale,
                                         Vec8(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, tr))) * r_scale, c,
                                         m_buf, r_buf, m_max, r_max);
    }
    return i;
  }
  static int64_t encode_wide(uint8_t* mc, uint8_t* rc, const float* m_buf, const float* r_buf, float m_inv,
                             float r_inv, int64_t n) {
    const __m256 mi = _mm256_set1_ps(m_inv), ri = _mm256_set1_ps(r_inv);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256i abs16 = _mm256_set1_epi16(0x7fff);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m256 m0 = _mm256_mul_ps(_mm256_loadu_ps(m_buf + i), mi);
      const __m256 m1 = _mm256_mul_ps(_mm256_loadu_ps(m_buf + i + 8), mi);
      const __m256 r0 = _mm256_mul_ps(_mm256_loadu_ps(r_buf + i), ri);
      const __m256 r1 = _mm256_mul_ps(_mm256_loadu_ps(r_buf + i + 8), ri);
      // exp_avg: 0 below half the smallest magnitude, else magnitude code | sign << 7
      const __m256i hm = top16(m0, m1);
      const __m256i am = _mm256_and_si256(hm, abs16);
      const __m256i keep =
          _mm256_cmpgt_epi16(am, _mm256_set1_epi16(int16_t((min_bits(kExpAvgBinades + 1) >> 16) - 1)));
      const __m256i sign = _mm256_and_si256(_mm256_srli_epi16(hm, 8), _mm256_set1_epi16(128));
      const __m256i cm = _mm256_and_si256(
          _mm256_or_si256(encode_magnitude16<kExpAvgMant, kExpAvgBinades>(am), sign), keep);
      // root: 0 for +-0 (a compare on the floats: the top 16 bits cannot tell a tiny value from 0)
      const __m256i ar = _mm256_and_si256(top16(r0, r1), abs16);
      const __m256 z = _mm256_setzero_ps();
      const __m256i zero = _mm256_packs_epi32(_mm256_castps_si256(_mm256_cmp_ps(r0, z, _CMP_EQ_OQ)),
                                              _mm256_castps_si256(_mm256_cmp_ps(r1, z, _CMP_EQ_OQ)));
      const __m256i cr = _mm256_andnot_si256(zero, encode_magnitude16<kSqrtMant, kSqrtBinades>(ar));
      // bytes [m 0-3, 8-11, r 0-3, 8-11 | m 4-7, 12-15, r 4-7, 12-15] -> [m 0-15 | r 0-15]
      const __m256i codes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(cm, cr), order);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(mc + i), _mm256_castsi256_si128(codes));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(rc + i), _mm256_extracti128_si256(codes, 1));
    }
    return i;
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
