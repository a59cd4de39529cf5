// CPU binding of fused_rmsprop_, fused_lion_ and fused_adafactor_: validates (before anything is
// modified), picks the instruction set at run time, and splits the work across threads.
// RMSprop and Lion: one flat parallel range over every element of every tensor. Adafactor: per
// param, three passes (row / column statistics and the param's RMS; the update's RMS; the update),
// each split over runs of rows of about kGrain elements, for the params that are big (see
// fused_adafactor_cpu); the others are handed whole to one thread each (one parallel loop over
// them, no per-pass barriers).
#include "common/stable.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/cpu_vec.h"
#include "optim/checks.h"
#include "optim/optim_cpu_binding.h"
#include "optim/optim_more_cpu.h"

namespace bigkernels::optim::cpu {

const MoreKernels& best_more_kernels() {
  const char* isa = best_kernels().isa;  // one rule for the ISA level (optim_cpu.cpp)
  if (std::strcmp(isa, "avx512_bf16") == 0) return more_avx512_bf16_kernels();
  if (std::strcmp(isa, "avx512") == 0) return more_avx512_kernels();
  if (std::strcmp(isa, "avx2") == 0) return more_avx2_kernels();
  return more_scalar_kernels();
}

namespace {
using namespace binding;

constexpr int64_t kParallelMin = 1 << 17;  // Adafactor params under this never get parallel passes

// ------------------------------------------------------------------------------------ RMSprop
void fused_rmsprop_cpu(const st::TensorList& params, const st::TensorList& grads, const st::TensorList& square_avgs,
                       const st::TensorList& grad_avgs, const st::TensorList& momentum_buffers, const st::TensorList& state_steps,
                       double lr, double alpha, double eps, double weight_decay, double momentum, bool centered,
                       bool maximize, const std::optional<st::Tensor>& grad_scale,
                       const std::optional<st::Tensor>& found_inf, const std::optional<st::Tensor>& grad_norm,
                       double max_grad_norm, const std::optional<st::TensorList>& masks) {
  const char* op = "fused_rmsprop_";
  check_hyper(op, lr >= 0, "learning rate", lr);
  check_hyper(op, eps >= 0, "epsilon value", eps);
  check_hyper(op, momentum >= 0, "momentum value", momentum);
  check_hyper(op, weight_decay >= 0, "weight_decay value", weight_decay);
  check_hyper(op, alpha >= 0, "alpha value", alpha);
  const bool has_momentum = momentum > 0;
  check_lists(op, params, &grads,
              {{{"square_avgs", square_avgs}, false}, {{"grad_avgs", grad_avgs}, !centered},
               {{"momentum_buffers", momentum_buffers}, !has_momentum}},
              &state_steps);
  check_masks(op, params, masks);
  const auto in = begin_step(op, params, grads, grad_scale, found_inf, grad_norm, max_grad_norm);
  if (!in) return;
  const auto& g = in->grads;
  const DType dt = in->dtype;
  const float mult = in->mult;
  const RmspropArgs a{float(lr), float(alpha), float(1.0 - alpha), float(eps), float(weight_decay), float(momentum),
                      maximize ? -mult : mult, centered, has_momentum};
  const MoreKernels& k = best_more_kernels();
  for_each_range(params, [&](size_t t, int64_t b, int64_t e) {
    k.rmsprop(dt, at_elem(params[t], b), at_elem(g[t], b), at_elem(square_avgs[t], b),
              centered ? at_elem(grad_avgs[t], b) : nullptr, has_momentum ? at_elem(momentum_buffers[t], b) : nullptr,
              keep_at(masks, t, b), e - b, a);
  });
  bump_steps(state_steps);
}

// ------------------------------------------------------------------------------------ Lion
void fused_lion_cpu(const st::TensorList& params, const st::TensorList& grads, const st::TensorList& exp_avgs, double lr, double beta1,
                    double beta2, double weight_decay, bool maximize, const std::optional<st::Tensor>& grad_scale,
                    const std::optional<st::Tensor>& found_inf, const std::optional<st::Tensor>& grad_norm,
                    double max_grad_norm, const std::optional<st::TensorList>& masks) {
  const char* op = "fused_lion_";
  check_hyper(op, lr >= 0, "learning rate", lr);
  check_hyper(op, 0 <= beta1 && beta1 <= 1, "beta parameter at index 0", beta1);
  check_hyper(op, 0 <= beta2 && beta2 <= 1, "beta parameter at index 1", beta2);
  check_hyper(op, weight_decay >= 0, "weight_decay value", weight_decay);
  check_lists(op, params, &grads, {{{"exp_avgs", exp_avgs}, false}}, nullptr);
  check_masks(op, params, masks);
  const auto in = begin_step(op, params, grads, grad_scale, found_inf, grad_norm, max_grad_norm);
  if (!in) return;
  const auto& g = in->grads;
  const DType dt = in->dtype;
  const float mult = in->mult;
  const LionArgs a{float(lr), float(beta1), float(1.0 - beta1), float(beta2), float(1.0 - beta2),
                   float(1.0 - lr * weight_decay), maximize ? -mult : mult};
  const MoreKernels& k = best_more_kernels();
  for_each_range(params, [&](size_t t, int64_t b, int64_t e) {
    k.lion(dt, at_elem(params[t], b), at_elem(g[t], b), at_elem(exp_avgs[t], b), keep_at(masks, t, b), e - b, a);
  });
}

// ------------------------------------------------------------------------------------ Adafactor
bool factored(const st::Tensor& p) { return p.dim() >= 2; }

void check_adafactor_call(const char* op, const st::TensorList& params, const st::TensorList& grads, const st::TensorList& row_vars,
                          const st::TensorList& col_vars, const st::TensorList& variances, const st::TensorList& state_steps, double lr,
                          double beta2_decay, double eps1, double eps2, double d, double weight_decay,
                          const std::optional<st::TensorList>& masks) {
  check_hyper(op, lr >= 0, "learning rate", lr);
  check_hyper(op, beta2_decay <= 0, "beta2_decay (must be <= 0)", beta2_decay);
  check_hyper(op, eps1 >= 0, "eps1", eps1);
  check_hyper(op, eps2 >= 0, "eps2", eps2);
  check_hyper(op, d >= 1, "clipping threshold d (must be >= 1)", d);
  check_hyper(op, weight_decay >= 0, "weight_decay value", weight_decay);
  check_lists(op, params, &grads, {}, &state_steps);
  check_masks(op, params, masks);
  if (params.empty()) return;
  const bool fact = factored(params[0]);
  const size_t n = params.size();
  for (size_t i = 0; i < n; ++i)
    BK_CHECK(factored(params[i]) == fact, op, ": params mixes >= 2-D (factored) and < 2-D params: params[0] is ",
                params[0].dim(), "-D, params[", i, "] is ", params[i].dim(), "-D (call once per kind)");
  const size_t want_fact = fact ? n : 0, want_vec = fact ? 0 : n;
  BK_CHECK(row_vars.size() == want_fact, op, ": expected ", want_fact, " row_vars, got ", row_vars.size());
  BK_CHECK(col_vars.size() == want_fact, op, ": expected ", want_fact, " col_vars, got ", col_vars.size());
  BK_CHECK(variances.size() == want_vec, op, ": expected ", want_vec, " variances, got ", variances.size());
  auto check_state = [&](const char* name, size_t i, const st::Tensor& t, st::IntArrayRef shape) {
    const st::Tensor& p = params[i];
    BK_CHECK(t.layout() == st::kStrided && t.is_contiguous(), op, ": ", name, "[", i,
                "] must be a dense contiguous tensor");
    BK_CHECK(t.device() == p.device() && t.scalar_type() == p.scalar_type(), op, ": expected ", name, "[", i,
                "] to be ", p.scalar_type(), " on ", p.device(), " like params, got ", t.scalar_type(), " on ",
                t.device());
    BK_CHECK(t.sizes().equals(shape), op, ": expected ", name, "[", i, "] of shape ", shape, " for params[", i,
                "] of shape ", p.sizes(), ", got ", t.sizes());
  };
  for (size_t i = 0; i < n; ++i) {
    const auto sizes = params[i].sizes().vec();
    if (fact) {
      std::vector<int64_t> row(sizes), col(sizes);
      row.back() = 1;
      col[col.size() - 2] = 1;
      check_state("row_vars", i, row_vars[i], row);
      check_state("col_vars", i, col_vars[i], col);
    } else {
      check_state("variances", i, variances[i], sizes);
    }
  }
}

double lerp_double(double start, double end, double w) {  // torch.lerp's formula
  return w < 0.5 ? start + w * (end - start) : end - (end - start) * (1.0 - w);
}

// Element i of a state tensor as double / stored from double (fp32, fp16 or bf16 storage).
double load_elem(const st::Tensor& t, int64_t i) {
  const void* base = t.data_ptr();
  switch (t.scalar_type()) {
    case st::kHalf: return Vec1::load(static_cast<const fp16_t*>(base) + i).x;
    case st::kBFloat16: return Vec1::load(static_cast<const bf16_t*>(base) + i).x;
    default: return static_cast<const float*>(base)[i];
  }
}
void store_elem(const st::Tensor& t, int64_t i, double v) {
  void* base = t.data_ptr();
  switch (t.scalar_type()) {
    case st::kHalf: return Vec1(float(v)).store(static_cast<fp16_t*>(base) + i);
    case st::kBFloat16: return Vec1(float(v)).store(static_cast<bf16_t*>(base) + i);
    default: static_cast<float*>(base)[i] = float(v);
  }
}

// fn(u) -- or fn(u, slot) -- for u in [0, units): in parallel or in this thread (slot 0). In
// parallel, slot s of get_num_threads() runs units [s * chunk, (s + 1) * chunk) (parallel_for's
// static split, but with the slot known: the stable ABI has no get_thread_num).
template <class Fn>
void run_units(int64_t units, bool parallel, const Fn& fn) {
  auto call = [&](int64_t u, int64_t slot) {
    if constexpr (std::is_invocable_v<const Fn&, int64_t, int64_t>) fn(u, slot);
    else fn(u);
  };
  if (!parallel) {
    for (int64_t u = 0; u < units; ++u) call(u, 0);
    return;
  }
  const int64_t slots = std::max<int64_t>(1, std::min<int64_t>(st::get_num_threads(), units));
  const int64_t chunk = (units + slots - 1) / slots;
  st::parallel_for(0, slots, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s)
      for (int64_t u = s * chunk; u < std::min(units, (s + 1) * chunk); ++u) call(u, s);
  });
}

