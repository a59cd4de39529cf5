// The CPU codebook kernels, written once over an instruction-set traits struct `I` that each
// codebook_cpu_<isa>.cpp defines before including this header:
//   V                       fp32 lanes (Vec1 / Vec8 of common/cpu_vec*.h)
//   fma(a, b, c)            a * b + c
//   Dec<BITS>               a decoder built from one codebook (fp32 table of 2**BITS entries):
//                           load(row, k) gives the V::W weights k, k+1, ... of a packed index row
//                           (k a multiple of V::W) looked up in the table, for k < fast_end(K);
//                           load_last(row, k) the same for the one step in [fast_end, vec_end)
//                           (3 bits: the row's last 3-byte unit, read without touching the byte
//                           after it).
//   kNibbleGemm, nibble_gemm   true where the instruction set has its own 4-bit GEMM (AVX2:
//                           byte shuffles, codebook_cpu_avx2.cpp); nibble_gemm(g, m0, m1, n0, n1)
// Tiles are MR x NR dot products: each step decodes NR weight vectors once and multiplies them
// by the MR rows of x (M = 1 streams the packed weight once; no dense weight is ever stored). The
// K tail shorter than one step runs in scalar with the same table. From a few rows of x on, the
// AVX2 unit runs the panel engine instead (codebook_cpu_panels.h: each index panel decoded once
// per block of up to 264 rows); it replaced a panel GEMM of this file (fp32 panels, 3 x 4 NT
// tiles) that it beat at every M from 12 on (measured, same process: 1024^2 M = 256 1.03x vs
// 0.77x F.linear, 4096^2 M = 512 1.06x vs 0.75x).
#pragma once

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "codebook/codebook_cpu.h"
#include "common/cpu_vec.h"

namespace {
using bigkernels::codebook::cpu::DType;
using bigkernels::codebook::cpu::Format;
using bigkernels::codebook::cpu::GemmArgs;

constexpr int kMR = 4;  // rows of x per tile
// Software prefetch distance along a packed row (bytes). Measured on Zen 3: without it the
// decoders run ~1.5x slower on rows streamed from L3/DRAM than on rows in L1.
constexpr int64_t kPrefetchBytes = 1024;

// Rows of W per tile for MR rows of x: accumulators + decoded vectors + the decoder's table and
// shift registers + one x vector fit AVX2's 16 ymm registers.
constexpr int nr_for(int mr) { return mr == 1 ? 4 : (mr == 2 ? 3 : (mr <= 4 ? 2 : 1)); }

// Rows of x per tile for BITS-bit indices: 8 for 8 bits on a vector ISA (its decoder holds no
// registers: up to 8 accumulators + 1 weight + 1 x vector), so that 5 .. 8 rows of x decode each
// weight once instead of twice (an 8-bit lookup costs ~4 instructions per weight, the most of
// any width); kMR otherwise.
template <class I, int BITS>
constexpr int mr_for() { return BITS == 8 && I::V::W > 1 ? 8 : kMR; }

// The BITS-bit index of entry k of a packed row (any k: the scalar path and the K tail).
template <int BITS>
inline uint32_t index_at(const uint8_t* row, int64_t k) {
  if constexpr (BITS == 8) {
    return row[k];
  } else if constexpr (BITS == 4) {
    return (row[k >> 1] >> ((k & 1) << 2)) & 15u;
  } else if constexpr (BITS == 2) {
    return (row[k >> 2] >> ((k & 3) << 1)) & 3u;
  } else {  // 3: eight indices per 3-byte little-endian unit
    const uint8_t* p = row + 3 * (k >> 3);
    const uint32_t u = uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16);
    return (u >> (3 * (k & 7))) & 7u;
  }
}

inline void store_float(DType dt, void* out, int64_t idx, float v) {
  switch (dt) {
    case DType::f32: static_cast<float*>(out)[idx] = v; break;
    case DType::bf16: static_cast<bf16_t*>(out)[idx] = float_to_bf16(v); break;
    case DType::f16: static_cast<fp16_t*>(out)[idx] = float_to_fp16(v); break;
  }
}

