// The CPU AdamW8bit maths, written once over a lane type V (Vec1 scalar, Vec8 AVX2, Vec16
// AVX-512) and a param storage type T (float, fp16_t, bf16_t). Each adamw8bit_cpu_<isa>.cpp
// includes its lane header and this one, then specialises Codec for its lane type (the 8-bit
// codec: integer operations on the fp32 bits, no table lookups). The Vec1 codec is here: every
// ISA finishes a block's tail with it.
//
// One quantisation block at a time: pass 1 dequantises both moments, updates them and the params
// (stored at once) and keeps the new fp32 moments in an L1 scratch buffer while taking their block
// maxima; pass 2 encodes the scratch against the new scales. Every state operation is a single
// rounded fp32 operation in the reference's order (the unit is compiled with -ffp-contract=off),
// so codes and scales equal bigkernels/reference/optim.py's bit for bit on every ISA; the param
// update uses the refined reciprocal of the fused Adam kernels (within 1e-5 relative; the AVX2 codec's
// param_update uses FMAs there). The AVX2 codec replaces the hooks of CodecDefaults: both passes on
// sixteen elements in 16-bit lanes, block maxima as integer maxima.
#pragma once

#include <cmath>

#include "common/cpu_vec.h"
#include "optim/adamw8bit_cpu.h"

