// Input validation shared by the CPU and CUDA bindings of the fused optimizer ops.
// Everything is checked before any kernel runs, so a rejected call modifies nothing.
#pragma once

#include "common/stable.h"

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

namespace bigkernels::optim {

struct NamedList {
  const char* name;
  const st::TensorList& tensors;
};

inline void check_scalar_tensor(const char* op, const char* name, const std::optional<st::Tensor>& t,
                                const st::Device& device) {
  if (!t.has_value()) return;
  BK_CHECK(t->numel() == 1, op, ": expected ", name, " to hold one element, got shape ", t->sizes());
  BK_CHECK(t->scalar_type() == st::kFloat, op, ": expected ", name, " to be float32, got ", t->scalar_type());
  BK_CHECK(t->device() == device, op, ": expected ", name, " on ", device, " like the params, got ", t->device());
}

// Checks one fused-optimizer call: params are dense, contiguous, real floating tensors of one
// device and dtype; every list in `same_as_params` matches them element for element (shape,
// dtype, device, layout) unless it is empty and `may_be_empty` says so; state_steps (when given)
// are one-element fp32 tensors on the params' device. `params_contiguous=false` lets read-only
// inputs (sum_of_squares) be strided; they are then read through contiguous copies.
inline void check_lists(const char* op, const st::TensorList& params, const st::TensorList* grads,
                        const std::vector<std::pair<NamedList, bool>>& same_as_params,
                        const st::TensorList* state_steps, bool params_contiguous = true) {
  if (params.empty()) return;
  const st::Tensor& p0 = params[0];
  const auto dtype = p0.scalar_type();
  const auto device = p0.device();
  BK_CHECK(dtype == st::kFloat || dtype == st::kHalf || dtype == st::kBFloat16, op,
              ": params must be float32, float16 or bfloat16, got ", dtype,
              (st::isComplexType(dtype) ? " (complex params are not supported; view them as real)" : ""));
  auto check_like = [&](const char* name, size_t i, const st::Tensor& t, const st::Tensor& p) {
    BK_CHECK(st::is_strided(t), op, ": ", name, "[", i, "] is ", t.layout(),
                "; fused optimizers do not support sparse tensors");
    BK_CHECK(st::same_device(t, p0), op, ": expected ", name, "[", i, "] on ", device, ", got ", t.device());
    BK_CHECK(st::same_dtype(t, p0), op, ": expected ", name, "[", i, "] to be ", dtype, " like params, got ",
                t.scalar_type());
    BK_CHECK(t.sizes().equals(p.sizes()), op, ": expected ", name, "[", i, "] of shape ", p.sizes(),
                " like params[", i, "], got ", t.sizes());
  };
  for (size_t i = 0; i < params.size(); ++i) {
    const st::Tensor& p = params[i];
    BK_CHECK(st::is_strided(p), op, ": params[", i, "] is ", p.layout(), "; expected a dense tensor");
    BK_CHECK(st::same_device(p, p0), op, ": all params must be on one device; params[0] is on ", device,
                ", params[", i, "] on ", p.device());
    BK_CHECK(st::same_dtype(p, p0), op, ": all params must have one dtype; params[0] is ", dtype, ", params[",
                i, "] is ", p.scalar_type());
    BK_CHECK(!params_contiguous || p.is_contiguous(), op, ": params[", i, "] must be contiguous");
  }
  if (grads != nullptr) {
    BK_CHECK(grads->size() == params.size(), op, ": expected ", params.size(), " grads, got ", grads->size());
    for (size_t i = 0; i < params.size(); ++i) check_like("grads", i, (*grads)[i], params[i]);
  }
  for (const auto& [list, may_be_empty] : same_as_params) {
    if (may_be_empty && list.tensors.empty()) continue;
    BK_CHECK(list.tensors.size() == params.size(), op, ": expected ", params.size(), " ", list.name, ", got ",
                list.tensors.size());
    for (size_t i = 0; i < params.size(); ++i) {
      check_like(list.name, i, list.tensors[i], params[i]);
      BK_CHECK(list.tensors[i].is_contiguous(), op, ": ", list.name, "[", i, "] must be contiguous");
    }
  }
  if (state_steps != nullptr) {
    BK_CHECK(state_steps->size() == params.size(), op, ": expected ", params.size(), " state_steps, got ",
                state_steps->size());
    for (size_t i = 0; i < params.size(); ++i) {
      const st::Tensor& s = (*state_steps)[i];
      BK_CHECK(s.numel() == 1 && st::is_float32(s) && st::same_device(s, p0), op,
                  ": expected state_steps[", i, "] to be a one-element float32 tensor on ", device, ", got ",
                  s.scalar_type(), " of shape ", s.sizes(), " on ", s.device());
    }
  }
}

inline void check_hyper(const char* op, bool ok, const char* what, double value) {
  BK_CHECK(ok, op, ": invalid ", what, ": ", value);
}

// GradScaler's grad_scale / found_inf and the clipping norm: one-element fp32 tensors on `device`.
inline void check_grad_control(const char* op, const st::Device& device, const std::optional<st::Tensor>& grad_scale,
                               const std::optional<st::Tensor>& found_inf, const std::optional<st::Tensor>& grad_norm) {
  check_scalar_tensor(op, "grad_scale", grad_scale, device);
  check_scalar_tensor(op, "found_inf", found_inf, device);
  check_scalar_tensor(op, "grad_norm", grad_norm, device);
}

// Pruning masks as the bindings hand them around: none, or one per param; made from a `Tensor[]?`
// argument or a `Tensor[]` one without copying the list (an std::optional<st::TensorList> made from
// an st::TensorList copies every tensor handle: once per mask_bytes call, quadratic in the list).
struct Masks {
  const st::TensorList* list;
  Masks(const std::optional<st::TensorList>& m) : list(m.has_value() ? &*m : nullptr) {}  // NOLINT
  Masks(const st::TensorList& m) : list(&m) {}                                             // NOLINT
  bool has_value() const { return list != nullptr; }
  const st::TensorList& operator*() const { return *list; }
  const st::TensorList* operator->() const { return list; }
};

// Pruning masks: absent, or one contiguous bool tensor per param with its shape and device.
inline void check_masks(const char* op, const st::TensorList& params, Masks masks) {
  if (!masks.has_value()) return;
  BK_CHECK(masks->size() == params.size(), op, ": expected ", params.size(), " masks (one per param), got ",
              masks->size());
  for (size_t i = 0; i < params.size(); ++i) {
    const st::Tensor& m = (*masks)[i];
    BK_CHECK(st::is_bool(m), op, ": expected masks[", i, "] to be a bool tensor, got ",
                m.scalar_type());
    BK_CHECK(st::is_strided(m) && m.is_contiguous(), op, ": masks[", i,
                "] must be a dense contiguous tensor");
    BK_CHECK(m.sizes().equals(params[i].sizes()) && st::same_device(m, params[i]), op, ": expected masks[", i,
                "] of shape ", params[i].sizes(), " on ", params[i].device(), " like params[", i, "], got ",
                m.sizes(), " on ", m.device());
  }
}

// Everything a fused_adam_/fused_adamw_ call takes, checked before any kernel runs.
inline void check_adam_call(const char* op, const st::TensorList& params, const st::TensorList& grads, const st::TensorList& exp_avgs,
                            const st::TensorList& exp_avg_sqs, const st::TensorList& max_exp_avg_sqs, const st::TensorList& state_steps,
                            double lr, double beta1, double beta2, double weight_decay, double eps, bool amsgrad,
                            const std::optional<st::Tensor>& grad_scale, const std::optional<st::Tensor>& found_inf,
                            const std::optional<st::Tensor>& grad_norm, const std::optional<st::TensorList>& masks) {
  check_hyper(op, lr >= 0, "learning rate", lr);
  check_hyper(op, eps >= 0, "epsilon value", eps);
  check_hyper(op, 0 <= beta1 && beta1 < 1, "beta parameter at index 0", beta1);
  check_hyper(op, 0 <= beta2 && beta2 < 1, "beta parameter at index 1", beta2);
  check_hyper(op, weight_decay >= 0, "weight_decay value", weight_decay);
  check_lists(op, params, &grads,
              {{{"exp_avgs", exp_avgs}, false}, {{"exp_avg_sqs", exp_avg_sqs}, false},
               {{"max_exp_avg_sqs", max_exp_avg_sqs}, !amsgrad}},
              &state_steps);
  check_masks(op, params, masks);
  if (!params.empty()) check_grad_control(op, params[0].device(), grad_scale, found_inf, grad_norm);
}

// Everything a fused_sgd_ call takes, checked before any kernel runs.
inline void check_sgd_call(const char* op, const st::TensorList& params, const st::TensorList& grads, const st::TensorList& momentum_buffers,
                           double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                           const std::optional<st::Tensor>& grad_scale, const std::optional<st::Tensor>& found_inf,
                           const std::optional<st::Tensor>& grad_norm, const std::optional<st::TensorList>& masks) {
  check_hyper(op, lr >= 0, "learning rate", lr);
  check_hyper(op, momentum >= 0, "momentum value", momentum);
  check_hyper(op, weight_decay >= 0, "weight_decay value", weight_decay);
  BK_CHECK(!nesterov || (momentum > 0 && dampening == 0), op,
              ": Nesterov momentum requires a momentum and zero dampening");
  check_lists(op, params, &grads, {{{"momentum_buffers", momentum_buffers}, momentum == 0}}, nullptr);
  check_masks(op, params, masks);
  if (!params.empty()) check_grad_control(op, params[0].device(), grad_scale, found_inf, grad_norm);
}

// Flat state (fused_adam_flat_ / fused_adamw_flat_): one 1-D buffer per state name for all params,
// param i's piece at element flat_offsets(params)[i], each piece starting on a kFlatAlignBytes
// boundary of the buffer (so a vector access that is aligned for the params is aligned for the
// state); the last entry is the buffer length needed. Mirrors bigkernels.reference.optim.flat_offsets.
constexpr int64_t kFlatAlignBytes = 64;

inline std::vector<int64_t> flat_offsets(const st::TensorList& params) {
  std::vector<int64_t> out(params.size() + 1, 0);
  if (params.empty()) return out;
  const int64_t align = std::max<int64_t>(1, kFlatAlignBytes / int64_t(params[0].element_size()));
  int64_t pos = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    out[i] = pos;
    pos += (params[i].numel() + align - 1) / align * align;
  }
  out[params.size()] = out[params.size() - 1] + params[params.size() - 1].numel();
  return out;
}

