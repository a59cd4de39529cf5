// The CPU sparse linear kernels, written once over an instruction-set traits struct `I` that each
// sparse_cpu_<isa>.cpp defines before including this header:
//   V                        fp32 lanes (Vec1 / Vec8 / Vec16 of common/cpu_vec*.h), V::W lanes
//   fma(a, b, c), hsum(v)    a * b + c; the sum of the lanes
//   Idx, Msk                 CSR gathers: load_idx(W int32), in_range(idx, K) (0 <= idx < K),
//                            all(m), gather(base, idx, cols) (base[idx], every lane in range; cols:
//                            the W indices idx was loaded from, for instances that load them as scalars)
//   Sel, sel_idx, sel2       2:4 (W > 1 only): sel_idx(W/2 meta bytes) -> the W positions 4g + p
//                            of the kept inputs among 2W; sel2(s, lo, hi) -> those W inputs of the
//                            2W inputs lo (first W) and hi (next W)
// Weights are read in their own dtype T (fp32 / bf16 / fp16) and converted in registers; x arrives
// in fp32; sums are fp32; outputs are stored one element at a time in the output dtype (each is
// the end of a whole dot product, so the conversion costs nothing next to it).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/cpu_vec.h"
#include "sparse/sparse_cpu.h"

namespace {
using bigkernels::sparse::cpu::DType;
using bigkernels::sparse::cpu::SparseArgs;

inline void store_out(DType dt, void* out, int64_t idx, float v) {
  switch (dt) {
    case DType::f32: static_cast<float*>(out)[idx] = v; break;
    case DType::bf16: static_cast<bf16_t*>(out)[idx] = float_to_bf16(v); break;
    case DType::f16: static_cast<fp16_t*>(out)[idx] = float_to_fp16(v); break;
  }
}

inline float bias_of(const SparseArgs& a, int64_t n) { return a.bias ? a.bias[n] : 0.0f; }

// One lane: the scalar instance, and every instance's tail of lanes.
struct ScalarIsa {
  using V = Vec1;
  using Idx = int32_t;
  using Msk = bool;
  struct Sel {};
  static V fma(V a, V b, V c) { return V(a.x * b.x + c.x); }
  static float hsum(V v) { return v.x; }
  static Idx load_idx(const int32_t* p) { return *p; }
  static Msk in_range(Idx i, uint32_t K) { return uint32_t(i) < K; }
  static bool all(Msk m) { return m; }
  static V gather(const float* base, Idx i, const int32_t*) { return V(base[i]); }
  static Sel sel_idx(const uint8_t*) { return {}; }
  static V sel2(Sel, V, V) { return V(0.0f); }
};

// ------------------------------------------------------------------ CSR, small M: gathers
// MR rows of x share each vector of col indices and values.
template <class I, class T, int MR>
int64_t csr_gather(const SparseArgs& a, int64_t m, int64_t n0, int64_t n1) {
  using V = typename I::V;
  constexpr int W = V::W;
  const T* vals = static_cast<const T*>(a.w);
  const float* x = a.x + m * a.K;
  const uint32_t K = uint32_t(a.K);
  int64_t bad = 0;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t s = a.crow[n], e = a.crow[n + 1];
    V acc[MR];
    for (int i = 0; i < MR; ++i) acc[i] = V(0.0f);
    bool ok = true;
    int64_t j = s;
    for (; j + W <= e; j += W) {
      const typename I::Idx idx = I::load_idx(a.col + j);
      if (!I::all(I::in_range(idx, K))) {  // an error (the caller raises): x is not read outside it
        ok = false;
        continue;
      }
      const V v = V::load(vals + j);
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) acc[i] = I::fma(v, I::gather(x + i * a.K, idx, a.col + j), acc[i]);
    }
    if (!ok) ++bad;
    float tail[MR] = {};
    for (; j < e; ++j) {
      const int32_t c = a.col[j];
      if (uint32_t(c) >= K) { ++bad; continue; }
      const float w = Vec1::load(vals + j).x;
      for (int i = 0; i < MR; ++i) tail[i] += w * x[i * a.K + c];
    }
    for (int i = 0; i < MR; ++i)
      store_out(a.out_dtype, a.out, (m + i) * a.N + n, I::hsum(acc[i]) + tail[i] + bias_of(a, n));
  }
  return bad;
}

