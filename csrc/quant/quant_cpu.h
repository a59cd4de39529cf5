// Pointer-level interface of the CPU int8 quantisation kernels (no torch headers): one instance
// per instruction set, chosen at run time by the binding in quant_cpu.cpp. Each entry works on one
// block of rows / columns; the binding splits the problem into blocks and runs them in parallel.
#pragma once

#include <cstdint>

namespace bigkernels::quant::cpu {

enum class DType { f32, f16, bf16, i32 };

// out[m, n] for m in [m0, m1), n in [n0, n1) of the NT GEMM a [M, K] . b [N, K]^T (row strides
// lda, ldb, ldo in elements; K contiguous). int8 GEMM: exact int32 sum, then either stored as
// int32 (out_dtype i32) or dequantised in fp32: acc * a_scale[m] * b_scale[n] + bias[n] (bias may
// be null) and stored as out_dtype. w8a16: x is fp32, the weight int8; fp32 sum of x * w, then
// acc * b_scale[n] + bias[n] stored as out_dtype. dense_mm: the same with a float weight (w,
// w_dtype; b and b_scale null): acc + bias[n].
struct GemmArgs {
  const void* a;  // int8 (int8 GEMM) or fp32 (w8a16)
  int64_t lda;
  const int8_t* b;
  int64_t ldb;
  int64_t K;
  void* out;
  int64_t ldo;
  DType out_dtype;
  const float* a_scale;  // int8 GEMM with a float out_dtype only
  const float* b_scale;  // null: int32 output (int8 GEMM)
  const float* bias;     // may be null
  const void* a_packed;  // the panel engine's packed a (see Kernels::pack_a_*), else null
  const void* w;         // dense_mm: the float weight [N, K] (row stride ldb) of dtype w_dtype, else null
  DType w_dtype;
};

// The panel engine (AVX2): a is packed once per call in panels of kPanelRows rows (pack_a_f32:
// [K][kPanelRows] fp32 per panel; pack_a_i8: [ceil(K / 2)][kPanelRows] int16 pairs); blocks of
// the output then start at rows that are multiples of kPanelRows and columns multiples of
// kPanelCols.
constexpr int64_t kPanelRows = 6, kPanelCols = 16;
inline int64_t packed_a_f32_floats(int64_t M, int64_t K) { return (M + kPanelRows - 1) / kPanelRows * kPanelRows * K; }
inline int64_t packed_a_i8_pairs(int64_t M, int64_t K) {
  return (M + kPanelRows - 1) / kPanelRows * kPanelRows * ((K + 1) / 2);
}

struct Kernels {
  const char* isa;
  // Rows [r0, r1) of x [*, K] (row stride ldx, dtype f32/f16/bf16) -> q rows (stride K), scale[r].
  void (*quantize_rows)(DType, const void* x, int64_t ldx, int64_t K, int64_t r0, int64_t r1, int8_t* q,
                        float* scale);
  void (*int8_gemm)(const GemmArgs&, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
  void (*w8a16_gemm)(const GemmArgs&, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
  // The panel engine; null where the instruction set has none (the tiles above then run).
  // pack_a_*: row panels [p0, p1) of a [M, K] (row stride lda) into dst; *_panels: a block of the
  // output from g.a_packed (m0 a multiple of kPanelRows, n0 of kPanelCols).
  void (*pack_a_f32)(DType, const void* a, int64_t lda, int64_t M, int64_t K, int64_t p0, int64_t p1, float* dst);
  void (*pack_a_i8)(const int8_t* a, int64_t lda, int64_t M, int64_t K, int64_t p0, int64_t p1, int32_t* dst);
  void (*w8a16_panels)(const GemmArgs&, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
  void (*int8_panels)(const GemmArgs&, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
  // dense_mm: fp32 a times the float weight g.w (f32/bf16/f16) in fp32, + bias, stored as out_dtype
  // (the w8a16 tiles with float weights and no scale).
  void (*dense_gemm)(const GemmArgs&, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
};

const Kernels& scalar_kernels();
const Kernels& avx2_kernels();        // AVX2 + FMA + F16C: int8 products as int16 pairs (vpmaddwd), panel engine
const Kernels& avx512vnni_kernels();  // AVX-512 F/BW/VL/DQ + AVX512_VNNI (vpdpbusd)
// The widest the CPU has; BIGKERNELS_CPU_ISA=scalar|avx2|avx512 caps it (avx512 here means
// AVX-512 with VNNI; a CPU with AVX-512 but no VNNI runs the AVX2 kernels).
const Kernels& best_kernels();

}  // namespace bigkernels::quant::cpu