struct AdafactorHyper {
  double lr, beta2_decay, eps1, eps2, d, weight_decay, mult;
  bool maximize;
};

// One param's Adafactor step (three passes for a factored param, two for a vector).
void adafactor_tensor(const MoreKernels& k, const st::Tensor& p, const st::Tensor& g, const st::Tensor* row_var,
                      const st::Tensor* col_var, const st::Tensor* variance, const st::Tensor& step_t,
                      const uint8_t* keep, const AdafactorHyper& h, bool parallel) {
  const int64_t n = p.numel();
  if (n == 0) return;
  const DType dt = dtype_of(p);
  const double step = double(step_t.mutable_data_ptr<float>()[0]) + 1.0;
  const double w = std::pow(step, h.beta2_decay);  // 1 - beta2_t
  const double rho = std::min(h.lr, 1.0 / std::sqrt(step));
  AdafactorArgs a{};
  a.grad_mult = float(h.mult);
  a.apply_mult = float(h.maximize ? -h.mult : h.mult);
  a.lerp_w = float(w);
  a.lerp_one_minus_w = float(1.0 - w);
  a.lerp_small = w < 0.5;
  a.eps1_sq = float(h.eps1 * h.eps1);
  a.inv_eps1 = float(1.0 / h.eps1);
  a.decay = float(1.0 - h.lr * h.weight_decay);
  auto finish = [&](double sum_p2, double sum_u2) {  // alpha / max(1, RMS(U) / d)
    const double alpha = std::max(h.eps2, std::sqrt(sum_p2 / double(n))) * rho;
    a.step = float(alpha / std::max(1.0, std::sqrt(sum_u2 / double(n)) / h.d));
  };
  char* pp = static_cast<char*>(p.data_ptr());
  const char* gp = static_cast<const char*>(g.data_ptr());
  const int64_t es = p.element_size();

  if (variance == nullptr) {  // factored over the last two dims; B matrices of R x C
    const int64_t C = p.size(-1), R = p.size(-2), B = n / (R * C);
    const int64_t rows_per_unit = std::max<int64_t>(1, std::min<int64_t>(R, kGrain / C));
    const int64_t per_slice = (R + rows_per_unit - 1) / rows_per_unit, units = B * per_slice;
    const int64_t threads = parallel ? st::get_num_threads() : 1;
    std::vector<double> row_sums(B * R), partial(units);
    std::vector<float> col_part(threads * B * C, 0.0f);  // per thread: sum of g^2 per column
    auto rows_of = [&](int64_t u, int64_t& b, int64_t& r0, int64_t& r1) {
      b = u / per_slice;
      r0 = (u % per_slice) * rows_per_unit;
      r1 = std::min(R, r0 + rows_per_unit);
    };
    run_units(units, parallel, [&](int64_t u, int64_t tid) {
      int64_t b, r0, r1;
      rows_of(u, b, r0, r1);
      const int64_t off = (b * R + r0) * C * es;
      partial[u] = k.adafactor_stats(dt, gp + off, pp + off, &row_sums[b * R + r0], &col_part[(tid * B + b) * C],
                                     r1 - r0, C, a);
    });
    double sum_p2 = 0.0;
    for (double s : partial) sum_p2 += s;
    // New factors (torch.lerp in double), stored; the scales are 1/sqrt of each factor (rows divided
    // by their mean over the matrix's rows, clamped to eps1).
    std::vector<float> row_scale(B * R), col_scale(B * C);
    for (int64_t b = 0; b < B; ++b) {
      double mean = 0.0;
      for (int64_t r = 0; r < R; ++r) {
        const int64_t i = b * R + r;
        const double v = lerp_double(load_elem(*row_var, i), row_sums[i] / double(C), w);
        store_elem(*row_var, i, v);
        row_sums[i] = v;
        mean += v;
      }
      mean = std::max(mean / double(R), h.eps1);
      for (int64_t r = 0; r < R; ++r) row_scale[b * R + r] = float(1.0 / std::sqrt(row_sums[b * R + r] / mean));
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = b * C + c;
        double s = 0.0;
        for (int64_t t = 0; t < threads; ++t) s += col_part[t * B * C + i];
        const double v = lerp_double(load_elem(*col_var, i), s / double(R), w);
        store_elem(*col_var, i, v);
        col_scale[i] = float(1.0 / std::sqrt(v));
      }
    }
    run_units(units, parallel, [&](int64_t u) {
      int64_t b, r0, r1;
      rows_of(u, b, r0, r1);
      const int64_t off = (b * R + r0) * C;
      partial[u] = k.adafactor_update_sq(dt, gp + off * es, &row_scale[b * R + r0], &col_scale[b * C], r1 - r0, C, a);
    });
    double sum_u2 = 0.0;
    for (double s : partial) sum_u2 += s;
    finish(sum_p2, sum_u2);
    run_units(units, parallel, [&](int64_t u) {
      int64_t b, r0, r1;
      rows_of(u, b, r0, r1);
      const int64_t off = (b * R + r0) * C;
      k.adafactor_apply(dt, pp + off * es, gp + off * es, &row_scale[b * R + r0], &col_scale[b * C],
                        keep != nullptr ? keep + off : nullptr, r1 - r0, C, a);
    });
    return;
  }
  // A vector (or a 0-d param): one variance per element.
  char* vp = static_cast<char*>(variance->data_ptr());
  const int64_t units = (n + kGrain - 1) / kGrain;
  std::vector<double> sums(2 * units, 0.0);
  run_units(units, parallel, [&](int64_t u) {
    const int64_t b = u * kGrain, len = std::min(n, b + kGrain) - b;
    k.adafactor_vec_stats(dt, gp + b * es, vp + b * es, pp + b * es, len, a, &sums[2 * u]);
  });
  double sum_p2 = 0.0, sum_u2 = 0.0;
  for (int64_t u = 0; u < units; ++u) sum_p2 += sums[2 * u], sum_u2 += sums[2 * u + 1];
  finish(sum_p2, sum_u2);
  run_units(units, parallel, [&](int64_t u) {
    const int64_t b = u * kGrain, len = std::min(n, b + kGrain) - b;
    k.adafactor_vec_apply(dt, pp + b * es, gp + b * es, vp + b * es, keep != nullptr ? keep + b : nullptr, len, a);
  });
}

