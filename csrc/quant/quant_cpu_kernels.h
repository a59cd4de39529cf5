// The CPU int8 kernels, written once over an instruction-set traits struct `I` that each
// quant_cpu_<isa>.cpp defines before including this header:
//   V                      fp32 lanes (Vec1 / Vec8 / Vec16 of common/cpu_vec*.h)
//   KW, A, B, Acc          int8 dot product: KW bytes of K per step; load_a / load_b give the a and
//                          b operands of KW bytes, dot(acc, a, b) adds their products into int32
//                          lanes (wrapping), hsum(acc) the lanes' sum modulo 2^32
//   kOffset, row_sum       true where dot computes sum (b + 128) * a (vpdpbusd takes unsigned b):
//                          the tile subtracts 128 * row_sum(a row) afterwards. Wrapping int32
//                          maths keeps this exact whenever the true sum fits in int32.
//   load_w, fma, store_q   w8a16: V::W int8 weights as fp32 lanes; a * b + c; quantise lanes
//                          already divided by the scale (round half to even, clamp to +-127)
// Tiles are MR x NR dot products ("NT" layout: a and b rows are both K-contiguous, so nothing is
// packed and M = 1 streams the weight once); the K tail shorter than one step runs in scalar.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/cpu_vec.h"
#include "quant/quant_cpu.h"

namespace {
using bigkernels::quant::cpu::DType;
using bigkernels::quant::cpu::GemmArgs;

constexpr int kMR = 4;  // rows of a per tile
constexpr int kNR = 6;  // rows of b per tile (4 x 6 accumulators + operands fit 32 zmm registers)

// Scalar quantisation of one value already divided by its row scale (no NaN reaches here).
inline void store_q1(float t, int8_t* p) {
  t = std::min(std::max(t, -127.0f), 127.0f);
  *p = static_cast<int8_t>(std::nearbyint(t));  // the default rounding mode: half to even
}

inline void store_float(DType dt, void* out, int64_t idx, float v) {
  switch (dt) {
    case DType::f32: static_cast<float*>(out)[idx] = v; break;
    case DType::bf16: static_cast<bf16_t*>(out)[idx] = float_to_bf16(v); break;
    case DType::f16: static_cast<fp16_t*>(out)[idx] = float_to_fp16(v); break;
    case DType::i32: break;  // not a float output
  }
}

// ---------------------------------------------------------------- quantize_per_token
template <class I, class T>
void quantize_rows_t(const T* x, int64_t ldx, int64_t K, int64_t r0, int64_t r1, int8_t* q, float* scale) {
  using V = typename I::V;
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = x + r * ldx;
    int8_t* qr = q + r * K;
    // absmax with NaN propagating (vmax does; |v| = max(v, -v) keeps NaN too)
    V m(0.0f);
    int64_t k = 0;
    for (; k + V::W <= K; k += V::W) {
      const V v = V::load(row + k);
      m = vmax(m, vmax(v, -v));
    }
    alignas(64) float lanes[V::W];
    m.store(lanes);
    float amax = 0.0f;
    for (int l = 0; l < V::W; ++l) amax = (lanes[l] != lanes[l] || lanes[l] > amax) ? lanes[l] : amax;
    for (; k < K; ++k) {
      const float v = std::fabs(Vec1::load(row + k).x);
      amax = (v != v || v > amax) ? v : amax;
    }
    const float s = amax / 127.0f;  // the reference's fp32 division
    scale[r] = s;
    // scale 0 (zero row), NaN (a NaN in the row) or inf (an inf in the row): every element
    // quantises to 0 in the reference (x / 0 is masked; x / NaN and inf / inf are NaN -> 0;
    // finite / inf is 0).
    if (!(s > 0.0f && s < INFINITY)) {
      std::memset(qr, 0, size_t(K));
      continue;
    }
    const V sv(s);
    k = 0;
    for (; k + V::W <= K; k += V::W) I::store_q(V::load(row + k) / sv, qr + k);
    for (; k < K; ++k) store_q1(Vec1::load(row + k).x / s, qr + k);
  }
}