// ------------------------------------------------------------------ CSR, larger M: x chunks
// x chunk [K][NV*W] (rows of the chunk along the lanes): each non-zero is one broadcast weight
// times NV contiguous vectors. Two accumulator sets (even / odd non-zeros) hide the FMA latency.
template <class I, class T, int NV>
int64_t csr_chunk_rows(const SparseArgs& a, const float* xt, int64_t m, int64_t n0, int64_t n1) {
  using V = typename I::V;
  constexpr int W = V::W, CH = NV * W;
  const T* vals = static_cast<const T*>(a.w);
  const uint32_t K = uint32_t(a.K);
  const int64_t rows = std::min<int64_t>(CH, a.M - m);
  int64_t bad = 0;
  alignas(64) float res[CH];
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t s = a.crow[n], e = a.crow[n + 1];
    V acc0[NV], acc1[NV];
    for (int v = 0; v < NV; ++v) acc0[v] = acc1[v] = V(0.0f);
    int64_t j = s;
    for (; j + 2 <= e; j += 2) {
      const int32_t c0 = a.col[j], c1 = a.col[j + 1];
      if (uint32_t(c0) >= K || uint32_t(c1) >= K) { bad += 1; continue; }
      const V w0(Vec1::load(vals + j).x), w1(Vec1::load(vals + j + 1).x);
      const float* p0 = xt + int64_t(c0) * CH;
      const float* p1 = xt + int64_t(c1) * CH;
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        acc0[v] = I::fma(w0, V::load(p0 + v * W), acc0[v]);
        acc1[v] = I::fma(w1, V::load(p1 + v * W), acc1[v]);
      }
    }
    if (j < e) {
      const int32_t c0 = a.col[j];
      if (uint32_t(c0) >= K) {
        bad += 1;
      } else {
        const V w0(Vec1::load(vals + j).x);
        for (int v = 0; v < NV; ++v) acc0[v] = I::fma(w0, V::load(xt + int64_t(c0) * CH + v * W), acc0[v]);
      }
    }
    for (int v = 0; v < NV; ++v) (acc0[v] + acc1[v]).store(res + v * W);
    const float b = bias_of(a, n);
    for (int64_t l = 0; l < rows; ++l) store_out(a.out_dtype, a.out, (m + l) * a.N + n, res[l] + b);
  }
  return bad;
}

template <class I>
int64_t csr_chunk_width(int64_t M) {
  const int64_t W = I::V::W;
  return std::min<int64_t>(4, (M + W - 1) / W) * W;
}

template <class I, class T>
int64_t csr_rows_t(const SparseArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  int64_t bad = 0;
  if (a.M < bigkernels::sparse::cpu::kCsrTransposeM) {
    int64_t m = m0;
    for (; m + 2 <= m1; m += 2) bad += csr_gather<I, T, 2>(a, m, n0, n1);
    for (; m < m1; ++m) bad += csr_gather<I, T, 1>(a, m, n0, n1);
    return bad;
  }
  const int64_t CH = csr_chunk_width<I>(a.M), NV = CH / I::V::W;
  for (int64_t m = m0; m < m1; m += CH) {  // m0 is a multiple of CH
    const float* xt = a.xt + (m / CH) * a.K * CH;
    switch (NV) {
      case 1: bad += csr_chunk_rows<I, T, 1>(a, xt, m, n0, n1); break;
      case 2: bad += csr_chunk_rows<I, T, 2>(a, xt, m, n0, n1); break;
      case 3: bad += csr_chunk_rows<I, T, 3>(a, xt, m, n0, n1); break;
      default: bad += csr_chunk_rows<I, T, 4>(a, xt, m, n0, n1); break;
    }
  }
  return bad;
}

