// CUDA kernels of the fused optimizers: Adam/AdamW (one templated body for every mode), SGD, the
// step-counter increment and a deterministic sum of squares. Light headers only (no torch/ATen):
// the tensors arrive as a metadata table of raw pointers built by optim_cuda.cpp.
//
// The maths follows bigkernels/reference/optim.py exactly, in fp32 for every storage dtype:
//   g  = grad * mult          mult = 1/grad_scale * min(1, max_norm / (grad_norm/grad_scale + 1e-6)),
//                             computed in fp64 from device scalars, then rounded to fp32
//   g  = -g                   (maximize)
//   Adam:  g += wd * p        AdamW: p *= 1 - lr * wd
//   m  = m * beta1 + (1 - beta1) * g
//   v  = v * beta2 + (1 - beta2) * g * g
//   vmax = maximum(vmax, v)   (amsgrad; NaN propagates like torch.maximum)
//   p -= (lr / (1 - beta1^step)) * m / (sqrt(vhat) / sqrt(1 - beta2^step) + eps),  step = counter + 1
// The bias corrections are computed in fp64 per tensor (as torch does), the step counters are
// incremented afterwards by a separate launch, and found_inf != 0 makes every kernel return
// before touching memory, so nothing changes at all. Params with a pruning mask are stored as +0
// where the mask is false (done by mta::apply_kernel, in the same pass).
#include <cuda_bf16.h>
#include <cmath>
#include <limits>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/multi_tensor_apply.cuh"
#include "optim/optim_cuda.h"

namespace bigkernels::optim::cuda {
namespace {

using mta::Entry;
using mta::Table;
using mta::kBlockSize;

// fp64 division and square root without the out-of-line slow-path calls that `/` and sqrt()
// compile to: a call inside the multi-tensor loop makes ptxas spill the registers live across it
// (seen on sm_90: 16 bytes for bf16 Adam), and the build treats any spill as an error. A float
// seed refined by Newton steps in fp64 FMAs gives the quotient / root to about one fp64 ulp, so
// the fp32 values the kernels use round as the reference's fp64 ones do. IEEE special values
// (b = 0, inf, NaN; x = 0) come out as `/` and sqrt() give them; operands outside fp32's normal
// range (not met here: bias corrections are in [1 - beta, 1], beta < 1 checked on the host) lose
// that guarantee.
__device__ __forceinline__ double div_nocall(double a, double b) {
  double r = static_cast<double>(__frcp_rn(static_cast<float>(b)));
  if (r == 0.0 || !isfinite(r)) return a * r;  // b = +-inf, 0 or NaN
  r = fma(r, fma(-b, r, 1.0), r);
  r = fma(r, fma(-b, r, 1.0), r);
  const double q = a * r;
  return fma(r, fma(-b, q, a), q);
}

__device__ __forceinline__ double sqrt_nocall(double x) {
  if (!(x > 0.0) || isinf(x)) {  // sqrt(+-0) = +-0, sqrt(inf) = inf, NaN for negatives and NaN
    return (x == 0.0 || x > 0.0) ? x : __longlong_as_double(0x7ff8000000000000LL);
  }
  double y = static_cast<double>(rsqrtf(static_cast<float>(x)));  // 1 / sqrt(x) to ~23 bits
  y = y * fma(-0.5 * x * y, y, 1.5);
  y = y * fma(-0.5 * x * y, y, 1.5);
  const double s = x * y;
  return fma(0.5 * y, fma(-s, s, x), s);
}

// found_inf / grad_scale / grad_norm, read on the device (no host synchronisation).
struct DeviceGradControl {
  const float* grad_scale;
  const float* found_inf;
  const float* grad_norm;
  double max_grad_norm;

  __device__ __forceinline__ bool skip() const { return found_inf != nullptr && __ldg(found_inf) != 0.0f; }

  // reference.grad_multiplier: fp64 maths, applied to the fp32 gradient as an fp32 factor.
  __device__ __forceinline__ float multiplier() const {
    double mult = 1.0;
    if (grad_scale != nullptr) mult = div_nocall(1.0, static_cast<double>(__ldg(grad_scale)));
    if (grad_norm != nullptr && max_grad_norm > 0.0) {
      const double norm = static_cast<double>(__ldg(grad_norm)) * mult;
      double clip = div_nocall(max_grad_norm, norm + 1e-6);
      clip = clip > 1.0 ? 1.0 : clip;  // torch.clamp(max=1): NaN stays NaN
      mult = mult * clip;
    }
    return static_cast<float>(mult);
  }
};

DeviceGradControl to_device(const GradControl& c) {
  return DeviceGradControl{c.grad_scale, c.found_inf, c.grad_norm, c.max_grad_norm};
}

// ----------------------------------------------------------------------------------------------
// Adam / AdamW. Lists: 0 params, 1 grads (read only), 2 exp_avgs, 3 exp_avg_sqs, 4 max_exp_avg_sqs.
template <bool kAmsgrad>
struct AdamOp {
  static constexpr int kLists = kAmsgrad ? 5 : 4;
  __host__ __device__ static constexpr bool writes(int list) { return list != 1; }

