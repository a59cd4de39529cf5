// CUDA kernels of the int8 quantisation ops: quantize_per_token and the weight-only int8 GEMV
// (w8a16_mm, small M). Light headers only (no torch/ATen): the binding (quant_cuda.cpp) passes raw
// pointers and sizes through quant_cuda.h. Semantics: bigkernels/reference/quant.py.
//
// quantize_per_token
//   One warp per row (K < 1024, eight rows per block) or one 256-thread block per row. Two passes
//   over the row, both with 16-byte loads (a scalar head up to the first 16-byte boundary and a
//   scalar tail, so any element-aligned view works): the absmax as the maximum of the fp32 bit
//   patterns with the sign cleared (an integer max that orders finite < inf < NaN, so a NaN row
//   gets a NaN scale without a separate flag), then the codes. The quotient x / scale is the
//   correctly rounded one, computed as x * (1/scale) plus one FMA correction step (Markstein),
//   falling back to a true division when 1/scale overflows; then round-half-even (cvt.rni),
//   clamp to +-127, NaN -> 0. Rows whose scale is 0 or NaN get zero codes without reading x again.
//
// w8a16_mm (out = x @ (w_int8 * w_scale).T + bias, M <= 16 per launch)
//   Memory-bound: every weight byte is read exactly once, with 16-byte streaming loads. A block of
//   256 threads (8 warps) owns 128 rows of W and one K-split; a warp owns 16 rows: its lanes form 8
//   groups of 4, a group owns rows n and n + 8, and its 4 lanes read 4 consecutive 16-byte chunks
//   of each row (64 contiguous bytes per row per step, so each warp load touches 8 rows x 64 B).
//   The activations of the block's K tile (256 columns for M <= 4, 128 for M <= 8, 64 for M <= 16,
//   so the accumulators fit 128 registers without spilling: two blocks per SM) are staged in shared
//   memory as fp32, swizzled so the float4 a lane needs for 4 weights is conflict-free and shared
//   by its two rows. int8 -> fp32 uses the 2^23 magic-number trick (one PRMT + one FADD per weight,
//   exact); accumulation is fp32 FMA; the 4 lanes of a group are summed with two shuffles at the
//   end. Epilogue: acc * w_scale[n] + bias[n] (separately rounded, like the reference), cast to x's
//   dtype. When one K-split would leave the GPU under-occupied (N = 4096), the grid splits K and a
//   second, atomic-free kernel sums the fp32 partials in a fixed order (deterministic).
//   The activation row count is a template parameter (1, 2, 4, 8, 16; M is rounded up, the extra
//   rows are zeros in shared memory and never written). Unaligned weights (K % 16 != 0 or a
//   misaligned view) take a byte-load variant of the same kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/multi_tensor_apply.cuh"
#include "quant/quant_cuda.h"

namespace bigkernels::quant::cuda {
namespace {

using mta::Elem;

constexpr float kQMax = 127.0f;

__device__ __forceinline__ uint32_t abs_bits(float v) { return __float_as_uint(v) & 0x7fffffffu; }

// ------------------------------------------------------------------------------------------------
// quantize_per_token

constexpr int kQuantBlock = 256;

// The row's scale maths, shared by every element: q = rint(x / s) computed as described above.
struct RowQuant {
  float s, inv;
  bool fast;