template <class I>
void quantize_rows_any(DType dt, const void* x, int64_t ldx, int64_t K, int64_t r0, int64_t r1, int8_t* q,
                       float* scale) {
  switch (dt) {
    case DType::f32: return quantize_rows_t<I>(static_cast<const float*>(x), ldx, K, r0, r1, q, scale);
    case DType::bf16: return quantize_rows_t<I>(static_cast<const bf16_t*>(x), ldx, K, r0, r1, q, scale);
    case DType::f16: return quantize_rows_t<I>(static_cast<const fp16_t*>(x), ldx, K, r0, r1, q, scale);
    case DType::i32: return;
  }
}

// ---------------------------------------------------------------- int8 GEMM
// One MR x NR tile at (m, n); comp[i] is what kOffset added to row m + i.
template <class I, int MR, int NR>
void i8_tile(const GemmArgs& g, int64_t m, int64_t n, const uint32_t* comp) {
  const int8_t* a = static_cast<const int8_t*>(g.a) + m * g.lda;
  const int8_t* b = g.b + n * g.ldb;
  const int64_t K = g.K, Kv = K - K % I::KW;
  typename I::Acc acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = I::zero();
  for (int64_t k = 0; k < Kv; k += I::KW) {
    typename I::A av[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) av[i] = I::load_a(a + i * g.lda + k);
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      const typename I::B bv = I::load_b(b + j * g.ldb + k);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) acc[i][j] = I::dot(acc[i][j], av[i], bv);
    }
  }
  for (int i = 0; i < MR; ++i) {
    const int8_t* ar = a + i * g.lda;
    for (int j = 0; j < NR; ++j) {
      const int8_t* br = b + j * g.ldb;
      uint32_t s = I::hsum(acc[i][j]) - comp[i];
      for (int64_t k = Kv; k < K; ++k) s += uint32_t(int32_t(ar[k]) * int32_t(br[k]));
      const int32_t v = static_cast<int32_t>(s);
      const int64_t idx = (m + i) * g.ldo + (n + j);
      if (g.out_dtype == DType::i32) {
        static_cast<int32_t*>(g.out)[idx] = v;
      } else {  // the reference's order: acc * a_scale * b_scale + bias, in fp32
        float o = float(v) * g.a_scale[m + i] * g.b_scale[n + j];
        if (g.bias) o = o + g.bias[n + j];
        store_float(g.out_dtype, g.out, idx, o);
      }
    }
  }
}

// Rows per full tile: I::kTileRows where the ISA sets it (AVX2: its 16 registers hold 2 x 6
// accumulators and their operands, not 4 x 6), else kMR.
template <class I>
constexpr int tile_rows() {
  if constexpr (requires { I::kTileRows; }) {
    return I::kTileRows;
  } else {
    return kMR;
  }
}

// Tiles of MR rows over columns [n0, n1): full kNR-wide tiles, then one narrower tile.
template <class I, int MR, template <class, int, int> class Tile, class... Args>
void row_of_tiles(int64_t n0, int64_t n1, const Args&... args) {
  int64_t n = n0;
  for (; n + kNR <= n1; n += kNR) Tile<I, MR, kNR>::run(n, args...);
  switch (n1 - n) {
    case 1: Tile<I, MR, 1>::run(n, args...); break;
    case 2: Tile<I, MR, 2>::run(n, args...); break;
    case 3: Tile<I, MR, 3>::run(n, args...); break;
    case 4: Tile<I, MR, 4>::run(n, args...); break;
    case 5: Tile<I, MR, 5>::run(n, args...); break;
    default: break;
  }
}

// Rows [m0, m1) in tiles of tile_rows<I>() (the last one narrower); each row tile sweeps [n0, n1)
// while its a rows stay in L1, and the binding sizes [n0, n1) so those b rows stay in L2 across
// row tiles.
template <class I, template <class, int, int> class Tile, class... Args>
void block_of_tiles(int64_t m0, int64_t m1, int64_t n0, int64_t n1, const Args&... args) {
  constexpr int MR = tile_rows<I>();
  static_assert(MR >= 1 && MR <= kMR);
  int64_t m = m0;
  for (; m + MR <= m1; m += MR) row_of_tiles<I, MR, Tile>(n0, n1, m, args...);
  switch (m1 - m) {
    case 1: row_of_tiles<I, 1, Tile>(n0, n1, m, args...); break;
    case 2: row_of_tiles<I, 2, Tile>(n0, n1, m, args...); break;
    case 3: row_of_tiles<I, 3, Tile>(n0, n1, m, args...); break;
    default: break;
  }
}