template <class I>
int64_t csr_rows(const SparseArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  switch (a.w_dtype) {
    case DType::f32: return csr_rows_t<I, float>(a, m0, m1, n0, n1);
    case DType::bf16: return csr_rows_t<I, bf16_t>(a, m0, m1, n0, n1);
    default: return csr_rows_t<I, fp16_t>(a, m0, m1, n0, n1);
  }
}

// ------------------------------------------------------------------ BSR, small M: dot products
// MR rows of x times NR output features of a block row at once, lanes along the block's K (each
// weight vector loaded once for the MR rows); the lanes are summed once per block row.
template <class I, class T, int MR, int NR>
void bsr_dot(const SparseArgs& a, int64_t m, int64_t r, int64_t i0) {
  using V = typename I::V;
  constexpr int W = V::W;
  const int64_t B = a.B, s = a.crow[r], e = a.crow[r + 1];
  const T* blocks = static_cast<const T*>(a.w);
  const float* x = a.x + m * a.K;
  V acc[MR][NR];
  float tail[MR][NR] = {};
  for (int h = 0; h < MR; ++h)
    for (int i = 0; i < NR; ++i) acc[h][i] = V(0.0f);
  for (int64_t j = s; j < e; ++j) {
    const float* xp = x + int64_t(a.col[j]) * B;
    const T* bp = blocks + (j * B + i0) * B;
    int64_t kk = 0;
    for (; kk + W <= B; kk += W) {
      V xv[MR];
#pragma GCC unroll 4
      for (int h = 0; h < MR; ++h) xv[h] = V::load(xp + h * a.K + kk);
#pragma GCC unroll 8
      for (int i = 0; i < NR; ++i) {
        const V wv = V::load(bp + i * B + kk);
#pragma GCC unroll 4
        for (int h = 0; h < MR; ++h) acc[h][i] = I::fma(wv, xv[h], acc[h][i]);
      }
    }
    for (; kk < B; ++kk)
      for (int i = 0; i < NR; ++i) {
        const float w = Vec1::load(bp + i * B + kk).x;
        for (int h = 0; h < MR; ++h) tail[h][i] += w * xp[h * a.K + kk];
      }
  }
  const int64_t n = r * B + i0;
  for (int h = 0; h < MR; ++h)
    for (int i = 0; i < NR; ++i)
      store_out(a.out_dtype, a.out, (m + h) * a.N + n + i, I::hsum(acc[h][i]) + tail[h][i] + bias_of(a, n + i));
}

// One block row for rows [m0, m1): pairs of rows by 4 features (2 x 4 accumulators fit AVX2's 16
// registers with the operands), a last odd row by 8. Features outer, rows inner: the slice of
// the block row a tile reads (4 features x its blocks) stays in cache for every pair of rows.
template <class I, class T>
void bsr_dot_rows(const SparseArgs& a, int64_t m0, int64_t m1, int64_t r) {
  const int64_t B = a.B, pairs_end = m0 + (m1 - m0) / 2 * 2;
  int64_t i0 = 0;
  for (; i0 + 8 <= B; i0 += 8) {
    for (int64_t m = m0; m < pairs_end; m += 2) {
      bsr_dot<I, T, 2, 4>(a, m, r, i0);
      bsr_dot<I, T, 2, 4>(a, m, r, i0 + 4);
    }
    if (pairs_end < m1) bsr_dot<I, T, 1, 8>(a, pairs_end, r, i0);
  }
  for (; i0 < B; ++i0) {
    for (int64_t m = m0; m < pairs_end; m += 2) bsr_dot<I, T, 2, 1>(a, m, r, i0);
    if (pairs_end < m1) bsr_dot<I, T, 1, 1>(a, pairs_end, r, i0);
  }
}