  __device__ __forceinline__ explicit RowQuant(float scale) : s(scale) {
    inv = __frcp_rn(scale);
    fast = isfinite(inv);
  }
  __device__ __forceinline__ int8_t operator()(float v) const {
    float r;
    if (fast) {
      r = __fmul_rn(v, inv);
      const float e = fmaf(-r, s, v);  // exact residual
      r = fmaf(e, inv, r);
    } else {
      r = __fdiv_rn(v, s);
    }
    int c = (r == r) ? __float2int_rn(r) : 0;  // inf / inf -> NaN -> 0, like nan_to_num
    c = c > 127 ? 127 : c;
    c = c < -127 ? -127 : c;
    return static_cast<int8_t>(c);
  }
};

template <int V>
struct Codes;  // V int8 codes, stored with one store when the destination is aligned
template <>
struct Codes<4> {
  using Word = uint32_t;
};
template <>
struct Codes<8> {
  using Word = uint2;
};

__device__ __forceinline__ uint32_t pack4(const int8_t* c) {
  return static_cast<uint32_t>(static_cast<uint8_t>(c[0])) | (static_cast<uint32_t>(static_cast<uint8_t>(c[1])) << 8) |
         (static_cast<uint32_t>(static_cast<uint8_t>(c[2])) << 16) |
         (static_cast<uint32_t>(static_cast<uint8_t>(c[3])) << 24);
}

template <int V>
__device__ __forceinline__ void store_codes(int8_t* dst, const int8_t (&c)[V], bool aligned) {
  if (aligned) {
    if constexpr (V == 4) {
      *reinterpret_cast<uint32_t*>(dst) = pack4(c);
    } else {
      *reinterpret_cast<uint2*>(dst) = make_uint2(pack4(c), pack4(c + 4));
    }
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) dst[e] = c[e];
  }
}

template <typename T, int kThreads>
__global__ void __launch_bounds__(kQuantBlock) quantize_per_token_kernel(const T* __restrict__ x, int64_t M, int64_t K,
                                                                         int64_t ldx, int8_t* __restrict__ q,
                                                                         float* __restrict__ scale) {
  static_assert(kThreads == 32 || kThreads == kQuantBlock, "a warp or the block per row");
  constexpr int kRows = kQuantBlock / kThreads;
  constexpr int V = Elem<T>::kVec;
  const int t = static_cast<int>(threadIdx.x) % kThreads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRows + static_cast<int>(threadIdx.x) / kThreads;
  if (kThreads == 32 && row >= M) return;  // whole warps only; the block variant has row < M

  const T* xr = x + row * ldx;
  int8_t* qr = q + row * K;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(xr);
  int64_t head = static_cast<int64_t>(((16u - (addr & 15u)) & 15u) / sizeof(T));
  head = head < K ? head : K;
  const int64_t nvec = (K - head) / V;
  const int64_t tail = head + nvec * V;
  const uint4* xv = reinterpret_cast<const uint4*>(xr + head);

  // Pass 1: absmax as bits (NaN > inf > finite as unsigned integers).
  uint32_t amax = 0;
  for (int64_t i = t; i < head; i += kThreads) amax = max(amax, abs_bits(Elem<T>::to_float(xr[i])));
#pragma unroll 4
  for (int64_t i = t; i < nvec; i += kThreads) {
    float v[V];
    Elem<T>::unpack(__ldg(xv + i), v);
#pragma unroll
    for (int e = 0; e < V; ++e) amax = max(amax, abs_bits(v[e]));
  }
  for (int64_t i = tail + t; i < K; i += kThreads) amax = max(amax, abs_bits(Elem<T>::to_float(xr[i])));
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) amax = max(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  if constexpr (kThreads == kQuantBlock) {
    __shared__ uint32_t partial[kQuantBlock / 32];
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = amax;
    __syncthreads();
    amax = partial[0];
#pragma unroll
    for (int w = 1; w < kQuantBlock / 32; ++w) amax = max(amax, partial[w]);
  }
  const float s = __uint_as_float(amax) / kQMax;  // NaN bits stay NaN
  if (t == 0) scale[row] = s;

  // Pass 2: codes.
  const bool aligned = ((reinterpret_cast<uintptr_t>(qr + head)) % V) == 0;
  if (!(s > 0.0f)) {  // zero or NaN scale: all codes 0
    const int8_t zeros[V] = {};
    for (int64_t i = t; i < head; i += kThreads) qr[i] = 0;
    for (int64_t i = t; i < nvec; i += kThreads) store_codes<V>(qr + head + i * V, zeros, aligned);
    for (int64_t i = tail + t; i < K; i += kThreads) qr[i] = 0;
    return;
  }
  const RowQuant quant(s);
  for (int64_t i = t; i < head; i += kThreads) qr[i] = quant(Elem<T>::to_float(xr[i]));
#pragma unroll 4
  for (int64_t i = t; i < nvec; i += kThreads) {
    float v[V];
    Elem<T>::unpack(__ldg(xv + i), v);
    int8_t c[V];
#pragma unroll
    for (int e = 0; e < V; ++e) c[e] = quant(v[e]);
    store_codes<V>(qr + head + i * V, c, aligned);
  }
  for (int64_t i = tail + t; i < K; i += kThreads) qr[i] = quant(Elem<T>::to_float(xr[i]));
}

template <typename T>
cudaError_t quantize_for(const void* x, int64_t M, int64_t K, int64_t ldx, int8_t* q, float* scale,
                         cudaStream_t stream) {
  const T* xt = static_cast<const T*>(x);
  if (K >= 1024) {
    quantize_per_token_kernel<T, kQuantBlock><<<static_cast<unsigned>(M), kQuantBlock, 0, stream>>>(xt, M, K, ldx, q,
                                                                                                 scale);
  } else {
    constexpr int kRows = kQuantBlock / 32;
    const int64_t grid = (M + kRows - 1) / kRows;
    quantize_per_token_kernel<T, 32><<<static_cast<unsigned>(grid), kQuantBlock, 0, stream>>>(xt, M, K, ldx, q, scale);
  }
  return cudaGetLastError();
}

// ------------------------------------------------------------------------------------------------
// w8a16 GEMV

constexpr int kGemvThreads = 256;
constexpr int kWarpsPerBlock = kGemvThreads / 32;
constexpr int kLanesPerRow = 4;                         // lanes sharing one row of W
constexpr int kGroupsPerWarp = 32 / kLanesPerRow;       // 8
constexpr int kRowsPerGroup = 2;                        // rows of W per lane (share the x reads)
constexpr int kRowsPerWarp = kGroupsPerWarp * kRowsPerGroup;  // 16
constexpr int kRowsPerBlock = kWarpsPerBlock * kRowsPerWarp;  // 128
constexpr int kStepK = kLanesPerRow * 16;               // 64 columns per warp step
// Columns staged in shared memory at once (and the K granularity of a split): 256 (the tile's 8
// weight loads per lane are all in flight together); 128 for 8 and 16 activation rows, whose
// accumulators would otherwise not fit in 128 registers (two blocks per SM).
constexpr int tile_k(int kM) { return kM >= 16 ? 64 : kM >= 8 ? 128 : 256; }
constexpr int kMaxSplits = 64;

struct GemvParams {
  const void* x;
  int64_t ldx;
  const int8_t* w;
  int64_t ldw;
  const float* w_scale;
  const void* bias;
  DType bias_dtype;
  void* out;     // splits == 1
  float* partial;  // splits > 1: [splits, M, N]
  int M;
  int64_t N, K;
  int tiles_per_split;
};

// Shared-memory position of tile column kk: within each 64-column step, column j*16 + q*4 + e
// (lane j's chunk, word q, byte e) is stored at q*16 + j*4 + e, so the four lanes of a group read
// four consecutive float4 for a given word q (no bank conflict; the 8 groups broadcast).
__device__ __forceinline__ int swizzle(int kk) {
  const int step = kk & ~(kStepK - 1), w = kk & (kStepK - 1);
  const int j = w >> 4, q = (w >> 2) & 3, e = w & 3;
  return step + q * 16 + j * 4 + e;
}

// Four int8 (one 32-bit word) -> four exact fp32: 0x4B0000uu is 2^23 + uu as a float; with
// uu = byte ^ 0x80 (the byte + 128), subtracting 2^23 + 128 leaves the signed value.
__device__ __forceinline__ void int8x4_to_float(uint32_t word, float (&f)[4]) {
  const uint32_t u = word ^ 0x80808080u;
  constexpr float kMagic = 8388736.0f;  // 2^23 + 128
  f[0] = __fsub_rn(__uint_as_float(__byte_perm(u, 0x4B000000u, 0x7650)), kMagic);
  f[1] = __fsub_rn(__uint_as_float(__byte_perm(u, 0x4B000000u, 0x7651)), kMagic);
  f[2] = __fsub_rn(__uint_as_float(__byte_perm(u, 0x4B000000u, 0x7652)), kMagic);
  f[3] = __fsub_rn(__uint_as_float(__byte_perm(u, 0x4B000000u, 0x7653)), kMagic);
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int q) {
  return q == 0 ? v.x : q == 1 ? v.y : q == 2 ? v.z : v.w;  // q is a constant after unrolling
}

__device__ __forceinline__ float load_as_float(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kHalf: return __half2float(__ldg(static_cast<const __half*>(p) + i));
    case DType::kBFloat16: return __bfloat162float(__ldg(static_cast<const __nv_bfloat16*>(p) + i));
    default: return __ldg(static_cast<const float*>(p) + i);
  }
}

