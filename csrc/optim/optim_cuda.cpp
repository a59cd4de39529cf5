// CUDA binding of the fused optimizer ops: validates the torch arguments, builds the metadata
// table of raw pointers (pinned host memory -> one asynchronous copy to the device on the current
// stream) and calls the launchers of optim_cuda_kernels.cu. Nothing here touches the tensors' data, and
// every check runs before the first launch, so a rejected call modifies nothing. No host
// synchronisation: found_inf, grad_scale and grad_norm are read by the kernels on the device.
// Bound through the stable ABI (common/stable.h): the params' autograd versions are bumped by the
// op's ADInplaceOrView kernel (bigkernels/ops/_extension.py) before this runs.
#include "common/stable.h"

#include <cstdint>
#include <optional>
#include <vector>

#include "optim/checks.h"
#include "optim/optim_cuda.h"

namespace bigkernels::optim {
namespace {

namespace kc = bigkernels::optim::cuda;

kc::DType dtype_of(const st::Tensor& t) {
  switch (t.scalar_type()) {
    case st::kFloat: return kc::DType::kFloat;
    case st::kHalf: return kc::DType::kHalf;
    case st::kBFloat16: return kc::DType::kBFloat16;
    default: BK_CHECK(false, "bigkernels CUDA optimizers: unsupported dtype ", t.scalar_type());
  }
  return kc::DType::kFloat;  // unreachable
}

void check_launch(const char* op, cudaError_t err) {
  BK_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

const float* scalar_ptr(const std::optional<st::Tensor>& t) {
  return t.has_value() ? t->mutable_data_ptr<float>() : nullptr;
}

// The metadata table on the device. `device_buffer` must stay referenced until the launches are
// enqueued; the caching allocator then keeps it valid for the work queued on the stream.
struct DeviceTable {
  st::Tensor device_buffer;
  kc::TableRef ref;
};

DeviceTable upload_table(const std::vector<kc::TensorPtrs>& tensors, int num_lists, const st::Device& device) {
  BK_CHECK(tensors.size() <= static_cast<size_t>(INT32_MAX), "bigkernels: too many tensors in one call");
  const int n = static_cast<int>(tensors.size());
  const auto bytes = static_cast<int64_t>(kc::table_bytes(n));
  // Pinned staging memory from torch's caching host allocator: the non_blocking copy below records
  // an event on the stream, and the block is not handed out again before the copy has finished.
  st::Tensor host = st::empty({bytes}, st::TensorOptions().dtype(st::kByte).pinned_memory(true));
  const int64_t total_chunks = kc::fill_table(host.data_ptr(), tensors.data(), n, num_lists);
  st::Tensor dev = st::empty({bytes}, st::TensorOptions().dtype(st::kByte).device(device));
  st::copy_(dev, host, /*non_blocking=*/true);
  return DeviceTable{dev, kc::TableRef{dev.data_ptr(), n, total_chunks}};
}

kc::GradControl control_of(const std::optional<st::Tensor>& grad_scale, const std::optional<st::Tensor>& found_inf,
                           const std::optional<st::Tensor>& grad_norm, double max_grad_norm) {
  return kc::GradControl{scalar_ptr(grad_scale), scalar_ptr(found_inf), scalar_ptr(grad_norm), max_grad_norm};
}

cudaStream_t current_stream(const st::Device& device) {
  return static_cast<cudaStream_t>(st::current_cuda_stream(device));
}

void* ptr_of(const st::Tensor& t) { return t.numel() > 0 ? t.data_ptr() : nullptr; }

template <bool kDecoupled>
void fused_adam_cuda(const st::TensorList& params, const st::TensorList& grads, const st::TensorList& exp_avgs, const st::TensorList& exp_avg_sqs,
                     const st::TensorList& max_exp_avg_sqs, const st::TensorList& state_steps, double lr, double beta1,
                     double beta2, double weight_decay, double eps, bool amsgrad, bool maximize,
                     const std::optional<st::Tensor>& grad_scale, const std::optional<st::Tensor>& found_inf,
                     const std::optional<st::Tensor>& grad_norm, double max_grad_norm,
                     const std::optional<st::TensorList>& masks) {
  const char* op = kDecoupled ? "fused_adamw_" : "fused_adam_";
  check_adam_call(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2,
                  weight_decay, eps, amsgrad, grad_scale, found_inf, grad_norm, masks);
  if (params.empty()) return;
  const st::Device device = params[0].device();
  BK_CHECK(device.is_cuda(), op, ": expected CUDA params, got ", device);

  st::DeviceGuard guard(st::device_index(device));
  const std::vector<st::Tensor> g = contiguous_list(grads);
  std::vector<kc::TensorPtrs> tensors(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    kc::TensorPtrs& t = tensors[i];
    t.ptr[0] = ptr_of(params[i]);
    t.ptr[1] = ptr_of(g[i]);
    t.ptr[2] = ptr_of(exp_avgs[i]);
    t.ptr[3] = ptr_of(exp_avg_sqs[i]);
    t.ptr[4] = amsgrad ? ptr_of(max_exp_avg_sqs[i]) : nullptr;
    t.numel = params[i].numel();
    t.step = state_steps[i].mutable_data_ptr<float>();  // zero-numel params still count their steps
    t.keep = mask_bytes(masks, i);
  }
  const DeviceTable table = upload_table(tensors, amsgrad ? 5 : 4, device);
  const kc::AdamHyper hyper{lr, beta1, beta2, weight_decay, eps, amsgrad, maximize, kDecoupled};
  check_launch(op, kc::launch_adam(table.ref, dtype_of(params[0]), hyper,
                                   control_of(grad_scale, found_inf, grad_norm, max_grad_norm),
                                   current_stream(device)));
}

void fused_sgd_cuda(const st::TensorList& params, const st::TensorList& grads, const st::TensorList& momentum_buffers, double lr,
                    double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                    bool is_first_step, const std::optional<st::Tensor>& grad_scale,
                    const std::optional<st::Tensor>& found_inf, const std::optional<st::Tensor>& grad_norm,
                    double max_grad_norm, const std::optional<st::TensorList>& masks) {
  const char* op = "fused_sgd_";
  check_sgd_call(op, params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, grad_scale,
                 found_inf, grad_norm, masks);
  if (params.empty()) return;
  const bool has_momentum = momentum != 0;
  const st::Device device = params[0].device();
  BK_CHECK(device.is_cuda(), op, ": expected CUDA params, got ", device);

  st::DeviceGuard guard(st::device_index(device));
  const std::vector<st::Tensor> g = contiguous_list(grads);
  std::vector<kc::TensorPtrs> tensors;
  tensors.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].numel() == 0) continue;  // no step counters here: empty tensors need no entry
    kc::TensorPtrs t{};
    t.ptr[0] = params[i].data_ptr();
    t.ptr[1] = g[i].data_ptr();
    t.ptr[2] = has_momentum ? momentum_buffers[i].data_ptr() : nullptr;
    t.numel = params[i].numel();
    t.step = nullptr;
    t.keep = mask_bytes(masks, i);
    tensors.push_back(t);
  }
  if (tensors.empty()) return;
  const DeviceTable table = upload_table(tensors, has_momentum ? 3 : 2, device);
  const kc::SgdHyper hyper{lr, momentum, dampening, weight_decay, nesterov, maximize, is_first_step};
  check_launch(op, kc::launch_sgd(table.ref, dtype_of(params[0]), hyper,
                                  control_of(grad_scale, found_inf, grad_norm, max_grad_norm),
                                  current_stream(device)));
}

