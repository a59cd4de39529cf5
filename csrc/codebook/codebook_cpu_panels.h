// The codebook GEMM on the packed-panel engine (common/cpu_gemm_avx2.h), for the larger M. A
// decoder writes each strip of 16 output features over a block of K as a dense fp32 [kc][16]
// panel (16 KB: L1): each row's indices are looked up eight at a time by the instruction set's
// decoder (Isa::Dec<BITS>: vpermps table lookups in registers, scalar table loads for 8 bits), and
// 8 x 8 register transposes turn 8 rows x 8 inputs into the panel's [k][16] order. The engine's 6 x 16 FMA
// micro-kernel then runs every row panel of its block of x against it, so the decoding costs
// 1 / (rows per block) of a multiply-add and no dense weight exists beyond one panel per thread.
// Included by the AVX2 unit after codebook_cpu_kernels.h (which defines index_at, store_float,
// Steps and the Isa traits).
#pragma once

#include "codebook/codebook_cpu.h"
#include "common/cpu_gemm_avx2.h"

namespace {
static_assert(gemm::kMR == bigkernels::codebook::cpu::kPanelRows && gemm::kNR == bigkernels::codebook::cpu::kPanelCols,
              "codebook_cpu.h's panel shape must be the engine's");

template <class I, int BITS>
struct CodebookPanels {
  const GemmArgs& g;
  int64_t N;
  Steps<I, BITS> st;
  static constexpr int64_t C = int64_t(1) << BITS;

  CodebookPanels(const GemmArgs& args, int64_t n_rows) : g(args), N(n_rows), st(args.w.K) {}
  int64_t k_block() const { return gemm::kKC; }

  // Rows n .. n + 15 (rows past N repeat row N - 1: the engine computes those columns and
  // store() drops them), inputs k0 .. k0 + kc, as [kc][16] fp32.
  bool pack(int64_t n, int64_t k0, int64_t kc, float* dst) const {
    const uint8_t* rows[gemm::kNR];
    const float* tables[gemm::kNR];
    for (int r = 0; r < gemm::kNR; ++r) {
      const int64_t nr = std::min(n + r, N - 1);
      rows[r] = g.w.idx + nr * g.w.ldi;
      tables[r] = g.w.table + (nr / g.w.group_size) * C;
    }
    const int64_t kv = std::min(kc, st.vec - k0);  // inputs k0 .. k0 + kv in whole vectors
    if (tables[0] == tables[gemm::kNR - 1]) {  // one codebook for the strip (the usual case)
      const typename I::template Dec<BITS> dec(tables[0]);
      decode_strip(rows, k0, kv, dst, [&](int) -> const auto& { return dec; });
    } else {  // a group boundary inside the strip
      decode_strip(rows, k0, kv, dst, [&](int r) { return typename I::template Dec<BITS>(tables[r]); });
    }
    for (int64_t k = std::max<int64_t>(kv, 0); k < kc; ++k)  // the K tail (< 8 inputs)
      for (int r = 0; r < gemm::kNR; ++r) dst[k * gemm::kNR + r] = tables[r][index_at<BITS>(rows[r], k0 + k)];
    return true;
  }

  template <class DecOf>
  void decode_strip(const uint8_t* const rows[gemm::kNR], int64_t k0, int64_t kv, float* dst,
                    const DecOf& dec_of) const {
    __m256 r8[8];
    for (int64_t k = 0; k < kv; k += 8) {
      const int64_t kk = k0 + k;
      const bool fast = kk < st.fast;
      for (int h = 0; h < 2; ++h) {
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) {
          const auto& dec = dec_of(h * 8 + i);
          r8[i] = (fast ? dec.load(rows[h * 8 + i], kk) : dec.load_last(rows[h * 8 + i], kk)).x;
        }
        gemm::transpose8x8_ps(r8);
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (k + i) * gemm::kNR + 8 * h, r8[i]);
      }
    }
  }

  // 8 sums at a time (Vec8's stores round as store_float does): element by element, with the
  // dtype switch per element, this took ~5% of the engine's time at 1024^2, M = 512.
  template <class T>
  int64_t store_vec(T* o, int64_t n, int64_t cnt, const float* acc) const {
    int64_t j = 0;
    if (g.bias) {
      for (; j + 8 <= cnt; j += 8) Vec8(_mm256_add_ps(_mm256_loadu_ps(acc + j), _mm256_loadu_ps(g.bias + n + j))).store(o + j);
    } else {
      for (; j + 8 <= cnt; j += 8) Vec8(_mm256_loadu_ps(acc + j)).store(o + j);
    }
    return j;
  }

  void store(int64_t m, int64_t n, int64_t cnt, const float* acc) const {
    const int64_t at = m * g.ldo + n;
    int64_t j = 0;
    switch (g.out_dtype) {
      case DType::f32: j = store_vec(static_cast<float*>(g.out) + at, n, cnt, acc); break;
      case DType::bf16: j = store_vec(static_cast<bf16_t*>(g.out) + at, n, cnt, acc); break;
      case DType::f16: j = store_vec(static_cast<fp16_t*>(g.out) + at, n, cnt, acc); break;
    }
    for (; j < cnt; ++j) {
      float s = acc[j];
      if (g.bias) s = s + g.bias[n + j];
      store_float(g.out_dtype, g.out, at + j, s);
    }
  }
};

template <class I, int BITS>
void engine_gemm_bits(const GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  CodebookPanels<I, BITS> dec(g, g.ldo);  // the binding's ldo is N
  gemm::unit_f32(dec, g.a_packed, g.w.K, m0, m1, n0, n1);
}

// A block of out from g.a_packed (m0 a multiple of kPanelRows, n0 of kPanelCols).
template <class I>
void engine_gemm(const GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  switch (g.w.bits) {
    case 2: return engine_gemm_bits<I, 2>(g, m0, m1, n0, n1);
    case 3: return engine_gemm_bits<I, 3>(g, m0, m1, n0, n1);
    case 4: return engine_gemm_bits<I, 4>(g, m0, m1, n0, n1);
    default: return engine_gemm_bits<I, 8>(g, m0, m1, n0, n1);
  }
}

void pack_x_panels(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t p0, int64_t p1, float* dst) {
  gemm::pack_a_f32(x, ldx, M, K, p0, p1, dst);
}

}  // namespace
