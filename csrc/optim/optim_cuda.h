// Pointer-level interface between the CUDA kernels of the fused optimizers (optim_cuda_kernels.cu) and
// their torch binding (optim_cuda.cpp). (The .cu is not named optim_cuda.cu because torch's
// BuildExtension names objects by stem: optim_cuda.cpp and optim_cuda.cu would both compile to
// optim_cuda.o and ninja refuses "multiple rules generate".) Plain C++: no torch headers, so the binding can move to
// another ABI without touching the kernels.
//
// Protocol of one call (the binding does steps 1, 3 and 4 with torch's allocators):
//   1. size = table_bytes(n); allocate `size` bytes of pinned host memory and of device memory;
//   2. total_chunks = fill_table(host, tensors, n, num_lists)   (host only, no CUDA call);
//   3. copy the host table to the device buffer asynchronously on the launch stream;
//   4. launch_*(TableRef{device, n, total_chunks}, ...) on that stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace bigkernels::optim::cuda {

enum class DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

constexpr int kMaxLists = 5;

// One tensor and its companions, list by list. Adam: params, grads, exp_avgs, exp_avg_sqs,
// max_exp_avg_sqs (amsgrad only). SGD: params, grads, momentum_buffers (momentum != 0 only).
// sum_of_squares: the tensor.
struct TensorPtrs {
  void* ptr[kMaxLists];
  int64_t numel;
  float* step;          // Adam's fp32 step counter; nullptr otherwise
  const uint8_t* keep;  // pruning mask of the params (bool bytes, 0 = pruned: stored as +0); nullptr if none
};

// Bytes of the metadata table for n tensors.
size_t table_bytes(int num_tensors);

// Writes the table of `num_tensors` tensors (using the first `num_lists` pointers of each) into
// `host` (table_bytes(num_tensors) bytes); returns the number of chunks to process.
int64_t fill_table(void* host, const TensorPtrs* tensors, int num_tensors, int num_lists);

struct TableRef {
  const void* device;  // the table, copied to the device
  int num_tensors;
  int64_t total_chunks;
};

// Device pointers to the 1-element fp32 tensors of torch.amp.GradScaler's protocol and the global
// gradient norm; any may be nullptr. Gradients are multiplied by
// 1/grad_scale * min(1, max_grad_norm / (grad_norm/grad_scale + 1e-6)) (the second factor only
// when grad_norm is given and max_grad_norm > 0); found_inf != 0 means nothing at all changes.
struct GradControl {
  const float* grad_scale;
  const float* found_inf;
  const float* grad_norm;
  double max_grad_norm;
};

struct AdamHyper {
  double lr, beta1, beta2, weight_decay, eps;
  bool amsgrad, maximize, decoupled_weight_decay;
};

struct SgdHyper {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize, is_first_step;
};

// The Adam/AdamW update of every tensor of the table, then (in a second launch, skipped on
// device when found_inf != 0) the increment of every step counter, zero-numel tensors included.
cudaError_t launch_adam(const TableRef& table, DType dtype, const AdamHyper& hyper, const GradControl& control,
                        cudaStream_t stream);

cudaError_t launch_sgd(const TableRef& table, DType dtype, const SgdHyper& hyper, const GradControl& control,
                       cudaStream_t stream);

// Every tensor of the table (list 0) stored as +0 where its `keep` mask is 0 (prune_'s hook).
cudaError_t launch_apply_masks(const TableRef& table, DType dtype, cudaStream_t stream);

// Number of fp64 partial sums launch_sum_of_squares needs for `total_chunks` chunks on the
// current device (>= 1).
int sum_of_squares_partials(int64_t total_chunks);

// out[0] = sum of squares of every element of the table's tensors (fp32), computed
// deterministically: per-block partials in `partials` (num_partials of them, from
// sum_of_squares_partials), then one block sums them in a fixed order.
cudaError_t launch_sum_of_squares(const TableRef& table, DType dtype, double* partials, int num_partials, float* out,
                                  cudaStream_t stream);

}  // namespace bigkernels::optim::cuda
