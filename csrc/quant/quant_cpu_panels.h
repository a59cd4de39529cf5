// The int8 quantisation ops on the panel engine (common/cpu_gemm_avx2.h): decoders that write
// panels of the int8 weight b [N, K] (as fp32 for w8a16, as int16 pairs for the int8 GEMM) and
// the epilogues (scales, bias, output dtype; the same fp32 order as the tiles in
// quant_cpu_kernels.h and the reference). Included by the AVX2 unit after quant_cpu_kernels.h.
#pragma once

#include "common/cpu_gemm_avx2.h"
#include "quant/quant_cpu.h"

namespace {
static_assert(gemm::kMR == bigkernels::quant::cpu::kPanelRows && gemm::kNR == bigkernels::quant::cpu::kPanelCols,
              "quant_cpu.h's panel shape must be the engine's");

// The rows n .. n + 15 of b (null past N).
inline void weight_rows(const GemmArgs& g, int64_t N, int64_t n, const int8_t* rows[gemm::kNR]) {
  for (int r = 0; r < gemm::kNR; ++r) rows[r] = n + r < N ? g.b + (n + r) * g.ldb : nullptr;
}

// w8a16: fp32 panels of the int8 weight; out = (sum x * w_int8) * b_scale[n] + bias[n].
struct W8Panels {
  const GemmArgs& g;
  int64_t N;
  int64_t k_block() const { return gemm::kKC; }
  bool pack(int64_t n, int64_t k0, int64_t kc, float* dst) const {
    const int8_t* rows[gemm::kNR];
    weight_rows(g, N, n, rows);
    gemm::panel_from_i8_rows(rows, k0, kc, dst);
    return true;
  }
  void store(int64_t m, int64_t n, int64_t cnt, const float* acc) const {
    int64_t j = 0;
    if (g.out_dtype == DType::f32) {  // 8 at a time, the same two roundings (mul, then add)
      float* out = static_cast<float*>(g.out) + m * g.ldo + n;
      for (; j + 8 <= cnt; j += 8) {
        __m256 o = _mm256_mul_ps(_mm256_loadu_ps(acc + j), _mm256_loadu_ps(g.b_scale + n + j));
        if (g.bias) o = _mm256_add_ps(o, _mm256_loadu_ps(g.bias + n + j));
        _mm256_storeu_ps(out + j, o);
      }
    }
    for (; j < cnt; ++j) {
      float o = acc[j] * g.b_scale[n + j];
      if (g.bias) o = o + g.bias[n + j];
      store_float(g.out_dtype, g.out, m * g.ldo + n + j, o);
    }
  }
};

// int8 GEMM: int16-pair panels of b; exact int32 sums, stored as int32 or dequantised in fp32.
struct I8Panels {
  const GemmArgs& g;
  int64_t N;
  bool pack(int64_t n, int64_t j0, int64_t kc2, int32_t* dst) const {
    const int8_t* rows[gemm::kNR];
    weight_rows(g, N, n, rows);
    gemm::panel_from_i8_rows_pairs(rows, g.K, j0, kc2, dst);
    return true;
  }
  void store(int64_t m, int64_t n, int64_t cnt, const int32_t* acc) const {
    int64_t j = 0;
    if (g.out_dtype == DType::i32) {
      std::memcpy(static_cast<int32_t*>(g.out) + m * g.ldo + n, acc, size_t(cnt) * sizeof(int32_t));
      return;
    }
    if (g.out_dtype == DType::f32) {  // 8 at a time, the scalar order: (acc * a_scale) * b_scale + bias
      float* out = static_cast<float*>(g.out) + m * g.ldo + n;
      const __m256 as = _mm256_set1_ps(g.a_scale[m]);
      for (; j + 8 <= cnt; j += 8) {
        const __m256 v = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + j)));
        __m256 o = _mm256_mul_ps(_mm256_mul_ps(v, as), _mm256_loadu_ps(g.b_scale + n + j));
        if (g.bias) o = _mm256_add_ps(o, _mm256_loadu_ps(g.bias + n + j));
        _mm256_storeu_ps(out + j, o);
      }
    }
    for (; j < cnt; ++j) {
      const int64_t idx = m * g.ldo + n + j;
      if (g.out_dtype == DType::i32) {
        static_cast<int32_t*>(g.out)[idx] = acc[j];
      } else {
        float o = float(acc[j]) * g.a_scale[m] * g.b_scale[n + j];
        if (g.bias) o = o + g.bias[n + j];
        store_float(g.out_dtype, g.out, idx, o);
      }
    }
  }
};

void pack_a_f32_any(DType dt, const void* a, int64_t lda, int64_t M, int64_t K, int64_t p0, int64_t p1, float* dst) {
  switch (dt) {
    case DType::f32: return gemm::pack_a_f32(static_cast<const float*>(a), lda, M, K, p0, p1, dst);
    case DType::bf16: return gemm::pack_a_f32(static_cast<const bf16_t*>(a), lda, M, K, p0, p1, dst);
    case DType::f16: return gemm::pack_a_f32(static_cast<const fp16_t*>(a), lda, M, K, p0, p1, dst);
    case DType::i32: return;
  }
}

// The binding passes N through ldo (the output's row stride is N).
void w8a16_panels(const GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  W8Panels dec{g, g.ldo};
  gemm::unit_f32(dec, static_cast<const float*>(g.a_packed), g.K, m0, m1, n0, n1);
}

void int8_panels(const GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  I8Panels dec{g, g.ldo};
  gemm::unit_i16(dec, static_cast<const int32_t*>(g.a_packed), g.K, m0, m1, n0, n1);
}

}  // namespace