template <class I, int MR, int NR>
struct I8Tile {  // comp holds rows [m0, ...)
  static void run(int64_t n, int64_t m, const GemmArgs& g, const uint32_t* comp, int64_t m0) {
    i8_tile<I, MR, NR>(g, m, n, comp + (m - m0));
  }
};

template <class I>
void int8_gemm_block(const GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (m0 >= m1 || n0 >= n1) return;
  // comp[m - m0] = 128 * (sum of a's row m over the vector part of K) where kOffset, else 0.
  std::vector<uint32_t> comp(size_t(m1 - m0), 0u);
  if constexpr (I::kOffset) {
    const int64_t Kv = g.K - g.K % I::KW;
    for (int64_t m = m0; m < m1; ++m)
      comp[m - m0] = 128u * I::row_sum(static_cast<const int8_t*>(g.a) + m * g.lda, Kv);
  }
  block_of_tiles<I, I8Tile>(m0, m1, n0, n1, g, comp.data(), m0);
}

// ---------------------------------------------------------------- w8a16 / dense GEMM (fp32 a)
// fp32 a times weights of type WT: int8 (w8a16: I::load_w widens them, then the row scale) or a
// float type (dense_mm: V::load converts bf16 / fp16, no scale).
template <class I>
typename I::V load_weight(const int8_t* p) { return I::load_w(p); }
template <class I, class WT>
typename I::V load_weight(const WT* p) { return I::V::load(p); }
inline float weight1(const int8_t* p) { return float(*p); }
template <class WT>
float weight1(const WT* p) { return Vec1::load(p).x; }

template <class I, class WT, int MR, int NR>
void wf_tile(const GemmArgs& g, const WT* w, int64_t m, int64_t n) {
  using V = typename I::V;
  const float* a = static_cast<const float*>(g.a) + m * g.lda;
  const WT* b = w + n * g.ldb;
  const int64_t K = g.K, Kv = K - K % V::W;
  V acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = V(0.0f);
  for (int64_t k = 0; k < Kv; k += V::W) {
    V av[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) av[i] = V::load(a + i * g.lda + k);
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      const V bv = load_weight<I>(b + j * g.ldb + k);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) acc[i][j] = I::fma(av[i], bv, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    const float* ar = a + i * g.lda;
    for (int j = 0; j < NR; ++j) {
      const WT* br = b + j * g.ldb;
      float s = float(acc[i][j].sum_lanes());
      for (int64_t k = Kv; k < K; ++k) s += ar[k] * weight1(br + k);
      float o = g.b_scale ? s * g.b_scale[n + j] : s;
      if (g.bias) o = o + g.bias[n + j];
      store_float(g.out_dtype, g.out, (m + i) * g.ldo + (n + j), o);
    }
  }
}

template <class I, int MR, int NR>
struct W8Tile {
  static void run(int64_t n, int64_t m, const GemmArgs& g) { wf_tile<I, int8_t, MR, NR>(g, g.b, m, n); }
};

template <class I>
void w8a16_gemm_block(const GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (m0 >= m1 || n0 >= n1) return;
  block_of_tiles<I, W8Tile>(m0, m1, n0, n1, g);
}

template <class WT>
struct DenseTiles {
  template <class I, int MR, int NR>
  struct Tile {
    static void run(int64_t n, int64_t m, const GemmArgs& g) {
      wf_tile<I, WT, MR, NR>(g, static_cast<const WT*>(g.w), m, n);
    }
  };
};

template <class I>
void dense_gemm_block(const GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (m0 >= m1 || n0 >= n1) return;
  switch (g.w_dtype) {
    case DType::f32: return block_of_tiles<I, DenseTiles<float>::template Tile>(m0, m1, n0, n1, g);
    case DType::bf16: return block_of_tiles<I, DenseTiles<bf16_t>::template Tile>(m0, m1, n0, n1, g);
    case DType::f16: return block_of_tiles<I, DenseTiles<fp16_t>::template Tile>(m0, m1, n0, n1, g);
    case DType::i32: return;
  }
}

}  // namespace