// 16 weights of one row: a streaming 16-byte load (read once: evict-first), or bytes.
template <bool kVec>
__device__ __forceinline__ uint4 load_w16(const int8_t* row, int64_t k, int64_t k_end, bool valid) {
  if constexpr (kVec) {
    // kVec: K % 16 == 0, row pointers 16-byte aligned, k_end a multiple of 16.
    if (valid && k < k_end) return __ldcs(reinterpret_cast<const uint4*>(row + k));
    return make_uint4(0u, 0u, 0u, 0u);
  } else {
    uint32_t word[4] = {0u, 0u, 0u, 0u};
    if (valid) {
#pragma unroll
      for (int b = 0; b < 16; ++b) {
        if (k + b < k_end) {
          word[b >> 2] |= static_cast<uint32_t>(static_cast<uint8_t>(__ldg(row + k + b))) << (8 * (b & 3));
        }
      }
    }
    return make_uint4(word[0], word[1], word[2], word[3]);
  }
}

template <typename T, int kM, bool kVec>
__global__ void __launch_bounds__(kGemvThreads, 2) w8a16_gemv_kernel(GemvParams p) {
  constexpr int kTileK = tile_k(kM);
  constexpr int kStepsPerTile = kTileK / kStepK;
  __shared__ __align__(16) float xs[kM * kTileK];
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int g = lane >> 2;  // row group within the warp
  const int j = lane & 3;   // 16-byte chunk within the group's 64-column step
  const int64_t n_first = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp * kRowsPerWarp + g;
  const int split = static_cast<int>(blockIdx.y);
  const int64_t k_begin = static_cast<int64_t>(split) * p.tiles_per_split * kTileK;
  const int64_t k_stop = k_begin + static_cast<int64_t>(p.tiles_per_split) * kTileK;
  const int64_t k_end = k_stop < p.K ? k_stop : p.K;

  // Staging of x: thread -> (row stage_m, kStageElems consecutive tile columns from stage_k); one
  // row pointer per thread (rows >= M read nothing and store zeros).
  constexpr int kStageElems = kM * kTileK / kGemvThreads;
  constexpr int kStageThreadsPerRow = kTileK / kStageElems;
  static_assert(kStageElems >= 1 && kStageElems <= 16 && kM * kTileK == kStageElems * kGemvThreads, "staging");
  const int stage_m = static_cast<int>(threadIdx.x) / kStageThreadsPerRow;
  const int stage_k = (static_cast<int>(threadIdx.x) % kStageThreadsPerRow) * kStageElems;
  const T* __restrict__ x_stage = static_cast<const T*>(p.x) + (stage_m < p.M ? stage_m : 0) * p.ldx;
  const int8_t* wrow[kRowsPerGroup];
  bool valid[kRowsPerGroup];
#pragma unroll
  for (int r = 0; r < kRowsPerGroup; ++r) {
    const int64_t n = n_first + r * kGroupsPerWarp;
    valid[r] = n < p.N;
    wrow[r] = p.w + (valid[r] ? n : 0) * p.ldw;
  }

  float acc[kRowsPerGroup][kM];
#pragma unroll
  for (int r = 0; r < kRowsPerGroup; ++r) {
#pragma unroll
    for (int m = 0; m < kM; ++m) acc[r][m] = 0.0f;
  }

  for (int64_t kt = k_begin; kt < k_end; kt += kTileK) {
    // The tile's weights first: their loads are in flight while x is staged.
    uint4 wv[kRowsPerGroup][kStepsPerTile];
#pragma unroll
    for (int s = 0; s < kStepsPerTile; ++s) {
#pragma unroll
      for (int r = 0; r < kRowsPerGroup; ++r) {
        wv[r][s] = load_w16<kVec>(wrow[r], kt + s * kStepK + j * 16, k_end, valid[r]);
      }
    }
    __syncthreads();  // the previous tile's x is consumed
    {
      const int64_t k0 = kt + stage_k;
      float v[kStageElems];
#pragma unroll
      for (int e = 0; e < kStageElems; ++e) {
        v[e] = (stage_m < p.M && k0 + e < k_end) ? Elem<T>::to_float(__ldg(x_stage + k0 + e)) : 0.0f;
      }
#pragma unroll
      for (int e = 0; e < kStageElems; ++e) xs[stage_m * kTileK + swizzle(stage_k + e)] = v[e];
    }
    __syncthreads();
#pragma unroll
    for (int s = 0; s < kStepsPerTile; ++s) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        float wf[kRowsPerGroup][4];
#pragma unroll
        for (int r = 0; r < kRowsPerGroup; ++r) int8x4_to_float(word_of(wv[r][s], q), wf[r]);
#pragma unroll
        for (int m = 0; m < kM; ++m) {
          const float4 xv = *reinterpret_cast<const float4*>(&xs[m * kTileK + s * kStepK + q * 16 + j * 4]);
#pragma unroll
          for (int r = 0; r < kRowsPerGroup; ++r) {
            acc[r][m] = fmaf(xv.x, wf[r][0], acc[r][m]);
            acc[r][m] = fmaf(xv.y, wf[r][1], acc[r][m]);
            acc[r][m] = fmaf(xv.z, wf[r][2], acc[r][m]);
            acc[r][m] = fmaf(xv.w, wf[r][3], acc[r][m]);
          }
        }
      }
    }
  }

  // Sum the group's four lanes; lane j then writes the rows m with m % 4 == j.
