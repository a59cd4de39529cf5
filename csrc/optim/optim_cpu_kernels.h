// The CPU optimizer maths, written once over a lane type V (Vec1 scalar, Vec8 AVX2, Vec16
// AVX-512) and a storage type T (float, fp16_t, bf16_t). Included by optim_cpu_{scalar,avx2,
// avx512,avx512bf16}.cpp, each of which instantiates it for its own instruction set.
#pragma once

#include <cstring>

#include "common/cpu_vec.h"
#include "optim/optim_cpu.h"

namespace {
using bigkernels::optim::cpu::AdamArgs;
using bigkernels::optim::cpu::DType;
using bigkernels::optim::cpu::SgdArgs;

// Adam's per-tensor constants broadcast to lanes once per range, not once per vector.
template <class V>
struct AdamConsts {
  V mult, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, wd, inv_bc2_sqrt, eps, step_size;
  explicit AdamConsts(const AdamArgs& a)
      : mult(a.maximize ? -a.grad_mult : a.grad_mult), beta1(a.beta1), one_minus_beta1(a.one_minus_beta1),
        beta2(a.beta2), one_minus_beta2(a.one_minus_beta2), decay(a.decay), wd(a.weight_decay),
        inv_bc2_sqrt(1.0f / a.bc2_sqrt), eps(a.eps), step_size(a.step_size) {}
};

// Adam / AdamW on lanes [i, i + V::W): torch.optim's fused formula with its two divisions
// replaced by a multiplication by 1/sqrt(bc2) and a refined reciprocal (within 2 ulp). In cache,
// divisions and square roots bound the step (AVX2: with them it ran at torch's speed); with
// AVX-512 and the reciprocal, 50M fp32 params on 2 cores run at the DRAM's streaming speed.
template <class V, bool kWeightDecay, bool kDecoupled, bool kAmsgrad, class T>
inline void adam_lanes(T* p, const T* g, T* m, T* v, T* vmax_, const uint8_t* keep, int64_t i,
                       const AdamConsts<V>& c) {
  V grad = V::load(g + i) * c.mult;
  V param = V::load(p + i);
  if constexpr (kWeightDecay) {
    if constexpr (kDecoupled) param = param * c.decay;
    else grad = grad + c.wd * param;
  }
  const V m_old = V::load(m + i);
  const V exp_avg = m_old + c.one_minus_beta1 * (grad - m_old);  // torch's lerp_(grad, 1 - beta1)
  const V exp_avg_sq = V::load(v + i) * c.beta2 + c.one_minus_beta2 * grad * grad;
  V second = exp_avg_sq;
  if constexpr (kAmsgrad) {
    second = vmax(V::load(vmax_ + i), exp_avg_sq);
    second.store(vmax_ + i);
  }
  const V denom = vsqrt(second) * c.inv_bc2_sqrt + c.eps;
  param = param - c.step_size * exp_avg * vrcp(denom);
  if (keep != nullptr) param = keep_or_zero(param, keep + i);  // same branch for the whole range
  param.store(p + i);
  exp_avg.store(m + i);
  exp_avg_sq.store(v + i);
}

template <class V, bool kWeightDecay, bool kDecoupled, bool kAmsgrad, class T>
void adam_range_impl(T* p, const T* g, T* m, T* v, T* vm, const uint8_t* keep, int64_t n, const AdamArgs& a) {
  const AdamConsts<V> c(a);
  int64_t i = 0;
  for (; i + V::W <= n; i += V::W) adam_lanes<V, kWeightDecay, kDecoupled, kAmsgrad>(p, g, m, v, vm, keep, i, c);
  if (i == n) return;
  const int64_t r = n - i;
  Staged<T, V::W> sp(p + i, r), sg(g + i, r), sm(m + i, r), sv(v + i, r), svm(kAmsgrad ? vm + i : nullptr, r);
  Staged<uint8_t, V::W> sk(keep != nullptr ? keep + i : nullptr, r);
  adam_lanes<V, kWeightDecay, kDecoupled, kAmsgrad>(sp.x, sg.x, sm.x, sv.x, svm.x, keep != nullptr ? sk.x : nullptr,
                                                     0, c);
  sp.back(p + i, r);
  sm.back(m + i, r);
  sv.back(v + i, r);
  if constexpr (kAmsgrad) svm.back(vm + i, r);
}

// The mode flags become template arguments so the inner loop has no branches.
template <class V, class T>
void adam_range(T* p, const T* g, T* m, T* v, T* vm, const uint8_t* k, int64_t n, const AdamArgs& a) {
  const bool wd = a.weight_decay != 0.0f;
  if (a.amsgrad) {
    if (!wd) return adam_range_impl<V, false, false, true>(p, g, m, v, vm, k, n, a);
    if (a.decoupled) return adam_range_impl<V, true, true, true>(p, g, m, v, vm, k, n, a);
    return adam_range_impl<V, true, false, true>(p, g, m, v, vm, k, n, a);
  }
  if (!wd) return adam_range_impl<V, false, false, false>(p, g, m, v, vm, k, n, a);
  if (a.decoupled) return adam_range_impl<V, true, true, false>(p, g, m, v, vm, k, n, a);
  return adam_range_impl<V, true, false, false>(p, g, m, v, vm, k, n, a);
}

template <class V, class T>
inline void sgd_lanes(T* p, const T* g, T* buf, const uint8_t* keep, int64_t i, const SgdArgs& a) {
  V grad = V::load(g + i) * V(a.grad_mult);
  if (a.maximize) grad = -grad;
  const V param = V::load(p + i);
  if (a.weight_decay != 0.0f) grad = grad + V(a.weight_decay) * param;
  if (a.has_momentum) {
    const V b = a.first_step ? grad : V::load(buf + i) * V(a.momentum) + V(a.one_minus_dampening) * grad;
    b.store(buf + i);
    grad = a.nesterov ? grad + V(a.momentum) * b : b;
  }
  V updated = param - V(a.lr) * grad;
  if (keep != nullptr) updated = keep_or_zero(updated, keep + i);
  updated.store(p + i);
}

// Full vectors with V, the tail through the same lanes (Staged).
template <class V, class T>
void sgd_range(T* p, const T* g, T* buf, const uint8_t* keep, int64_t n, const SgdArgs& a) {
  int64_t i = 0;
  for (; i + V::W <= n; i += V::W) sgd_lanes<V>(p, g, buf, keep, i, a);
  if (i == n) return;
  const int64_t r = n - i;
  Staged<T, V::W> sp(p + i, r), sg(g + i, r), sb(a.has_momentum ? buf + i : nullptr, r);
  Staged<uint8_t, V::W> sk(keep != nullptr ? keep + i : nullptr, r);
  sgd_lanes<V>(sp.x, sg.x, sb.x, keep != nullptr ? sk.x : nullptr, 0, a);
  sp.back(p + i, r);
  if (a.has_momentum) sb.back(buf + i, r);
}

// fp32 lane sums over blocks of 64 vectors, flushed to fp64 (keeps the relative error < 1e-5).
template <class V, class T>
double sum_of_squares_range(const T* x, int64_t n) {
  double total = 0.0;
  int64_t i = 0;
  constexpr int64_t kBlock = 64 * V::W;
  while (i + V::W <= n) {
    V acc(0.0f);
    const int64_t end = (n - i >= kBlock) ? i + kBlock : n - (n - i) % V::W;
    for (; i < end; i += V::W) {
      const V t = V::load(x + i);
      acc = acc + t * t;
    }
    total += acc.sum_lanes();
  }
  for (; i < n; ++i) {
    const double t = Vec1::load(x + i).x;
    total += t * t;
  }
  return total;
}

// Storage-type dispatch, instantiated once per lane type.
template <class V>
void adam_any(DType dt, void* p, const void* g, void* m, void* v, void* vm, const uint8_t* k, int64_t n,
              const AdamArgs& a) {
  switch (dt) {
    case DType::f32: return adam_range<V>((float*)p, (const float*)g, (float*)m, (float*)v, (float*)vm, k, n, a);
    case DType::f16:
      return adam_range<V>((fp16_t*)p, (const fp16_t*)g, (fp16_t*)m, (fp16_t*)v, (fp16_t*)vm, k, n, a);
    case DType::bf16:
      return adam_range<V>((bf16_t*)p, (const bf16_t*)g, (bf16_t*)m, (bf16_t*)v, (bf16_t*)vm, k, n, a);
  }
}

template <class V>
void sgd_any(DType dt, void* p, const void* g, void* buf, const uint8_t* k, int64_t n, const SgdArgs& a) {
  switch (dt) {
    case DType::f32: return sgd_range<V>((float*)p, (const float*)g, (float*)buf, k, n, a);
    case DType::f16: return sgd_range<V>((fp16_t*)p, (const fp16_t*)g, (fp16_t*)buf, k, n, a);
    case DType::bf16: return sgd_range<V>((bf16_t*)p, (const bf16_t*)g, (bf16_t*)buf, k, n, a);
  }
}

template <class V>
double sum_of_squares_any(DType dt, const void* x, int64_t n) {
  switch (dt) {
    case DType::f32: return sum_of_squares_range<V>((const float*)x, n);
    case DType::f16: return sum_of_squares_range<V>((const fp16_t*)x, n);
    case DType::bf16: return sum_of_squares_range<V>((const bf16_t*)x, n);
  }
  return 0.0;
}

}  // namespace