void fused_adafactor_cpu(const st::TensorList& params, const st::TensorList& grads, const st::TensorList& row_vars,
                         const st::TensorList& col_vars, const st::TensorList& variances, const st::TensorList& state_steps, double lr,
                         double beta2_decay, double eps1, double eps2, double d, double weight_decay, bool maximize,
                         const std::optional<st::Tensor>& grad_scale, const std::optional<st::Tensor>& found_inf,
                         const std::optional<st::Tensor>& grad_norm, double max_grad_norm,
                         const std::optional<st::TensorList>& masks) {
  const char* op = "fused_adafactor_";
  check_adafactor_call(op, params, grads, row_vars, col_vars, variances, state_steps, lr, beta2_decay, eps1, eps2, d,
                       weight_decay, masks);
  const auto in = begin_step(op, params, grads, grad_scale, found_inf, grad_norm, max_grad_norm);
  if (!in) return;
  const auto& g = in->grads;
  const bool fact = factored(params[0]);
  const AdafactorHyper h{lr, beta2_decay, eps1, eps2, d, weight_decay, in->mult, maximize};
  const MoreKernels& k = best_more_kernels();
  auto one = [&](size_t i, bool parallel) {
    adafactor_tensor(k, params[i], g[i], fact ? &row_vars[i] : nullptr, fact ? &col_vars[i] : nullptr,
                     fact ? nullptr : &variances[i], state_steps[i], mask_bytes(masks, i), h, parallel);
  };
  // A param gets parallel passes when it is big and more than 1/(2 x threads) of the step's
  // elements; the others are stepped whole, one thread each (no barrier between their passes, and
  // a param's second and third reads of its gradient come from cache when it fits there).
  int64_t total = 0;
  for (const auto& p : params) total += p.numel();
  const int64_t big = std::max<int64_t>(kParallelMin, total / (2 * st::get_num_threads()));
  std::vector<int64_t> small;
  int64_t small_elems = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].numel() >= big) {
      one(i, true);
    } else {
      small.push_back(int64_t(i));
      small_elems += params[i].numel();
    }
  }
  // Small params whole, one thread each (all in this thread when they are few elements in all).
  const int64_t count = int64_t(small.size());
  st::parallel_for(0, count, small_elems < kGrain ? std::max<int64_t>(count, 1) : 1, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) one(size_t(small[j]), false);
  });
  bump_steps(state_steps);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(bigkernels, CPU, m) {
  m.impl("fused_rmsprop_", TORCH_BOX(&fused_rmsprop_cpu));
  m.impl("fused_lion_", TORCH_BOX(&fused_lion_cpu));
  m.impl("fused_adafactor_", TORCH_BOX(&fused_adafactor_cpu));
}

}  // namespace bigkernels::optim::cpu
