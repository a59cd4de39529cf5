// CPU binding of bigkernels::adamw8bit_: validates, picks the instruction set at run time and
// splits the quantisation blocks of all tensors (one flat range of blocks) across threads.
#include "common/stable.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "optim/adamw8bit_cpu.h"
#include "optim/checks.h"
#include "optim/optim_cpu_binding.h"

namespace bigkernels::optim::cpu8 {

const Kernels& best_kernels() {
  const char* isa = cpu::best_kernels().isa;  // one rule for the ISA level (optim_cpu.cpp)
  if (std::strncmp(isa, "avx512", 6) == 0) return avx512_kernels();
  if (std::strcmp(isa, "avx2") == 0) return avx2_kernels();
  return scalar_kernels();
}

namespace {

using cpu::binding::kGrain;

// Codes: contiguous uint8 shaped like the params; scales: contiguous fp32 of ceil(numel / block).
void check_quantised_state(const char* op, const st::TensorList& params, const st::TensorList& codes, const char* codes_name,
                           const st::TensorList& scales, const char* scales_name, int64_t block) {
  BK_CHECK(codes.size() == params.size(), op, ": expected ", params.size(), " ", codes_name, ", got ",
              codes.size());
  BK_CHECK(scales.size() == params.size(), op, ": expected ", params.size(), " ", scales_name, ", got ",
              scales.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const st::Tensor& p = params[i];
    const st::Tensor& c = codes[i];
    const st::Tensor& s = scales[i];
    BK_CHECK(c.scalar_type() == st::kByte && c.sizes().equals(p.sizes()) && c.device() == p.device() &&
                    c.layout() == st::kStrided && c.is_contiguous(),
                op, ": expected ", codes_name, "[", i, "] to be a contiguous uint8 tensor of shape ", p.sizes(), " on ",
                p.device(), ", got ", c.scalar_type(), " of shape ", c.sizes(), " on ", c.device());
    const int64_t blocks = (p.numel() + block - 1) / block;
    BK_CHECK(s.scalar_type() == st::kFloat && s.dim() == 1 && s.numel() == blocks && s.device() == p.device() &&
                    s.layout() == st::kStrided && s.is_contiguous(),
                op, ": expected ", scales_name, "[", i, "] to be a contiguous float32 tensor of shape [", blocks,
                "] on ", p.device(), " (one scale per ", block, " elements), got ", s.scalar_type(), " of shape ",
                s.sizes(), " on ", s.device());
  }
}

void adamw8bit_cpu(const st::TensorList& params, const st::TensorList& grads, const st::TensorList& exp_avgs, const st::TensorList& exp_avg_sqs,
                   const st::TensorList& exp_avg_scales, const st::TensorList& exp_avg_sq_scales, const st::TensorList& state_steps,
                   double lr, double beta1, double beta2, double weight_decay, double eps, bool maximize,
                   int64_t block_size, const std::optional<st::Tensor>& grad_scale,
                   const std::optional<st::Tensor>& found_inf, const std::optional<st::Tensor>& grad_norm,
                   double max_grad_norm, const std::optional<st::TensorList>& masks) {
  const char* op = "adamw8bit_";
  check_hyper(op, lr >= 0, "learning rate", lr);
  check_hyper(op, eps >= 0, "epsilon value", eps);
  check_hyper(op, 0 <= beta1 && beta1 < 1, "beta parameter at index 0", beta1);
  check_hyper(op, 0 <= beta2 && beta2 < 1, "beta parameter at index 1", beta2);
  check_hyper(op, weight_decay >= 0, "weight_decay value", weight_decay);
  BK_CHECK(block_size >= kMinBlock && block_size <= kMaxBlock && (block_size & (block_size - 1)) == 0, op,
              ": block_size must be a power of two from ", kMinBlock, " to ", kMaxBlock, ", got ", block_size);
  check_lists(op, params, &grads, {}, &state_steps);
  check_quantised_state(op, params, exp_avgs, "exp_avgs", exp_avg_scales, "exp_avg_scales", block_size);
  check_quantised_state(op, params, exp_avg_sqs, "exp_avg_sqs", exp_avg_sq_scales, "exp_avg_sq_scales", block_size);
  check_masks(op, params, masks);
  const auto in = cpu::binding::begin_step(op, params, grads, grad_scale, found_inf, grad_norm, max_grad_norm);
  if (!in) return;
  const auto& g = in->grads;
  const DType dt = in->dtype;
  const float mult = in->mult;
  std::vector<Adam8Args> args(params.size());
  std::vector<int64_t> offsets(params.size() + 1, 0);  // first block of each tensor
  for (size_t i = 0; i < params.size(); ++i) {
    const double step = double(state_steps[i].mutable_data_ptr<float>()[0]) + 1.0;
    args[i] = Adam8Args{float(beta1), float(1.0 - beta1), float(beta2), float(1.0 - beta2), float(eps),
                        float(1.0 - lr * weight_decay), maximize ? -mult : mult,
                        float(lr / (1.0 - std::pow(beta1, step))),
                        float(1.0 / std::sqrt(1.0 - std::pow(beta2, step))), weight_decay != 0.0};
    offsets[i + 1] = offsets[i] + (params[i].numel() + block_size - 1) / block_size;
  }
  const Kernels& k = best_kernels();
  const int64_t grain = std::max<int64_t>(1, kGrain / block_size);
  st::parallel_for(0, offsets.back(), grain, [&](int64_t begin, int64_t end) {
    size_t t = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    for (int64_t b = begin; b < end; ++t) {
      const int64_t stop = std::min(end, offsets[t + 1]);
      if (stop > b) {
        const int64_t first = (b - offsets[t]) * block_size;
        const int64_t n = std::min(params[t].numel(), (stop - offsets[t]) * block_size) - first;
        const uint8_t* keep = mask_bytes(masks, t);
        k.step(dt, static_cast<char*>(params[t].data_ptr()) + first * params[t].element_size(),
               static_cast<const char*>(g[t].data_ptr()) + first * g[t].element_size(),
               exp_avgs[t].mutable_data_ptr<uint8_t>() + first, exp_avg_sqs[t].mutable_data_ptr<uint8_t>() + first,
               exp_avg_scales[t].mutable_data_ptr<float>() + (b - offsets[t]),
               exp_avg_sq_scales[t].mutable_data_ptr<float>() + (b - offsets[t]), keep != nullptr ? keep + first : nullptr,
               n, block_size, args[t]);
      }
      b = std::max(b, stop);
    }
  });
  cpu::binding::bump_steps(state_steps);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(bigkernels, CPU, m) { m.impl("adamw8bit_", TORCH_BOX(&adamw8bit_cpu)); }

}  // namespace bigkernels::optim::cpu8