#pragma unroll
  for (int r = 0; r < kRowsPerGroup; ++r) {
#pragma unroll
    for (int m = 0; m < kM; ++m) {
      acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], 1);
      acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], 2);
    }
  }
  const bool direct = gridDim.y == 1;
#pragma unroll
  for (int r = 0; r < kRowsPerGroup; ++r) {
    if (!valid[r]) continue;
    const int64_t n = n_first + r * kGroupsPerWarp;
    float sc = 0.0f, b = 0.0f;
    if (direct) {
      sc = __ldg(p.w_scale + n);
      if (p.bias != nullptr) b = load_as_float(p.bias, p.bias_dtype, n);
    }
#pragma unroll
    for (int m = 0; m < kM; ++m) {
      if ((m & 3) != j || m >= p.M) continue;
      if (direct) {
        float v = __fmul_rn(acc[r][m], sc);
        if (p.bias != nullptr) v = __fadd_rn(v, b);
        static_cast<T*>(p.out)[m * p.N + n] = Elem<T>::from_float(v);
      } else {
        p.partial[(static_cast<int64_t>(split) * p.M + m) * p.N + n] = acc[r][m];
      }
    }
  }
}

// out[m, n] = (sum over splits, in order, of partial[s, m, n]) * w_scale[n] + bias[n].
template <typename T>
__global__ void __launch_bounds__(256) w8a16_reduce_kernel(GemvParams p, int splits) {
  const int64_t mn = static_cast<int64_t>(p.M) * p.N;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < mn;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i % p.N;
    float a = p.partial[i];
    for (int s = 1; s < splits; ++s) a += p.partial[static_cast<int64_t>(s) * mn + i];
    float v = __fmul_rn(a, __ldg(p.w_scale + n));
    if (p.bias != nullptr) v = __fadd_rn(v, load_as_float(p.bias, p.bias_dtype, n));
    static_cast<T*>(p.out)[i] = Elem<T>::from_float(v);
  }
}