namespace {
using bigkernels::optim::cpu8::Adam8Args;
using bigkernels::optim::cpu8::DType;
using bigkernels::optim::cpu8::kExpAvgBinades;
using bigkernels::optim::cpu8::kExpAvgMant;
using bigkernels::optim::cpu8::kMaxBlock;
using bigkernels::optim::cpu8::kSqrtBinades;
using bigkernels::optim::cpu8::kSqrtMant;
using bigkernels::optim::cpu8::min_bits;

// ----- the codec on one lane (the definition the vector codecs repeat) ----------------------------
template <int kMant, int kBinades>
inline int32_t encode_magnitude(int32_t a) {  // a: fp32 bits of a magnitude
  constexpr int kShift = 23 - kMant;
  int32_t q = (a + ((1 << (kShift - 1)) - min_bits(kBinades))) >> kShift;
  q = q < 0 ? 0 : (q > (kBinades << kMant) ? (kBinades << kMant) : q);
  return q + 1;
}
template <int kMant, int kBinades>
inline float decode_magnitude(int32_t code) {
  return code == 0 ? 0.0f : bits_to_float(uint32_t(((code - 1) << (23 - kMant)) + min_bits(kBinades)));
}

// ----- the step ----------------------------------------------------------------------------------
template <class V>
struct Consts8 {
  V beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, mult, step_size, inv_bc2_sqrt;
  explicit Consts8(const Adam8Args& a)
      : beta1(a.beta1), one_minus_beta1(a.one_minus_beta1), beta2(a.beta2), one_minus_beta2(a.one_minus_beta2),
        eps(a.eps), decay(a.decay), mult(a.grad_mult), step_size(a.step_size), inv_bc2_sqrt(a.inv_bc2_sqrt) {}
};

inline float nan_max(float a, float b) { return a != a || a > b ? a : b; }  // NaN propagates, like torch.amax

// The codec of a lane type: Codec<V>::decode_exp_avg / decode_root (W codes -> W fp32 values in
// [-1, 1] / [0, 1]), encode_exp_avg / encode_root (W normalised values -> W codes), abs, max_lanes
// (of a max_abs / max_root accumulator; NaN propagates). Specialised here for Vec1 and by each
// ISA's unit for its lane type; the hooks of CodecDefaults (block maxima, the param update, wider
// passes 1 and 2) may be replaced by an ISA's codec.
template <class V>
struct Codec;

template <class V>
struct CodecDefaults {
  // Running NaN-propagating maxima of |m| and of r (r >= 0), reduced by max_lanes.
  static V max_abs(V acc, V m) { return vmax(acc, Codec<V>::abs(m)); }
  static V max_root(V acc, V r) { return vmax(acc, r); }
  // The param update of AdamW (decay already applied); not part of the bit-exact state.
  static V param_update(V param, V m, V r, const Consts8<V>& c) {
    return param - c.step_size * m * vrcp(r * c.inv_bc2_sqrt + c.eps);
  }
  // Pass 1 over a prefix of [0, n) (update_lanes on each W lanes); returns how many elements it did.
  template <bool kWeightDecay, class T>
  static int64_t update_wide(T*, const T*, const uint8_t*, const uint8_t*, const uint8_t*, int64_t, const V&, const V&,
                             const Consts8<V>&, float*, float*, V&, V&) {
    return 0;
  }
  // Pass 2 over a prefix of [0, n): returns how many elements it encoded (the rest: W lanes, then 1).
  static int64_t encode_wide(uint8_t*, uint8_t*, const float*, const float*, float, float, int64_t) { return 0; }
};

template <>
struct Codec<Vec1> : CodecDefaults<Vec1> {
  static Vec1 abs(Vec1 a) { return Vec1(std::fabs(a.x)); }
  static float max_lanes(Vec1 a) { return a.x; }
  static Vec1 decode_exp_avg(const uint8_t* c) {
    const float mag = decode_magnitude<kExpAvgMant, kExpAvgBinades>(*c & 127);
    return Vec1(*c & 128 ? -mag : mag);
  }
  static Vec1 decode_root(const uint8_t* c) { return Vec1(decode_magnitude<kSqrtMant, kSqrtBinades>(*c)); }
  static void encode_exp_avg(uint8_t* c, Vec1 x) {
    const uint32_t bits = float_to_bits(x.x);
    const int32_t a = int32_t(bits & 0x7fffffffu);
    if (a < min_bits(kExpAvgBinades + 1)) {  // nearer to 0 than to the smallest magnitude
      *c = 0;
      return;
    }
    *c = uint8_t(encode_magnitude<kExpAvgMant, kExpAvgBinades>(a) | ((bits >> 24) & 128u));
  }
  static void encode_root(uint8_t* c, Vec1 x) {
    const int32_t a = int32_t(float_to_bits(x.x) & 0x7fffffffu);
    *c = a == 0 ? 0 : uint8_t(encode_magnitude<kSqrtMant, kSqrtBinades>(a));
  }
};

// Pass 1 on lanes [i, i + V::W) from the dequantised moments m and r: new moments into the scratch
// (m, root) and the block maxima, the param stored.
template <class V, bool kWeightDecay, class T>
inline void update_decoded(T* p, const T* g, const uint8_t* keep, int64_t i, V m, V r, const Consts8<V>& c,
                           float* m_out, float* r_out, V& m_max, V& r_max) {
  using C = Codec<V>;
  const V grad = V::load(g + i) * c.mult;
  m = m * c.beta1 + grad * c.one_minus_beta1;
  r = vsqrt((r * r) * c.beta2 + (grad * c.one_minus_beta2) * grad);
  V param = V::load(p + i);
  if constexpr (kWeightDecay) param = param * c.decay;
  param = C::param_update(param, m, r, c);
  if (keep != nullptr) param = keep_or_zero(param, keep + i);
  param.store(p + i);
  m.store(m_out + i);
  r.store(r_out + i);
  m_max = C::max_abs(m_max, m);
  r_max = C::max_root(r_max, r);
}

template <class V, bool kWeightDecay, class T>
inline void update_lanes(T* p, const T* g, const uint8_t* mc, const uint8_t* rc, const uint8_t* keep, int64_t i,
                         const V& m_scale, const V& r_scale, const Consts8<V>& c, float* m_out, float* r_out,
                         V& m_max, V& r_max) {
  using C = Codec<V>;
  update_decoded<V, kWeightDecay>(p, g, keep, i, C::decode_exp_avg(mc + i) * m_scale,
                                  C::decode_root(rc + i) * r_scale, c, m_out, r_out, m_max, r_max);
}

// One block of n <= block_size elements.
template <class V, bool kWeightDecay, class T>
inline void adamw8bit_block(T* p, const T* g, uint8_t* mc, uint8_t* rc, float* ms, float* rs, const uint8_t* keep,
                            int64_t n, const Consts8<V>& c, const Consts8<Vec1>& c1, float* m_buf, float* r_buf) {
  const V m_scale(*ms), r_scale(*rs);
  const Vec1 m_scale1(*ms), r_scale1(*rs);
  V m_max(0.0f), r_max(0.0f);
  Vec1 m_max1(0.0f), r_max1(0.0f);
  int64_t i = Codec<V>::template update_wide<kWeightDecay>(p, g, mc, rc, keep, n, m_scale, r_scale, c, m_buf, r_buf,
                                                          m_max, r_max);
  for (; i + V::W <= n; i += V::W)
    update_lanes<V, kWeightDecay>(p, g, mc, rc, keep, i, m_scale, r_scale, c, m_buf, r_buf, m_max, r_max);
  for (; i < n; ++i)
    update_lanes<Vec1, kWeightDecay>(p, g, mc, rc, keep, i, m_scale1, r_scale1, c1, m_buf, r_buf, m_max1, r_max1);
  const float m_abs = nan_max(Codec<V>::max_lanes(m_max), m_max1.x);
  const float r_abs = nan_max(Codec<V>::max_lanes(r_max), r_max1.x);
  // Pass 2: codes against the new scales (a zero scale: every code 0).
  const float m_inv = m_abs > 0.0f ? 1.0f / m_abs : 0.0f, r_inv = r_abs > 0.0f ? 1.0f / r_abs : 0.0f;
  const V m_inv_v(m_inv), r_inv_v(r_inv);
  i = Codec<V>::encode_wide(mc, rc, m_buf, r_buf, m_inv, r_inv, n);
  for (; i + V::W <= n; i += V::W) {
    Codec<V>::encode_exp_avg(mc + i, V::load(m_buf + i) * m_inv_v);
    Codec<V>::encode_root(rc + i, V::load(r_buf + i) * r_inv_v);
  }
  for (; i < n; ++i) {
    Codec<Vec1>::encode_exp_avg(mc + i, Vec1(m_buf[i] * m_inv));
    Codec<Vec1>::encode_root(rc + i, Vec1(r_buf[i] * r_inv));
  }
  *ms = m_abs;
  *rs = r_abs;
}

template <class V, bool kWeightDecay, class T>
void adamw8bit_range_impl(T* p, const T* g, uint8_t* mc, uint8_t* rc, float* ms, float* rs, const uint8_t* keep,
                          int64_t n, int64_t block, const Adam8Args& a) {
  const Consts8<V> c(a);
  const Consts8<Vec1> c1(a);
  alignas(64) float m_buf[kMaxBlock], r_buf[kMaxBlock];
  for (int64_t b = 0, start = 0; start < n; ++b, start += block) {
    const int64_t len = n - start < block ? n - start : block;
    adamw8bit_block<V, kWeightDecay>(p + start, g + start, mc + start, rc + start, ms + b, rs + b,
                                     keep != nullptr ? keep + start : nullptr, len, c, c1, m_buf, r_buf);
  }
}

template <class V, class T>
void adamw8bit_range(T* p, const T* g, uint8_t* mc, uint8_t* rc, float* ms, float* rs, const uint8_t* keep, int64_t n,
                     int64_t block, const Adam8Args& a) {
  if (a.weight_decay) return adamw8bit_range_impl<V, true>(p, g, mc, rc, ms, rs, keep, n, block, a);
  return adamw8bit_range_impl<V, false>(p, g, mc, rc, ms, rs, keep, n, block, a);
}

// Param storage-type dispatch, instantiated once per lane type.
template <class V>
void adamw8bit_any(DType dt, void* p, const void* g, uint8_t* mc, uint8_t* rc, float* ms, float* rs,
                   const uint8_t* keep, int64_t n, int64_t block, const Adam8Args& a) {
  switch (dt) {
    case DType::f32: return adamw8bit_range<V>((float*)p, (const float*)g, mc, rc, ms, rs, keep, n, block, a);
    case DType::f16: return adamw8bit_range<V>((fp16_t*)p, (const fp16_t*)g, mc, rc, ms, rs, keep, n, block, a);
    case DType::bf16: return adamw8bit_range<V>((bf16_t*)p, (const bf16_t*)g, mc, rc, ms, rs, keep, n, block, a);
  }
}

}  // namespace