void apply_masks_cuda(const st::TensorList& tensors, const st::TensorList& masks) {
  const char* op = "apply_masks_";
  check_lists(op, tensors, nullptr, {}, nullptr);
  check_masks(op, tensors, masks);
  if (tensors.empty()) return;
  const st::Device device = tensors[0].device();
  BK_CHECK(device.is_cuda(), op, ": expected CUDA tensors, got ", device);

  st::DeviceGuard guard(st::device_index(device));
  std::vector<kc::TensorPtrs> entries;
  entries.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (tensors[i].numel() == 0) continue;
    kc::TensorPtrs t{};
    t.ptr[0] = tensors[i].data_ptr();
    t.numel = tensors[i].numel();
    t.keep = mask_bytes(masks, i);
    entries.push_back(t);
  }
  if (entries.empty()) return;
  const DeviceTable table = upload_table(entries, 1, device);
  check_launch(op, kc::launch_apply_masks(table.ref, dtype_of(tensors[0]), current_stream(device)));
}

st::Tensor sum_of_squares_cuda(const st::TensorList& tensors) {
  const char* op = "sum_of_squares";
  BK_CHECK(!tensors.empty(), "sum_of_squares: tensors must not be empty");
  check_lists(op, tensors, nullptr, {}, nullptr, /*params_contiguous=*/false);
  const st::Device device = tensors[0].device();
  BK_CHECK(device.is_cuda(), op, ": expected CUDA tensors, got ", device);

  st::DeviceGuard guard(st::device_index(device));
  const std::vector<st::Tensor> x = contiguous_list(tensors);
  std::vector<kc::TensorPtrs> ptrs;
  ptrs.reserve(x.size());
  for (const st::Tensor& t : x) {
    if (t.numel() == 0) continue;
    kc::TensorPtrs p{};
    p.ptr[0] = t.data_ptr();
    p.numel = t.numel();
    ptrs.push_back(p);
  }
  st::Tensor out = st::empty({}, st::TensorOptions().dtype(st::kFloat).device(device));
  if (ptrs.empty()) return st::zero_(out);
  const DeviceTable table = upload_table(ptrs, 1, device);
  const int num_partials = kc::sum_of_squares_partials(table.ref.total_chunks);
  st::Tensor partials = st::empty({num_partials}, st::TensorOptions().dtype(st::kDouble).device(device));
  check_launch(op, kc::launch_sum_of_squares(table.ref, dtype_of(x[0]), partials.mutable_data_ptr<double>(), num_partials,
                                             out.mutable_data_ptr<float>(),
                                             current_stream(device)));
  return out;
}

}  // namespace
}  // namespace bigkernels::optim

STABLE_TORCH_LIBRARY_IMPL(bigkernels, CUDA, m) {
  m.impl("fused_adam_", TORCH_BOX(&bigkernels::optim::fused_adam_cuda<false>));
  m.impl("fused_adamw_", TORCH_BOX(&bigkernels::optim::fused_adam_cuda<true>));
  m.impl("fused_sgd_", TORCH_BOX(&bigkernels::optim::fused_sgd_cuda));
  m.impl("sum_of_squares", TORCH_BOX(&bigkernels::optim::sum_of_squares_cuda));
  m.impl("apply_masks_", TORCH_BOX(&bigkernels::optim::apply_masks_cuda));
}
