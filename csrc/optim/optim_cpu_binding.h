// Helpers of the CPU bindings of the fused optimizer ops (tensor lists -> pointer-level kernels):
// storage dtype, GradScaler / clipping scalars, and the flat parallel split of every element of
// every tensor (2,000 small tensors balance as well as one big one).
#pragma once

#include "common/stable.h"

#include <algorithm>
#include <optional>
#include <vector>

#include "optim/checks.h"
#include "optim/optim_cpu.h"

namespace bigkernels::optim::cpu::binding {

constexpr int64_t kGrain = 1 << 15;  // elements per parallel task

inline DType dtype_of(const st::Tensor& t) {
  switch (t.scalar_type()) {
    case st::kFloat: return DType::f32;
    case st::kHalf: return DType::f16;
    case st::kBFloat16: return DType::bf16;
    default: BK_CHECK(false, "bigkernels: unsupported dtype ", t.scalar_type());
  }
}

inline float read_scalar(const std::optional<st::Tensor>& t, float if_absent) {
  return t.has_value() ? t->mutable_data_ptr<float>()[0] : if_absent;
}

// 1/grad_scale times the clip coefficient (see bigkernels/reference/optim.py).
inline float grad_multiplier(const std::optional<st::Tensor>& grad_scale, const std::optional<st::Tensor>& grad_norm,
                              double max_grad_norm) {
  double mult = 1.0 / double(read_scalar(grad_scale, 1.0f));
  if (grad_norm.has_value() && max_grad_norm > 0) {
    const double norm = double(read_scalar(grad_norm, 0.0f)) * mult;
    mult *= std::min(1.0, max_grad_norm / (norm + 1e-6));
  }
  return float(mult);
}

inline bool skip_step(const std::optional<st::Tensor>& found_inf) { return read_scalar(found_inf, 0.0f) != 0.0f; }

// Every param's step counter (a one-element fp32 tensor) + 1, after the step.
inline void bump_steps(const st::TensorList& state_steps) {
  for (const auto& s : state_steps) s.mutable_data_ptr<float>()[0] += 1.0f;
}

// What every step does after the op's own checks: nothing when there are no params or found_inf is
// set (nullopt); otherwise the gradients (contiguous), dtype and gradient multiplier of the step.
// (The params' autograd versions are bumped by the op's ADInplaceOrView kernel, before this runs:
// bigkernels/ops/_extension.py.)
struct StepInputs {
  std::vector<st::Tensor> grads;
  DType dtype;
  float mult;
};
inline std::optional<StepInputs> begin_step(const char* op, const st::TensorList& params, const st::TensorList& grads,
                                            const std::optional<st::Tensor>& grad_scale,
                                            const std::optional<st::Tensor>& found_inf,
                                            const std::optional<st::Tensor>& grad_norm, double max_grad_norm) {
  if (params.empty()) return std::nullopt;
  check_grad_control(op, params[0].device(), grad_scale, found_inf, grad_norm);
  if (skip_step(found_inf)) return std::nullopt;
  return StepInputs{contiguous_list(grads), dtype_of(params[0]), grad_multiplier(grad_scale, grad_norm, max_grad_norm)};
}

// Runs fn(tensor_index, begin, end) over every element of every tensor, in parallel.
template <class Fn>
void for_each_range(const st::TensorList& tensors, const Fn& fn) {
  std::vector<int64_t> offsets(tensors.size() + 1, 0);
  for (size_t i = 0; i < tensors.size(); ++i) offsets[i + 1] = offsets[i] + tensors[i].numel();
  st::parallel_for(0, offsets.back(), kGrain, [&](int64_t begin, int64_t end) {
    size_t t = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    for (int64_t pos = begin; pos < end; ++t) {
      const int64_t stop = std::min(end, offsets[t + 1]);
      if (stop > pos) fn(t, pos - offsets[t], stop - offsets[t]);
      pos = std::max(pos, stop);
    }
  });
}

inline char* at_elem(const st::Tensor& t, int64_t i) { return static_cast<char*>(t.data_ptr()) + i * t.element_size(); }

// Tensor t's mask bytes from element b on, or nullptr.
inline const uint8_t* keep_at(Masks masks, size_t t, int64_t b) {
  const uint8_t* keep = mask_bytes(masks, t);
  return keep != nullptr ? keep + b : nullptr;
}

}  // namespace bigkernels::optim::cpu::binding