int rows_template(int64_t M) { return M <= 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : M <= 8 ? 8 : 16; }

int64_t tiles_of(int64_t K, int kM) { return K > 0 ? (K + tile_k(kM) - 1) / tile_k(kM) : 1; }

template <typename T, int kM>
int gemv_resident_blocks() {
  return mta::resident_blocks<&w8a16_gemv_kernel<T, kM, true>>(kGemvThreads);
}

template <typename T>
int resident_for(int kM) {
  switch (kM) {
    case 1: return gemv_resident_blocks<T, 1>();
    case 2: return gemv_resident_blocks<T, 2>();
    case 4: return gemv_resident_blocks<T, 4>();
    case 8: return gemv_resident_blocks<T, 8>();
    default: return gemv_resident_blocks<T, 16>();
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T, int kM>
cudaError_t gemv_for(const GemvParams& p, bool vec, int splits, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(p.N, kRowsPerBlock)), static_cast<unsigned>(splits));
  if (vec) {
    w8a16_gemv_kernel<T, kM, true><<<grid, kGemvThreads, 0, stream>>>(p);
  } else {
    w8a16_gemv_kernel<T, kM, false><<<grid, kGemvThreads, 0, stream>>>(p);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || splits == 1) return err;
  const int64_t blocks = ceil_div(static_cast<int64_t>(p.M) * p.N, 256);
  const int rgrid = static_cast<int>(blocks < 4096 ? blocks : 4096);
  w8a16_reduce_kernel<T><<<rgrid, 256, 0, stream>>>(p, splits);
  return cudaGetLastError();
}