// ------------------------------------------------------------------ BSR, larger M: broadcasts
// The block row, transposed to [block][k][i] fp32 in scratch, times MR broadcast x values per k:
// MR x NV vectors of outputs along i, no lane sums, like a dense GEMM micro-kernel.
template <class I, int MR, int NV>
void bsr_bcast_tile(const SparseArgs& a, const float* bt, int64_t nb, int64_t m, int64_t r, int64_t i0) {
  using V = typename I::V;
  constexpr int W = V::W;
  const int64_t B = a.B, s = a.crow[r];
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = V(0.0f);
  for (int64_t j = 0; j < nb; ++j) {
    const float* xp = a.x + m * a.K + int64_t(a.col[s + j]) * B;
    const float* bp = bt + j * B * B + i0;
    for (int64_t kk = 0; kk < B; ++kk) {
      V bv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) bv[v] = V::load(bp + kk * B + v * W);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const V xb(xp[i * a.K + kk]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[i][v] = I::fma(xb, bv[v], acc[i][v]);
      }
    }
  }
  alignas(64) float res[NV * W];
  const int64_t n = r * B + i0;
  for (int i = 0; i < MR; ++i) {
    for (int v = 0; v < NV; ++v) acc[i][v].store(res + v * W);
    for (int l = 0; l < NV * W; ++l)
      store_out(a.out_dtype, a.out, (m + i) * a.N + n + l, res[l] + bias_of(a, n + l));
  }
}

template <class I, int MR>
void bsr_bcast_rows(const SparseArgs& a, const float* bt, int64_t nb, int64_t m, int64_t r) {
  constexpr int W = I::V::W;
  int64_t i0 = 0;
  for (; i0 + 4 * W <= a.B; i0 += 4 * W) bsr_bcast_tile<I, MR, 4>(a, bt, nb, m, r, i0);
  for (; i0 + W <= a.B; i0 += W) bsr_bcast_tile<I, MR, 1>(a, bt, nb, m, r, i0);
  for (; i0 < a.B; ++i0) bsr_bcast_tile<ScalarIsa, MR, 1>(a, bt, nb, m, r, i0);
}

template <class I, class T>
void bsr_rows_t(const SparseArgs& a, int64_t m0, int64_t m1, int64_t r0, int64_t r1) {
  const int64_t B = a.B;
  const T* blocks = static_cast<const T*>(a.w);
  for (int64_t r = r0; r < r1; ++r) {
    if (a.M < bigkernels::sparse::cpu::kBsrTransposeM) {
      bsr_dot_rows<I, T>(a, m0, m1, r);
      continue;
    }
    const int64_t s = a.crow[r], nb = a.crow[r + 1] - s;
    float* bt = a.scratch;
    for (int64_t j = 0; j < nb; ++j) {
      const T* src = blocks + (s + j) * B * B;
      float* dst = bt + j * B * B;
      for (int64_t i = 0; i < B; ++i)
        for (int64_t kk = 0; kk < B; ++kk) dst[kk * B + i] = Vec1::load(src + i * B + kk).x;
    }
    int64_t m = m0;
    for (; m + 6 <= m1; m += 6) bsr_bcast_rows<I, 6>(a, bt, nb, m, r);
    for (; m < m1; ++m) bsr_bcast_rows<I, 1>(a, bt, nb, m, r);
  }
}

template <class I>
void bsr_rows(const SparseArgs& a, int64_t m0, int64_t m1, int64_t r0, int64_t r1) {
  switch (a.w_dtype) {
    case DType::f32: return bsr_rows_t<I, float>(a, m0, m1, r0, r1);
    case DType::bf16: return bsr_rows_t<I, bf16_t>(a, m0, m1, r0, r1);
    default: return bsr_rows_t<I, fp16_t>(a, m0, m1, r0, r1);
  }
}

