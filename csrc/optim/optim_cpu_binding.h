// Helpers of the CPU bindings of the fused optimizer ops (tensor lists -> pointer-level kernels):
// storage dtype, GradScaler / clipping scalars, and the flat parallel split of every element of
// every tensor (2,000 small tensors balance as well as one big one).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "optim/checks.h"
#include "optim/optim_cpu.h"

namespace bigkernels::optim::cpu::binding {

constexpr int64_t kGrain = 1 << 15;  // elements per parallel task

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    default: TORCH_CHECK(false, "bigkernels: unsupported dtype ", t.scalar_type());
  }
}

inline float read_scalar(const std::optional<at::Tensor>& t, float if_absent) {
  return t.has_value() ? t->data_ptr<float>()[0] : if_absent;
}

// 1/grad_scale times the clip coefficient (see bigkernels/reference/optim.py).
inline float grad_multiplier(const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& grad_norm,
                              double max_grad_norm) {
  double mult = 1.0 / double(read_scalar(grad_scale, 1.0f));
  if (grad_norm.has_value() && max_grad_norm > 0) {
    const double norm = double(read_scalar(grad_norm, 0.0f)) * mult;
    mult *= std::min(1.0, max_grad_norm / (norm + 1e-6));
  }
  return float(mult);
}

inline bool skip_step(const std::optional<at::Tensor>& found_inf) { return read_scalar(found_inf, 0.0f) != 0.0f; }

// Runs fn(tensor_index, begin, end) over every element of every tensor, in parallel.
template <class Fn>
void for_each_range(at::TensorList tensors, const Fn& fn) {
  std::vector<int64_t> offsets(tensors.size() + 1, 0);
  for (size_t i = 0; i < tensors.size(); ++i) offsets[i + 1] = offsets[i] + tensors[i].numel();
  at::parallel_for(0, offsets.back(), kGrain, [&](int64_t begin, int64_t end) {
    size_t t = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    for (int64_t pos = begin; pos < end; ++t) {
      const int64_t stop = std::min(end, offsets[t + 1]);
      if (stop > pos) fn(t, pos - offsets[t], stop - offsets[t]);
      pos = std::max(pos, stop);
    }
  });
}

inline char* at_elem(const at::Tensor& t, int64_t i) { return static_cast<char*>(t.data_ptr()) + i * t.element_size(); }

// Tensor t's mask bytes from element b on, or nullptr.
inline const uint8_t* keep_at(const std::optional<at::TensorList>& masks, size_t t, int64_t b) {
  const uint8_t* keep = mask_bytes(masks, t);
  return keep != nullptr ? keep + b : nullptr;
}

}  // namespace bigkernels::optim::cpu::binding