template <typename T>
cudaError_t w8a16_for(const GemvParams& p, bool vec, int splits, cudaStream_t stream) {
  switch (rows_template(p.M)) {
    case 1: return gemv_for<T, 1>(p, vec, splits, stream);
    case 2: return gemv_for<T, 2>(p, vec, splits, stream);
    case 4: return gemv_for<T, 4>(p, vec, splits, stream);
    case 8: return gemv_for<T, 8>(p, vec, splits, stream);
    default: return gemv_for<T, 16>(p, vec, splits, stream);
  }
}

}  // namespace

cudaError_t launch_quantize_per_token(const void* x, DType dtype, int64_t M, int64_t K, int64_t ldx, int8_t* q,
                                      float* scale, cudaStream_t stream) {
  if (M <= 0) return cudaSuccess;
  if (K <= 0 || M > 0x7fffffffLL) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat: return quantize_for<float>(x, M, K, ldx, q, scale, stream);
    case DType::kHalf: return quantize_for<__half>(x, M, K, ldx, q, scale, stream);
    case DType::kBFloat16: return quantize_for<__nv_bfloat16>(x, M, K, ldx, q, scale, stream);
  }
  return cudaErrorInvalidValue;
}

// Split-K choice: a crude time model in units of "one block streaming one tile" (128 rows x 256 B
// = 32 KiB of weights). A wave of b concurrent blocks costs tiles_per_split * max(b, kSaturate)
// (fewer than kSaturate blocks in flight cannot saturate HBM), and a split adds the partials'
// round trip (8 bytes per split and output) plus one launch gap. Ties go to fewer splits.
int w8a16_splits(int64_t M, int64_t N, int64_t K, DType x_dtype) {
  const int kM = rows_template(M);
  const int64_t tiles = tiles_of(K, kM);
  const int64_t row_blocks = ceil_div(N, kRowsPerBlock);
  int resident = 0;
  switch (x_dtype) {
    case DType::kFloat: resident = resident_for<float>(kM); break;
    case DType::kHalf: resident = resident_for<__half>(kM); break;
    default: resident = resident_for<__nv_bfloat16>(kM); break;
  }
  resident = resident > 0 ? resident : 1;
  const double kSaturate = 1.1 * mta::device_sm_count();
  const double kTileBytes = static_cast<double>(kRowsPerBlock) * tile_k(kM);
  const double kLaunchGap = 3.0e6 / kTileBytes;  // ~1 us of HBM time
  int best = 1;
  double best_cost = 0.0;
  const int64_t max_splits = tiles < kMaxSplits ? tiles : kMaxSplits;
  for (int64_t s = 1; s <= max_splits; ++s) {
    const int64_t tps = ceil_div(tiles, s);
    if (ceil_div(tiles, tps) != s) continue;  // same work as a smaller split count
    const int64_t blocks = row_blocks * s;
    if (blocks > 0x7fffffffLL || s > 65535) break;
    const int64_t full_waves = blocks / resident, rest = blocks % resident;
    const double full = static_cast<double>(resident) > kSaturate ? static_cast<double>(resident) : kSaturate;
    const double last = rest == 0 ? 0.0 : (static_cast<double>(rest) > kSaturate ? static_cast<double>(rest) : kSaturate);
    double cost = static_cast<double>(tps) * (static_cast<double>(full_waves) * full + last);
    if (s > 1) cost += 8.0 * static_cast<double>(s) * M * N / kTileBytes + kLaunchGap;
    if (s == 1 || cost < best_cost) {
      best = static_cast<int>(s);
      best_cost = cost;
    }
  }
  return best;
}