  DeviceGradControl control;
  double lr, log_beta1, log_beta2;  // fp64 for the bias corrections (log: -inf for beta = 0)
  float beta1f, one_minus_beta1, beta2f, one_minus_beta2, eps, weight_decay, decay;
  bool maximize, decoupled, has_weight_decay;
  // Per thread: set by begin_block / begin_tensor.
  float mult, step_size, bias_correction2_sqrt;

  __device__ __forceinline__ bool begin_block() {
    if (control.skip()) return false;
    mult = control.multiplier();
    return true;
  }

  // fp64 beta^step = exp(step * log(beta)), the division and the square root by one lane per
  // warp, broadcast by shuffle (cheap on GPUs with slow fp64). No pow(), `/` or sqrt(): their
  // out-of-line calls made ptxas spill registers (see div_nocall).
  __device__ __forceinline__ void begin_tensor(const Entry& e) {
    float size = 0.0f, bc2 = 0.0f;
    if ((threadIdx.x & 31u) == 0) {
      const double step = static_cast<double>(__ldg(e.step)) + 1.0;
      size = static_cast<float>(div_nocall(lr, 1.0 - exp(step * log_beta1)));
      bc2 = static_cast<float>(sqrt_nocall(1.0 - exp(step * log_beta2)));
    }
    step_size = __shfl_sync(0xffffffffu, size, 0);
    bias_correction2_sqrt = __shfl_sync(0xffffffffu, bc2, 0);
  }

  __device__ __forceinline__ void operator()(float (&x)[kLists]) const {
    float g = x[1] * mult;
    if (maximize) g = -g;
    float p = x[0];
    if (has_weight_decay) {
      if (decoupled) {
        p = p * decay;
      } else {
        g = g + weight_decay * p;
      }
    }
    const float m = x[2] * beta1f + one_minus_beta1 * g;
    const float v = x[3] * beta2f + one_minus_beta2 * g * g;
    float vhat = v;
    if constexpr (kAmsgrad) {
      const float old = x[4];
      vhat = (old > v || old != old) ? old : v;
      x[4] = vhat;
    }
    const float denom = sqrtf(vhat) / bias_correction2_sqrt + eps;
    x[0] = p - step_size * m / denom;
    x[2] = m;
    x[3] = v;
  }
};

// ----------------------------------------------------------------------------------------------
// SGD. Lists: 0 params, 1 grads (read only), 2 momentum_buffers (only with momentum).
template <bool kMomentum>
struct SgdOp {
  static constexpr int kLists = kMomentum ? 3 : 2;
  __host__ __device__ static constexpr bool writes(int list) { return list != 1; }

  DeviceGradControl control;
  float lr, momentum, one_minus_dampening, weight_decay;
  bool nesterov, maximize, first_step, has_weight_decay;
  float mult;

  __device__ __forceinline__ bool begin_block() {
    if (control.skip()) return false;
    mult = control.multiplier();
    return true;
  }
  __device__ __forceinline__ void begin_tensor(const Entry&) {}