// End of the vector steps, and of those whose loads may read the byte after their unit.
template <class I, int BITS>
struct Steps {
  int64_t fast, vec;
  explicit Steps(int64_t K) {
    constexpr int W = I::V::W;
    vec = K - K % W;
    fast = vec;
    if constexpr (BITS == 3 && W > 1) fast = std::min<int64_t>(vec, 8 * ((K + 7) / 8 - 1));
  }
};

// ---------------------------------------------------------------- lookup-table GEMM
template <class I, int BITS, int MR, int NR>
void lut_tile(const GemmArgs& g, int64_t m, int64_t n, const float* table, const Steps<I, BITS>& st) {
  using V = typename I::V;
  const typename I::template Dec<BITS> dec(table);
  const float* x = g.x + m * g.ldx;
  const uint8_t* w = g.w.idx + n * g.w.ldi;
  const int64_t ldx = g.ldx, ldi = g.w.ldi, K = g.w.K;
  V acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = V(0.0f);
  auto step = [&](int64_t k, auto load) {
    V wv[NR];
    if ((k & 63) == 0) {  // one software prefetch per row and 64 weights, kPrefetchBytes ahead
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) __builtin_prefetch(w + j * ldi + (k * BITS >> 3) + kPrefetchBytes);
    }
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) wv[j] = load(w + j * ldi, k);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const V xv = V::load(x + i * ldx + k);
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) acc[i][j] = I::fma(xv, wv[j], acc[i][j]);
    }
  };
  int64_t k = 0;
  for (; k < st.fast; k += V::W) step(k, [&](const uint8_t* r, int64_t kk) { return dec.load(r, kk); });
  for (; k < st.vec; k += V::W) step(k, [&](const uint8_t* r, int64_t kk) { return dec.load_last(r, kk); });
  for (int i = 0; i < MR; ++i) {
    const float* xr = x + i * ldx;
    for (int j = 0; j < NR; ++j) {
      const uint8_t* wr = w + j * ldi;
      float s = float(acc[i][j].sum_lanes());
      for (int64_t kk = st.vec; kk < K; ++kk) s += xr[kk] * table[index_at<BITS>(wr, kk)];
      if (g.bias) s = s + g.bias[n + j];
      store_float(g.out_dtype, g.out, (m + i) * g.ldo + (n + j), s);
    }
  }
}

// Calls tile(std::integral_constant<int, R>{}, n, table) over rows [n0, n1) of W in tiles of
// R = NR rows that share one codebook (a tile never straddles a group boundary), the last rows
// of each group with R = 1.
template <int NR, class Tile>
void over_row_tiles(const Format& f, int64_t n0, int64_t n1, const Tile& tile) {
  const int64_t gs = f.group_size, C = int64_t(1) << f.bits;
  int64_t n = n0;
  while (n < n1) {
    const int64_t grp = n / gs;
    const int64_t end = std::min(n1, (grp + 1) * gs);
    const float* table = f.table + grp * C;
    for (; n + NR <= end; n += NR) tile(std::integral_constant<int, NR>{}, n, table);
    for (; n < end; ++n) tile(std::integral_constant<int, 1>{}, n, table);
  }
}

// Calls rows(std::integral_constant<int, R>{}, m) over rows [m0, m1) of x in tiles of R = MR
// rows (kMR or 8), then one narrower tile of the rows left.
template <int MR = kMR, class Rows>
void over_x_tiles(int64_t m0, int64_t m1, const Rows& rows) {
  static_assert(MR == kMR || MR == 8, "tiles of kMR or 8 rows");
  int64_t m = m0;
  for (; m + MR <= m1; m += MR) rows(std::integral_constant<int, MR>{}, m);
  switch (m1 - m) {
    case 1: rows(std::integral_constant<int, 1>{}, m); break;
    case 2: rows(std::integral_constant<int, 2>{}, m); break;
    case 3: rows(std::integral_constant<int, 3>{}, m); break;
    default:
      if constexpr (MR == 8) {
        switch (m1 - m) {
          case 4: rows(std::integral_constant<int, 4>{}, m); break;
          case 5: rows(std::integral_constant<int, 5>{}, m); break;
          case 6: rows(std::integral_constant<int, 6>{}, m); break;
          case 7: rows(std::integral_constant<int, 7>{}, m); break;
          default: break;
        }
      }
      break;
  }
}