cudaError_t launch_w8a16_mm(const W8A16Args& a, int splits, float* workspace, cudaStream_t stream) {
  if (a.M <= 0 || a.N <= 0) return cudaSuccess;
  if (a.M > kW8A16MaxRows || splits < 1 || (splits > 1 && workspace == nullptr)) return cudaErrorInvalidValue;
  const int64_t tiles = tiles_of(a.K, rows_template(a.M));
  const int64_t tps = ceil_div(tiles, splits);
  if (ceil_div(tiles, tps) != splits || ceil_div(a.N, kRowsPerBlock) > 0x7fffffffLL) return cudaErrorInvalidValue;
  GemvParams p{};
  p.x = a.x;
  p.ldx = a.ldx;
  p.w = a.w;
  p.ldw = a.ldw;
  p.w_scale = a.w_scale;
  p.bias = a.bias;
  p.bias_dtype = a.bias_dtype;
  p.out = a.out;
  p.partial = splits > 1 ? workspace : nullptr;
  p.M = static_cast<int>(a.M);
  p.N = a.N;
  p.K = a.K;
  p.tiles_per_split = static_cast<int>(tps);
  const bool vec = (reinterpret_cast<uintptr_t>(a.w) & 15u) == 0 && a.ldw % 16 == 0 && a.K % 16 == 0;
  switch (a.x_dtype) {
    case DType::kFloat: return w8a16_for<float>(p, vec, splits, stream);
    case DType::kHalf: return w8a16_for<__half>(p, vec, splits, stream);
    case DType::kBFloat16: return w8a16_for<__nv_bfloat16>(p, vec, splits, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace bigkernels::quant::cuda
