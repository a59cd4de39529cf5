// Scalar "vector" of one fp32 lane with loads/stores from fp32, fp16 and bf16 storage.
// The AVX2 twin (cpu_vec_avx2.h) has the same interface, so one templated kernel body serves both.
// Everything here is `static`/inline in an anonymous namespace: each translation unit gets its own
// copy, compiled for that unit's instruction set (no ODR mixing of AVX2 and baseline code).
#pragma once

#include <cstdint>
#include <cstring>

namespace bigkernels {
struct bf16_t { uint16_t bits; };
struct fp16_t { uint16_t bits; };
}  // namespace bigkernels

namespace {
using bigkernels::bf16_t;
using bigkernels::fp16_t;

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float bf16_to_float(bf16_t h) { return bits_to_float(uint32_t(h.bits) << 16); }
inline bf16_t float_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{uint16_t(u >> 16)};
}

inline float fp16_to_float(fp16_t h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));         // inf / nan
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));    // normal
  // zero or subnormal: man * 2^-24
  const float mag = float(man) * bits_to_float(0x33800000u);
  return sign ? -mag : mag;
}
inline fp16_t float_to_fp16(float f) {  // round to nearest even
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return fp16_t{uint16_t(sign | 0x7e00u)};  // nan
  if (a >= 0x477ff000u) return fp16_t{uint16_t(sign | 0x7c00u)};  // overflow (rounds to inf)
  if (a < 0x38800000u) {  // subnormal or zero in fp16: round a * 2^24 to an integer, ties to even
    const float scaled = bits_to_float(a) * 16777216.0f;
    uint32_t m = uint32_t(scaled);
    const float rem = scaled - float(m);
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;
    return fp16_t{uint16_t(sign | m)};
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - (112u << 23);
  return fp16_t{uint16_t(sign | (r >> 13))};
}

// One fp32 lane.
struct Vec1 {
  static constexpr int W = 1;
  float x;
  Vec1() = default;
  explicit Vec1(float v) : x(v) {}
  static Vec1 load(const float* p) { return Vec1(*p); }
  static Vec1 load(const bf16_t* p) { return Vec1(bf16_to_float(*p)); }
  static Vec1 load(const fp16_t* p) { return Vec1(fp16_to_float(*p)); }
  void store(float* p) const { *p = x; }
  void store(bf16_t* p) const { *p = float_to_bf16(x); }
  void store(fp16_t* p) const { *p = float_to_fp16(x); }
  friend Vec1 operator+(Vec1 a, Vec1 b) { return Vec1(a.x + b.x); }
  friend Vec1 operator-(Vec1 a, Vec1 b) { return Vec1(a.x - b.x); }
  friend Vec1 operator*(Vec1 a, Vec1 b) { return Vec1(a.x * b.x); }
  friend Vec1 operator/(Vec1 a, Vec1 b) { return Vec1(a.x / b.x); }
  friend Vec1 operator-(Vec1 a) { return Vec1(-a.x); }
  friend Vec1 vmax(Vec1 a, Vec1 b) { return Vec1(a.x != a.x || a.x > b.x ? a.x : b.x); }  // NaN propagates
  friend Vec1 vsqrt(Vec1 a) { return Vec1(__builtin_sqrtf(a.x)); }
  friend Vec1 vrcp(Vec1 a) { return Vec1(1.0f / a.x); }
  double sum_lanes() const { return double(x); }
};

// The lane, or +0 where the pruning mask byte is 0 (NaN included). One per lane type.
inline Vec1 keep_or_zero(Vec1 a, const uint8_t* keep) { return Vec1(*keep != 0 ? a.x : 0.0f); }

// Copies of the last r < W elements of a range, zero-padded to one vector of W lanes: the tail of a
// range runs through the same lanes as its body. Vector lanes and Vec1 do not round alike (the
// lanes' refined reciprocal vs an exact division, FMA contraction), and an element's result must
// not depend on where it sits in its tensor or thread range: a tensor split into shards (FSDP2,
// tensor parallel) is then updated bit for bit like the whole tensor.
template <class T, int64_t W>
struct Staged {
  T x[W];
  Staged(const T* src, int64_t r) {
    std::memset(x, 0, sizeof(x));
    for (int64_t j = 0; src != nullptr && j < r; ++j) x[j] = src[j];
  }
  void back(T* dst, int64_t r) const {
    for (int64_t j = 0; j < r; ++j) dst[j] = x[j];
  }
};

}  // namespace