// A flat state buffer: 1-D, contiguous, dense, on the params' device, of their dtype (fp32 step
// counters when `steps`), holding at least `need` elements.
inline void check_flat(const char* op, const char* name, const st::Tensor& buf, const st::TensorList& params, int64_t need,
                       bool steps = false) {
  if (params.empty()) return;
  const auto dtype = steps ? st::kFloat : params[0].scalar_type();
  BK_CHECK(buf.layout() == st::kStrided && buf.dim() == 1 && buf.is_contiguous() && buf.scalar_type() == dtype &&
                  buf.device() == params[0].device() && buf.numel() >= need,
              op, ": expected ", name, " to be a contiguous 1-D ", dtype, " tensor of >= ", need, " elements on ",
              params[0].device(), " (flat state of ", params.size(), " params), got ", buf.scalar_type(), " of shape ",
              buf.sizes(), " on ", buf.device(), (buf.is_contiguous() ? "" : ", not contiguous"));
}

// Everything a fused_adam_flat_/fused_adamw_flat_ call takes, checked before any kernel runs.
inline void check_adam_flat_call(const char* op, const st::TensorList& params, const st::TensorList& grads, const st::Tensor& exp_avg,
                                 const st::Tensor& exp_avg_sq, const std::optional<st::Tensor>& max_exp_avg_sq,
                                 const st::Tensor& state_steps, const std::vector<int64_t>& offsets, double lr,
                                 double beta1, double beta2, double weight_decay, double eps, bool amsgrad,
                                 const std::optional<st::Tensor>& grad_scale, const std::optional<st::Tensor>& found_inf,
                                 const std::optional<st::Tensor>& grad_norm, const std::optional<st::TensorList>& masks) {
  check_hyper(op, lr >= 0, "learning rate", lr);
  check_hyper(op, eps >= 0, "epsilon value", eps);
  check_hyper(op, 0 <= beta1 && beta1 < 1, "beta parameter at index 0", beta1);
  check_hyper(op, 0 <= beta2 && beta2 < 1, "beta parameter at index 1", beta2);
  check_hyper(op, weight_decay >= 0, "weight_decay value", weight_decay);
  check_lists(op, params, &grads, {}, nullptr);
  const int64_t need = offsets.back();
  check_flat(op, "exp_avg", exp_avg, params, need);
  check_flat(op, "exp_avg_sq", exp_avg_sq, params, need);
  if (amsgrad) {
    BK_CHECK(max_exp_avg_sq.has_value(), op, ": amsgrad=True needs max_exp_avg_sq");
    check_flat(op, "max_exp_avg_sq", *max_exp_avg_sq, params, need);
  }
  check_flat(op, "state_steps", state_steps, params, int64_t(params.size()), /*steps=*/true);
  check_masks(op, params, masks);
  if (!params.empty()) check_grad_control(op, params[0].device(), grad_scale, found_inf, grad_norm);
}

// The bytes of tensor i's pruning mask (torch bools are one byte each), or nullptr when there are
// no masks or the tensor is empty.
inline const uint8_t* mask_bytes(Masks masks, size_t i) {
  if (!masks.has_value() || (*masks)[i].numel() == 0) return nullptr;
  return reinterpret_cast<const uint8_t*>((*masks)[i].mutable_data_ptr<bool>());
}

// Grads are read only; a non-contiguous one is read through a contiguous copy.
inline std::vector<st::Tensor> contiguous_list(const st::TensorList& ts) {
  std::vector<st::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(st::contiguous(t));
  return out;
}

}  // namespace bigkernels::optim