  __device__ __forceinline__ void operator()(float (&x)[kLists]) const {
    float g = x[1] * mult;
    if (maximize) g = -g;
    const float p = x[0];
    if (has_weight_decay) g = g + weight_decay * p;
    if constexpr (kMomentum) {
      const float buf = first_step ? g : x[2] * momentum + one_minus_dampening * g;
      x[2] = buf;
      g = nesterov ? g + momentum * buf : buf;
    }
    x[0] = p - lr * g;
  }
};

// ----------------------------------------------------------------------------------------------
// Masks only: list 0 is loaded and stored back unchanged, and apply_kernel zeroes what its entry's
// `keep` mask prunes (exact: the storage types round-trip through fp32 unchanged).
struct MaskOp {
  static constexpr int kLists = 1;
  __host__ __device__ static constexpr bool writes(int) { return true; }
  __device__ __forceinline__ bool begin_block() { return true; }
  __device__ __forceinline__ void begin_tensor(const Entry&) {}
  __device__ __forceinline__ void operator()(float (&)[kLists]) const {}
};

// ----------------------------------------------------------------------------------------------
// Step counters: +1 each, after the update (same stream), unless found_inf != 0.
__global__ void __launch_bounds__(kBlockSize) increment_steps_kernel(Table table, const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < table.num_tensors; i += blockDim.x * gridDim.x) {
    float* step = table.entries[i].step;
    if (step != nullptr) *step += 1.0f;
  }
}

// ----------------------------------------------------------------------------------------------
// Sum of squares: fp32 squares accumulated per thread within a chunk, then fp64 across chunks,
// one fp64 partial per block, and a single block summing the partials in a fixed order.
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double warp_sums[kBlockSize / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = 0.0;
  if (warp == 0) {
    v = lane < kBlockSize / 32 ? warp_sums[lane] : 0.0;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;  // valid in thread 0
}

template <typename T>
__global__ void __launch_bounds__(kBlockSize) sum_of_squares_kernel(Table table, double* __restrict__ partials) {
  using E = mta::Elem<T>;
  constexpr int V = E::kVec;
  double total = 0.0;
  int t = 0;
  for (int64_t c = blockIdx.x; c < table.total_chunks; c += gridDim.x) {
    t = mta::find_tensor(table.chunk_start, table.num_tensors, c, t);
    const Entry e = mta::load_entry(table.entries, t);
    const int64_t first = (c - __ldg(table.chunk_start + t)) * mta::kChunkSize;
    const int64_t left = e.numel - first;
    const int n = static_cast<int>(left < mta::kChunkSize ? left : mta::kChunkSize);
    const T* p = static_cast<const T*>(e.ptr[0]) + first;
    float acc[V];
#pragma unroll
    for (int k = 0; k < V; ++k) acc[k] = 0.0f;
    int tail = 0;
    if (e.aligned) {
      const int nvec = n / V;
      for (int i = threadIdx.x; i < nvec; i += kBlockSize) {
        float v[V];
        E::unpack(mta::ld16<true>(p + i * V), v);
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] = fmaf(v[k], v[k], acc[k]);
      }
      tail = nvec * V;
    }
    for (int i = tail + static_cast<int>(threadIdx.x); i < n; i += kBlockSize) {
      const float x = E::to_float(mta::ld_global<true>(p + i));
      acc[0] = fmaf(x, x, acc[0]);
    }
    float chunk = 0.0f;
#pragma unroll
    for (int k = 0; k < V; ++k) chunk += acc[k];
    total += static_cast<double>(chunk);
  }
  total = block_sum(total);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

__global__ void __launch_bounds__(kBlockSize) sum_partials_kernel(const double* __restrict__ partials, int n,
                                                                  float* __restrict__ out) {
  double s = 0.0;
  for (int i = threadIdx.x; i < n; i += kBlockSize) s += partials[i];
  s = block_sum(s);
  if (threadIdx.x == 0) out[0] = static_cast<float>(s);
}

// ----------------------------------------------------------------------------------------------
template <typename T>
cudaError_t adam_for(const Table& table, const AdamHyper& h, const DeviceGradControl& control,
                     cudaStream_t stream) {
  auto fill = [&](auto& op) {
    op.control = control;
    op.lr = h.lr;
    op.log_beta1 = h.beta1 > 0.0 ? std::log(h.beta1) : -std::numeric_limits<double>::infinity();
    op.log_beta2 = h.beta2 > 0.0 ? std::log(h.beta2) : -std::numeric_limits<double>::infinity();
    op.beta1f = static_cast<float>(h.beta1);
    op.one_minus_beta1 = static_cast<float>(1.0 - h.beta1);
    op.beta2f = static_cast<float>(h.beta2);
    op.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
    op.eps = static_cast<float>(h.eps);
    op.weight_decay = static_cast<float>(h.weight_decay);
    op.decay = static_cast<float>(1.0 - h.lr * h.weight_decay);
    op.maximize = h.maximize;
    op.decoupled = h.decoupled_weight_decay;
    op.has_weight_decay = h.weight_decay != 0.0;
    op.mult = op.step_size = op.bias_correction2_sqrt = 0.0f;
  };
  if (h.amsgrad) {
    AdamOp<true> op{};
    fill(op);
    return mta::apply<T>(table, op, stream);
  }
  AdamOp<false> op{};
  fill(op);
  return mta::apply<T>(table, op, stream);
}

template <typename T>
cudaError_t sgd_for(const Table& table, const SgdHyper& h, const DeviceGradControl& control, cudaStream_t stream) {
  auto fill = [&](auto& op) {
    op.control = control;
    op.lr = static_cast<float>(h.lr);
    op.momentum = static_cast<float>(h.momentum);
    op.one_minus_dampening = static_cast<float>(1.0 - h.dampening);
    op.weight_decay = static_cast<float>(h.weight_decay);
    op.nesterov = h.nesterov;
    op.maximize = h.maximize;
    op.first_step = h.is_first_step;
    op.has_weight_decay = h.weight_decay != 0.0;
    op.mult = 0.0f;
  };
  if (h.momentum != 0.0) {
    SgdOp<true> op{};
    fill(op);
    return mta::apply<T>(table, op, stream);
  }
  SgdOp<false> op{};
  fill(op);
  return mta::apply<T>(table, op, stream);
}

template <typename T>
cudaError_t sum_of_squares_for(const Table& table, double* partials, int num_partials, float* out,
                               cudaStream_t stream) {
  sum_of_squares_kernel<T><<<num_partials, kBlockSize, 0, stream>>>(table, partials);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  sum_partials_kernel<<<1, kBlockSize, 0, stream>>>(partials, num_partials, out);
  return cudaGetLastError();
}

}  // namespace

size_t table_bytes(int num_tensors) { return mta::table_layout(num_tensors).bytes; }

int64_t fill_table(void* host, const TensorPtrs* tensors, int num_tensors, int num_lists) {
  static_assert(kMaxLists == mta::kMaxLists, "list counts of optim_cuda.h and multi_tensor_apply.cuh differ");
  Entry* entries = mta::table_entries(host, num_tensors);
  for (int t = 0; t < num_tensors; ++t) {
    entries[t] = mta::make_entry(tensors[t].ptr, num_lists, tensors[t].numel, tensors[t].step, tensors[t].keep);
  }
  return mta::finish_table(host, num_tensors);
}

cudaError_t launch_adam(const TableRef& ref, DType dtype, const AdamHyper& hyper, const GradControl& control,
                        cudaStream_t stream) {
  if (ref.num_tensors <= 0) return cudaSuccess;
  const Table table = mta::device_table(ref.device, ref.num_tensors, ref.total_chunks);
  const DeviceGradControl c = to_device(control);
  cudaError_t err = cudaSuccess;
  switch (dtype) {
    case DType::kFloat: err = adam_for<float>(table, hyper, c, stream); break;
    case DType::kHalf: err = adam_for<__half>(table, hyper, c, stream); break;
    case DType::kBFloat16: err = adam_for<__nv_bfloat16>(table, hyper, c, stream); break;
    default: return cudaErrorInvalidValue;
  }
  if (err != cudaSuccess) return err;
  int grid = (ref.num_tensors + kBlockSize - 1) / kBlockSize;
  grid = grid < 1024 ? grid : 1024;
  increment_steps_kernel<<<grid, kBlockSize, 0, stream>>>(table, control.found_inf);
  return cudaGetLastError();
}

cudaError_t launch_sgd(const TableRef& ref, DType dtype, const SgdHyper& hyper, const GradControl& control,
                       cudaStream_t stream) {
  if (ref.num_tensors <= 0) return cudaSuccess;
  const Table table = mta::device_table(ref.device, ref.num_tensors, ref.total_chunks);
  const DeviceGradControl c = to_device(control);
  switch (dtype) {
    case DType::kFloat: return sgd_for<float>(table, hyper, c, stream);
    case DType::kHalf: return sgd_for<__half>(table, hyper, c, stream);
    case DType::kBFloat16: return sgd_for<__nv_bfloat16>(table, hyper, c, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_apply_masks(const TableRef& ref, DType dtype, cudaStream_t stream) {
  if (ref.num_tensors <= 0) return cudaSuccess;
  const Table table = mta::device_table(ref.device, ref.num_tensors, ref.total_chunks);
  switch (dtype) {
    case DType::kFloat: return mta::apply<float>(table, MaskOp{}, stream);
    case DType::kHalf: return mta::apply<__half>(table, MaskOp{}, stream);
    case DType::kBFloat16: return mta::apply<__nv_bfloat16>(table, MaskOp{}, stream);
  }
  return cudaErrorInvalidValue;
}

int sum_of_squares_partials(int64_t total_chunks) {
  const int grid = mta::persistent_grid<&sum_of_squares_kernel<float>>(total_chunks);
  return grid > 0 ? grid : 1;
}

cudaError_t launch_sum_of_squares(const TableRef& ref, DType dtype, double* partials, int num_partials, float* out,
                                  cudaStream_t stream) {
  if (num_partials <= 0) return cudaErrorInvalidValue;
  const Table table = mta::device_table(ref.device, ref.num_tensors, ref.total_chunks);
  switch (dtype) {
    case DType::kFloat: return sum_of_squares_for<float>(table, partials, num_partials, out, stream);
    case DType::kHalf: return sum_of_squares_for<__half>(table, partials, num_partials, out, stream);
    case DType::kBFloat16: return sum_of_squares_for<__nv_bfloat16>(table, partials, num_partials, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace bigkernels::optim::cuda
