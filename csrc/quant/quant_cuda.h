// Pointer-level interface between the CUDA kernels of the int8 quantisation ops
// (quant_cuda_kernels.cu) and their torch binding (quant_cuda.cpp). Plain C++: no torch headers, so
// the binding can move to another ABI without touching the kernels. (The .cu is not named
// quant_cuda.cu: torch's BuildExtension names objects by stem, and quant_cuda.cpp would clash.)
//
// Semantics: bigkernels/reference/quant.py.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace bigkernels::quant::cuda {

enum class DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

// quantize_per_token: x [M, K] (element (m, k) at x + m * ldx + k, any element alignment) ->
// q [M, K] int8, contiguous (row stride K) and scale [M] fp32.
//   scale[m] = max_k |x[m, k]| / 127 (NaN when the row holds a NaN);
//   q[m, k]  = clamp(rint(x[m, k] / scale[m]), -127, 127), 0 where the quotient is NaN and for
//              rows whose scale is 0 or NaN.
// Requires M >= 0, K >= 1 when M >= 1. Launches nothing for M == 0.
cudaError_t launch_quantize_per_token(const void* x, DType dtype, int64_t M, int64_t K, int64_t ldx, int8_t* q,
                                      float* scale, cudaStream_t stream);

// Largest number of activation rows one w8a16 GEMV launch handles (the binding loops over row
// blocks of this size for larger M).
constexpr int kW8A16MaxRows = 16;

// w8a16: out[m, n] = (sum_k x[m, k] * w[n, k]) * w_scale[n] + bias[n], fp32 accumulation, written in
// x's dtype. x [M, K] (row stride ldx, unit column stride), w [N, K] int8 (row stride ldw, unit
// column stride), w_scale [N] fp32 contiguous, bias [N] contiguous of bias_dtype or nullptr,
// out [M, N] contiguous of x's dtype. 1 <= M <= kW8A16MaxRows, N >= 1, K >= 0.
struct W8A16Args {
  const void* x;
  DType x_dtype;
  int64_t ldx;
  const int8_t* w;
  int64_t ldw;
  const float* w_scale;
  const void* bias;  // nullptr: no bias
  DType bias_dtype;
  void* out;
  int64_t M, N, K;
};

// The split-K factor a launch of these sizes uses (1 = no split) on the current device.
int w8a16_splits(int64_t M, int64_t N, int64_t K, DType x_dtype);

// Bytes of fp32 workspace a launch with `splits` needs (0 when splits == 1).
inline size_t w8a16_workspace_bytes(int64_t M, int64_t N, int splits) {
  return splits > 1 ? static_cast<size_t>(splits) * static_cast<size_t>(M) * static_cast<size_t>(N) * sizeof(float)
                    : 0;
}

// Launches the GEMV (and, when splits > 1, the deterministic split-K reduction, which reads the
// fp32 partial sums from `workspace` in a fixed order). `splits` must come from w8a16_splits for
// the same sizes; `workspace` holds w8a16_workspace_bytes(M, N, splits) bytes (nullptr if 0).
cudaError_t launch_w8a16_mm(const W8A16Args& args, int splits, float* workspace, cudaStream_t stream);

}  // namespace bigkernels::quant::cuda