// ------------------------------------------------------------------ 2:4
// W kept weights (W/2 groups, 2W inputs) per step: their positions come from the meta bytes once
// per output feature and select the inputs of a row of x by a permute. A register tile of MR rows
// of x by NR output features shares each pair of x vectors across NR features and each feature's
// selection and values across MR rows. The weights of the NR features arrive as fp32 rows wv (ws
// floats apart) and meta rows wm (ms bytes apart), copied by sparse24_pack_w.
template <class I, int MR, int NR>
void sparse24_tile(const SparseArgs& a, int64_t m, int64_t n, const float* wv, int64_t ws, const uint8_t* wm,
                   int64_t ms) {
  using V = typename I::V;
  constexpr int W = V::W;
  const int64_t K = a.K, jn = K / 2;
  // x packed (see SparseArgs::xt): input k of row mm at xr[mm] + (k / PK) * PR * PK + k % PK
  constexpr int64_t PR = bigkernels::sparse::cpu::kSparse24PackRows, PK = bigkernels::sparse::cpu::kSparse24PackK;
  const int64_t stride = (K + PK - 1) / PK * PR * PK + bigkernels::sparse::cpu::kSparse24PackPad;
  const float* xr[MR];
  for (int i = 0; i < MR; ++i) xr[i] = a.xt + (m + i) / PR * stride + (m + i) % PR * PK;
  const float* vr[NR];
  const uint8_t* mr[NR];
  for (int r = 0; r < NR; ++r) {
    vr[r] = wv + r * ws;
    mr[r] = wm + r * ms;
  }
  V acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = V(0.0f);
  int64_t j = 0;  // kept weight j: group j / 2, inputs 2j .. 2j + 3 of the step
  if constexpr (W > 1) {
    for (; j + W <= jn; j += W) {
      V xa[MR], xb[MR];
      const int64_t k = 2 * j;
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) {
        const float* p = xr[i] + (k / PK) * PR * PK + k % PK;
        xa[i] = V::load(p);
        xb[i] = V::load(p + W);
      }
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) {
        const typename I::Sel sel = I::sel_idx(mr[r] + j / 2);
        const V v = V::load(vr[r] + j);
#pragma GCC unroll 4
        for (int i = 0; i < MR; ++i) acc[i][r] = I::fma(v, I::sel2(sel, xa[i], xb[i]), acc[i][r]);
      }
    }
  }
  float tail[MR][NR] = {};
  for (; j < jn; ++j) {
    for (int r = 0; r < NR; ++r) {
      const int64_t k = 4 * (j / 2) + ((mr[r][j / 2] >> (2 * (j & 1))) & 3);
      const float w = vr[r][j];
      for (int i = 0; i < MR; ++i) tail[i][r] += w * xr[i][(k / PK) * PR * PK + k % PK];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r)
      store_out(a.out_dtype, a.out, (m + i) * a.N + n + r, I::hsum(acc[i][r]) + tail[i][r] + bias_of(a, n + r));
}

// One row of x (M = 1: the weights stream from memory once, each feature's own dot product):
// W kept weights per step, their inputs selected by a permute of 2W inputs of x.
template <class I, class T>
void sparse24_row(const SparseArgs& a, int64_t m, int64_t n0, int64_t n1) {
  using V = typename I::V;
  constexpr int W = V::W;
  const int64_t K = a.K, half = K / 2, quarter = K / 4;
  const T* values = static_cast<const T*>(a.w);
  const float* x = a.x + m * K;
  for (int64_t n = n0; n < n1; ++n) {
    const T* vr = values + n * half;
    const uint8_t* mr = a.meta + n * quarter;
    V acc(0.0f), acc1(0.0f);  // two chains: even and odd steps
    int64_t j = 0;
    if constexpr (W > 1) {
      for (; j + 2 * W <= half; j += 2 * W) {
        acc = I::fma(V::load(vr + j), I::sel2(I::sel_idx(mr + j / 2), V::load(x + 2 * j), V::load(x + 2 * j + W)), acc);
        const int64_t j1 = j + W;
        acc1 = I::fma(V::load(vr + j1), I::sel2(I::sel_idx(mr + j1 / 2), V::load(x + 2 * j1), V::load(x + 2 * j1 + W)),
                      acc1);
      }
      for (; j + W <= half; j += W)
        acc = I::fma(V::load(vr + j), I::sel2(I::sel_idx(mr + j / 2), V::load(x + 2 * j), V::load(x + 2 * j + W)), acc);
      acc = acc + acc1;
    }
    float tail = 0.0f;
    for (; j < half; ++j) tail += Vec1::load(vr + j).x * x[4 * (j / 2) + ((mr[j / 2] >> (2 * (j & 1))) & 3)];
    store_out(a.out_dtype, a.out, m * a.N + n, I::hsum(acc) + tail + bias_of(a, n));
  }
}