template <class I, int BITS>
void lut_gemm_bits(const GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const Steps<I, BITS> st(g.w.K);
  // Each row tile of x passes over the block's W rows, which the binding sizes to stay in L2.
  over_x_tiles<mr_for<I, BITS>()>(m0, m1, [&](auto mr, int64_t m) {
    constexpr int MR = decltype(mr)::value;
    over_row_tiles<nr_for(MR)>(g.w, n0, n1, [&](auto nr, int64_t n, const float* table) {
      lut_tile<I, BITS, MR, decltype(nr)::value>(g, m, n, table, st);
    });
  });
}

template <class I>
void lut_gemm_block(const GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (m0 >= m1 || n0 >= n1) return;
  switch (g.w.bits) {
    case 2: return lut_gemm_bits<I, 2>(g, m0, m1, n0, n1);
    case 3: return lut_gemm_bits<I, 3>(g, m0, m1, n0, n1);
    case 4:
      if constexpr (I::kNibbleGemm) {  // small M: decoding dominates (measured: the generic tiles win from M = 4)
        if (g.w.K >= 64 && m1 - m0 < I::kNibbleRows) return I::nibble_gemm(g, m0, m1, n0, n1);
      }
      return lut_gemm_bits<I, 4>(g, m0, m1, n0, n1);
    default: return lut_gemm_bits<I, 8>(g, m0, m1, n0, n1);
  }
}

// ---------------------------------------------------------------- dequantisation
template <class I, int BITS, class T>
void dequantize_rows_t(const Format& f, int64_t n0, int64_t n1, T* out, int64_t ldo) {
  using V = typename I::V;
  constexpr int C = 1 << BITS;
  const Steps<I, BITS> st(f.K);
  for (int64_t n = n0; n < n1; ++n) {
    const float* table = f.table + (n / f.group_size) * C;
    const typename I::template Dec<BITS> dec(table);
    const uint8_t* row = f.idx + n * f.ldi;
    T* o = out + n * ldo;
    int64_t k = 0;
    for (; k < st.fast; k += V::W) dec.load(row, k).store(o + k);
    for (; k < st.vec; k += V::W) dec.load_last(row, k).store(o + k);
    for (; k < f.K; ++k) Vec1(table[index_at<BITS>(row, k)]).store(o + k);
  }
}

template <class I, class T>
void dequantize_rows_any(const Format& f, int64_t n0, int64_t n1, T* out, int64_t ldo) {
  switch (f.bits) {
    case 2: return dequantize_rows_t<I, 2>(f, n0, n1, out, ldo);
    case 3: return dequantize_rows_t<I, 3>(f, n0, n1, out, ldo);
    case 4: return dequantize_rows_t<I, 4>(f, n0, n1, out, ldo);
    default: return dequantize_rows_t<I, 8>(f, n0, n1, out, ldo);
  }
}

template <class I>
void dequantize_rows(const Format& f, int64_t n0, int64_t n1, void* out, int64_t ldo, DType dt) {
  switch (dt) {
    case DType::f32: return dequantize_rows_any<I>(f, n0, n1, static_cast<float*>(out), ldo);
    case DType::bf16: return dequantize_rows_any<I>(f, n0, n1, static_cast<bf16_t*>(out), ldo);
    case DType::f16: return dequantize_rows_any<I>(f, n0, n1, static_cast<fp16_t*>(out), ldo);
  }
}

// The scalar decoder (any instruction set's K tail uses index_at directly).
template <int BITS>
struct ScalarDec {
  const float* table;
  explicit ScalarDec(const float* t) : table(t) {}
  Vec1 load(const uint8_t* row, int64_t k) const { return Vec1(table[index_at<BITS>(row, k)]); }
  Vec1 load_last(const uint8_t* row, int64_t k) const { return load(row, k); }
};

}  // namespace
