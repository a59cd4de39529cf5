// CPU binding of the fused optimizer ops: validates, picks the instruction set at run time and
// splits the elements of all tensors (one flat range, so 2,000 small tensors balance as well as
// one big one) across threads with st::parallel_for.
#include "common/stable.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common/cpu_features.h"
#include "optim/checks.h"
#include "optim/optim_cpu.h"
#include "optim/optim_cpu_binding.h"

namespace bigkernels::optim::cpu {

const Kernels& best_kernels() {
  // Levels, narrowest first; the CPU's own is found once, the environment read on every call.
  static const int cpu_level = bigkernels::cpu_has_avx512_bf16() ? 3
                               : bigkernels::cpu_has_avx512()    ? 2
                               : bigkernels::cpu_has_avx2_fma_f16c() ? 1
                                                                     : 0;
  int level = cpu_level;
  if (const char* forced = std::getenv("BIGKERNELS_CPU_ISA")) {
    static const char* const names[] = {"scalar", "avx2", "avx512", "avx512_bf16"};
    for (int l = 0; l < 4; ++l)
      if (std::strcmp(forced, names[l]) == 0) level = std::min(level, l);
  }
  switch (level) {
    case 3: return avx512_bf16_kernels();
    case 2: return avx512_kernels();
    case 1: return avx2_kernels();
    default: return scalar_kernels();
  }
}

namespace {

using namespace binding;  // dtype_of, grad_multiplier, skip_step, for_each_range, at_elem, keep_at

// tensor elements -> +0 where the mask byte is 0, as bit patterns (exact for every float dtype;
// 0 bits are +0). Written so GCC vectorizes it: a select on the mask bytes read as uint8.
template <class Bits>
void zero_pruned(void* p, const uint8_t* keep, int64_t n) {
  Bits* __restrict bits = static_cast<Bits*>(p);
  const uint8_t* __restrict k = keep;
  for (int64_t i = 0; i < n; ++i) bits[i] = k[i] ? bits[i] : Bits(0);
}

// Where each tensor's state starts: one tensor each (list form), or pieces of one flat buffer.
std::vector<char*> bases_of(const st::TensorList& list) {
  std::vector<char*> out(list.size());
  for (size_t i = 0; i < list.size(); ++i) out[i] = static_cast<char*>(list[i].data_ptr());
  return out;
}

std::vector<char*> bases_of(const st::Tensor& flat, const std::vector<int64_t>& offsets, size_t n) {
  std::vector<char*> out(n);
  char* base = static_cast<char*>(flat.data_ptr());
  for (size_t i = 0; i < n; ++i) out[i] = base + offsets[i] * flat.element_size();
  return out;
}

// The Adam step once the inputs are validated and each tensor's state located: m, v, vmax (empty
// without amsgrad) and steps hold tensor i's state at index i.
template <bool kDecoupled>
void adam_step(const st::TensorList& params, const st::TensorList& grads, const std::vector<char*>& m, const std::vector<char*>& v,
               const std::vector<char*>& vm, const std::vector<float*>& steps, double lr, double beta1, double beta2,
               double weight_decay, double eps, bool amsgrad, bool maximize,
               const std::optional<st::Tensor>& grad_scale, const std::optional<st::Tensor>& found_inf,
               const std::optional<st::Tensor>& grad_norm, double max_grad_norm,
               const std::optional<st::TensorList>& masks) {
  if (params.empty()) return;
  if (skip_step(found_inf)) return;

  const auto g = contiguous_list(grads);
  const DType dt = dtype_of(params[0]);
  const int64_t esz = params[0].element_size();
  const float mult = grad_multiplier(grad_scale, grad_norm, max_grad_norm);
  std::vector<AdamArgs> args(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const double step = double(*steps[i]) + 1.0;
    AdamArgs& a = args[i];
    if (i > 0 && *steps[i] == *steps[i - 1]) {  // the usual case: one step count for the whole bucket
      a = args[i - 1];
      continue;
    }
    a = AdamArgs{float(lr), float(beta1), float(1.0 - beta1), float(beta2), float(1.0 - beta2), float(weight_decay),
                 float(eps), float(1.0 - lr * weight_decay), mult,
                 float(lr / (1.0 - std::pow(beta1, step))), float(std::sqrt(1.0 - std::pow(beta2, step))),
                 amsgrad, maximize, kDecoupled};
  }
  const Kernels& k = best_kernels();
  for_each_range(params, [&](size_t t, int64_t b, int64_t e) {
    k.adam(dt, at_elem(params[t], b), at_elem(g[t], b), m[t] + b * esz, v[t] + b * esz,
           amsgrad ? vm[t] + b * esz : nullptr, keep_at(masks, t, b), e - b, args[t]);
  });
  for (float* s : steps) *s += 1.0f;
}

template <bool kDecoupled>
void fused_adam_cpu(const st::TensorList& params, const st::TensorList& grads, const st::TensorList& exp_avgs, const st::TensorList& exp_avg_sqs,
                    const st::TensorList& max_exp_avg_sqs, const st::TensorList& state_steps, double lr, double beta1,
                    double beta2, double weight_decay, double eps, bool amsgrad, bool maximize,
                    const std::optional<st::Tensor>& grad_scale, const std::optional<st::Tensor>& found_inf,
                    const std::optional<st::Tensor>& grad_norm, double max_grad_norm,
                    const std::optional<st::TensorList>& masks) {
  const char* op = kDecoupled ? "fused_adamw_" : "fused_adam_";
  check_adam_call(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2,
                  weight_decay, eps, amsgrad, grad_scale, found_inf, grad_norm, masks);
  std::vector<float*> steps(state_steps.size());
  for (size_t i = 0; i < state_steps.size(); ++i) steps[i] = state_steps[i].mutable_data_ptr<float>();
  adam_step<kDecoupled>(params, grads, bases_of(exp_avgs), bases_of(exp_avg_sqs),
                        amsgrad ? bases_of(max_exp_avg_sqs) : std::vector<char*>{}, steps, lr, beta1, beta2,
                        weight_decay, eps, amsgrad, maximize, grad_scale, found_inf, grad_norm, max_grad_norm, masks);
}

// The same step on flat state buffers (checks.h: flat_offsets): two tensor lists per call.
template <bool kDecoupled>
void fused_adam_flat_cpu(const st::TensorList& params, const st::TensorList& grads, const st::Tensor& exp_avg,
                         const st::Tensor& exp_avg_sq, const std::optional<st::Tensor>& max_exp_avg_sq,
                         const st::Tensor& state_steps, double lr, double beta1, double beta2, double weight_decay,
                         double eps, bool amsgrad, bool maximize, const std::optional<st::Tensor>& grad_scale,
                         const std::optional<st::Tensor>& found_inf, const std::optional<st::Tensor>& grad_norm,
                         double max_grad_norm, const std::optional<st::TensorList>& masks) {
  const char* op = kDecoupled ? "fused_adamw_flat_" : "fused_adam_flat_";
  const auto offsets = flat_offsets(params);
  check_adam_flat_call(op, params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, state_steps, offsets, lr, beta1, beta2,
                       weight_decay, eps, amsgrad, grad_scale, found_inf, grad_norm, masks);
  const size_t n = params.size();
  std::vector<float*> steps(n);
  if (n > 0) {
    float* s0 = state_steps.mutable_data_ptr<float>();
    for (size_t i = 0; i < n; ++i) steps[i] = s0 + i;
  }
  adam_step<kDecoupled>(params, grads, bases_of(exp_avg, offsets, n), bases_of(exp_avg_sq, offsets, n),
                        amsgrad ? bases_of(*max_exp_avg_sq, offsets, n) : std::vector<char*>{}, steps, lr, beta1,
                        beta2, weight_decay, eps, amsgrad, maximize, grad_scale, found_inf, grad_norm, max_grad_norm,
                        masks);
}

void fused_sgd_cpu(const st::TensorList& params, const st::TensorList& grads, const st::TensorList& momentum_buffers, double lr,
                   double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                   bool is_first_step, const std::optional<st::Tensor>& grad_scale,
                   const std::optional<st::Tensor>& found_inf, const std::optional<st::Tensor>& grad_norm,
                   double max_grad_norm, const std::optional<st::TensorList>& masks) {
  const char* op = "fused_sgd_";
  check_sgd_call(op, params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, grad_scale,
                 found_inf, grad_norm, masks);
  if (params.empty()) return;
  const bool has_momentum = momentum != 0;
  if (skip_step(found_inf)) return;

  const auto g = contiguous_list(grads);
  const DType dt = dtype_of(params[0]);
  const SgdArgs a{float(lr), float(momentum), float(1.0 - dampening), float(weight_decay),
                  grad_multiplier(grad_scale, grad_norm, max_grad_norm), nesterov, maximize, is_first_step,
                  has_momentum};
  const Kernels& k = best_kernels();
  for_each_range(params, [&](size_t t, int64_t b, int64_t e) {
    k.sgd(dt, at_elem(params[t], b), at_elem(g[t], b), has_momentum ? at_elem(momentum_buffers[t], b) : nullptr,
          keep_at(masks, t, b), e - b, a);
  });
}

void apply_masks_cpu(const st::TensorList& tensors, const st::TensorList& masks) {
  const char* op = "apply_masks_";
  check_lists(op, tensors, nullptr, {}, nullptr);
  check_masks(op, tensors, masks);
  if (tensors.empty()) return;
  const bool wide = tensors[0].element_size() == 4;
  for_each_range(tensors, [&](size_t t, int64_t b, int64_t e) {
    const uint8_t* keep = keep_at(masks, t, b);
    if (wide) zero_pruned<uint32_t>(at_elem(tensors[t], b), keep, e - b);
    else zero_pruned<uint16_t>(at_elem(tensors[t], b), keep, e - b);
  });
}

st::Tensor sum_of_squares_cpu(const st::TensorList& tensors) {
  BK_CHECK(!tensors.empty(), "sum_of_squares: tensors must not be empty");
  check_lists("sum_of_squares", tensors, nullptr, {}, nullptr, /*params_contiguous=*/false);
  const auto x = contiguous_list(tensors);
  const DType dt = dtype_of(x[0]);
  const Kernels& k = best_kernels();
  // Fixed-size pieces summed in a fixed order: the result does not depend on the thread count.
  std::vector<int64_t> offsets(x.size() + 1, 0);
  for (size_t i = 0; i < x.size(); ++i) offsets[i + 1] = offsets[i] + x[i].numel();
  const int64_t pieces = (offsets.back() + kGrain - 1) / kGrain;
  std::vector<double> partial(std::max<int64_t>(pieces, 1), 0.0);
  st::parallel_for(0, pieces, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t piece = pb; piece < pe; ++piece) {
      const int64_t begin = piece * kGrain, end = std::min(begin + kGrain, offsets.back());
      size_t t = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
      double s = 0.0;
      for (int64_t pos = begin; pos < end; ++t) {
        const int64_t stop = std::min(end, offsets[t + 1]);
        if (stop > pos) s += k.sum_of_squares(dt, at_elem(x[t], pos - offsets[t]), stop - pos);
        pos = std::max(pos, stop);
      }
      partial[piece] = s;
    }
  });
  double total = 0.0;
  for (double s : partial) total += s;
  return st::scalar_tensor(total, st::TensorOptions().dtype(st::kFloat).device(x[0].device()));
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(bigkernels, CPU, m) {
  m.impl("fused_adam_", TORCH_BOX(&fused_adam_cpu<false>));
  m.impl("fused_adamw_", TORCH_BOX(&fused_adam_cpu<true>));
  m.impl("fused_adam_flat_", TORCH_BOX(&fused_adam_flat_cpu<false>));
  m.impl("fused_adamw_flat_", TORCH_BOX(&fused_adam_flat_cpu<true>));
  m.impl("fused_sgd_", TORCH_BOX(&fused_sgd_cpu));
  m.impl("sum_of_squares", TORCH_BOX(&sum_of_squares_cpu));
  m.impl("apply_masks_", TORCH_BOX(&apply_masks_cpu));
}

}  // namespace bigkernels::optim::cpu