// The values (as fp32) and meta of rows [n, n + nr), copied contiguous (rows ws floats / ms bytes
// apart): each row read once, in order, from memory; every tile of rows of x then finds them in
// L1 / L2.
template <class T>
void sparse24_pack_w(const SparseArgs& a, int64_t n, int nr, float* wv, int64_t ws, uint8_t* wm, int64_t ms) {
  const T* values = static_cast<const T*>(a.w);
  const int64_t half = a.K / 2, quarter = a.K / 4;
  for (int r = 0; r < nr; ++r) {
    const T* src = values + (n + r) * half;
    float* dst = wv + r * ws;
    for (int64_t j = 0; j < half; ++j) dst[j] = Vec1::load(src + j).x;
    std::memcpy(wm + r * ms, a.meta + (n + r) * quarter, size_t(quarter));
  }
}

// Rows [m0, m1) by features [n0, n1): features in tiles of NR whose weights are first copied
// (sparse24_pack_w), rows of x in tiles of MR meeting them over the whole of K (the binding sizes
// the row block so that its packed x stays in L2).
template <class I, class T>
void sparse24_rows_t(const SparseArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  constexpr int W = I::V::W;
  constexpr int MR = W > 1 ? 4 : 1, NR = W >= 16 ? 4 : W > 1 ? 2 : 1;
  if (!a.xt) {  // M = 1
    for (int64_t m = m0; m < m1; ++m) sparse24_row<I, T>(a, m, n0, n1);
    return;
  }
  const int64_t K = a.K, WS = K / 2 + 16, MS = K / 4 + 64;  // rows off 4 KB alignment
  const bool copy = !std::is_same_v<T, float> || m1 - m0 >= MR;
  std::vector<float> wbuf(copy ? size_t(NR * WS) : 0);
  std::vector<uint8_t> mbuf(copy ? size_t(NR * MS) : 0);
  float* wv = wbuf.data();
  uint8_t* wm = mbuf.data();
  // fewer rows than a tile: fp32 weights are read in place (a copy would not pay for itself)
  const bool direct = !copy;
  for (int64_t n = n0; n < n1; n += NR) {
    const int nr = int(std::min<int64_t>(NR, n1 - n));
    const float* v = wv;
    const uint8_t* mt = wm;
    int64_t vs = WS, ms = MS;
    if (direct) {
      v = static_cast<const float*>(a.w) + n * (K / 2);
      mt = a.meta + n * (K / 4);
      vs = K / 2;
      ms = K / 4;
    } else {
      sparse24_pack_w<T>(a, n, nr, wv, WS, wm, MS);
    }
    if (nr == NR) {
      int64_t m = m0;
      for (; m + MR <= m1; m += MR) sparse24_tile<I, MR, NR>(a, m, n, v, vs, mt, ms);
      for (; m < m1; ++m) sparse24_tile<I, 1, NR>(a, m, n, v, vs, mt, ms);
      continue;
    }
    for (int r = 0; r < nr; ++r) {
      int64_t m = m0;
      for (; m + MR <= m1; m += MR) sparse24_tile<I, MR, 1>(a, m, n + r, v + r * vs, vs, mt + r * ms, ms);
      for (; m < m1; ++m) sparse24_tile<I, 1, 1>(a, m, n + r, v + r * vs, vs, mt + r * ms, ms);
    }
  }
}

template <class I>
void sparse24_rows(const SparseArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  switch (a.w_dtype) {
    case DType::f32: return sparse24_rows_t<I, float>(a, m0, m1, n0, n1);
    case DType::bf16: return sparse24_rows_t<I, bf16_t>(a, m0, m1, n0, n1);
    default: return sparse24_rows_t<I, fp16_t>(a, m0, m1, n0, n1);
  }
}

template <class I>
bigkernels::sparse::cpu::Kernels make_kernels(const char* name) {
  return {name, I::V::W, csr_chunk_width<I>, csr_rows<I>, bsr_rows<I>, sparse24_rows<I>};
}

}  // namespace
