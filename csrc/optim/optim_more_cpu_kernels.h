// The CPU maths of fused_rmsprop_, fused_lion_ and fused_adafactor_, written once over a lane type
// V (Vec1 scalar, Vec8 AVX2, Vec16 AVX-512) and a storage type T (float, fp16_t, bf16_t), as
// optim_cpu_kernels.h does for Adam and SGD. Included by optim_more_cpu_{scalar,avx2,avx512,
// avx512bf16}.cpp, each instantiating it for its own instruction set. Divisions and reciprocal
// square roots go through vrcp (a refined reciprocal, within 2 ulp), as Adam's kernel does.
#pragma once

#include "common/cpu_vec.h"
#include "optim/optim_more_cpu.h"

namespace {
using bigkernels::optim::cpu::AdafactorArgs;
using bigkernels::optim::cpu::DType;
using bigkernels::optim::cpu::LionArgs;
using bigkernels::optim::cpu::RmspropArgs;

template <class V>
inline V vmin_lanes(V a, V b) { return -vmax(-a, -b); }  // NaN propagates, as vmax

// sign(x) in {-1, 0, +1} (+-0 stays +-0, NaN stays NaN): |x| >= 2^-149 times 2^254 is >= 1 (or
// inf), then clamped to [-1, 1].
template <class V>
inline V sign_lanes(V x) {
  const V big(0x1p127f);
  return vmin_lanes(vmax(x * big * big, V(-1.0f)), V(1.0f));
}

// torch.lerp(start, end, w): start + w (end - start) for w < 0.5, else end - (end - start)(1 - w).
template <class V>
inline V lerp_lanes(V start, V end, bool small, V w, V one_minus_w) {
  return small ? start + w * (end - start) : end - (end - start) * one_minus_w;
}

// Sum of squares in fp32 lanes, flushed to fp64 every 64 vectors (relative error < 1e-6).
template <class V>
struct SquareSum {
  double total = 0.0;
  V acc = V(0.0f);
  int count = 0;
  void add(V x) {
    acc = acc + x * x;
    if (++count == 64) flush();
  }
  void flush() {
    total += acc.sum_lanes();
    acc = V(0.0f);
    count = 0;
  }
  double result() {
    flush();
    return total;
  }
};

// ------------------------------------------------------------------------------ RMSprop
template <class V, bool kWd, bool kCentered, bool kMomentum, class T>
inline void rmsprop_lanes(T* p, const T* g, T* sq, T* ga, T* buf, const uint8_t* keep, int64_t i,
                          const RmspropArgs& a) {
  V grad = V::load(g + i) * V(a.grad_mult);
  V param = V::load(p + i);
  if constexpr (kWd) grad = grad + V(a.weight_decay) * param;
  const V square_avg = V::load(sq + i) * V(a.alpha) + V(a.one_minus_alpha) * grad * grad;
  square_avg.store(sq + i);
  V avg;
  if constexpr (kCentered) {
    const V grad_avg = lerp_lanes(V::load(ga + i), grad, a.one_minus_alpha < 0.5f, V(a.one_minus_alpha), V(a.alpha));
    grad_avg.store(ga + i);
    avg = vsqrt(square_avg - grad_avg * grad_avg) + V(a.eps);
  } else {
    avg = vsqrt(square_avg) + V(a.eps);
  }
  if constexpr (kMomentum) {
    const V b = V::load(buf + i) * V(a.momentum) + grad * vrcp(avg);
    b.store(buf + i);
    param = param - V(a.lr) * b;
  } else {
    param = param - V(a.lr) * (grad * vrcp(avg));
  }
  if (keep != nullptr) param = keep_or_zero(param, keep + i);
  param.store(p + i);
}

template <class V, bool kWd, bool kCentered, bool kMomentum, class T>
void rmsprop_range_impl(T* p, const T* g, T* sq, T* ga, T* buf, const uint8_t* keep, int64_t n, const RmspropArgs& a) {
  int64_t i = 0;
  for (; i + V::W <= n; i += V::W) rmsprop_lanes<V, kWd, kCentered, kMomentum>(p, g, sq, ga, buf, keep, i, a);
  if (i == n) return;
  // The tail through the same lanes as the body (Staged, common/cpu_vec.h): an element's update must
  // not depend on where it sits (shards, thread ranges); Vec1's exact division would round differently.
  const int64_t r = n - i;
  Staged<T, V::W> sp(p + i, r), sg(g + i, r), ssq(sq + i, r), sga(kCentered ? ga + i : nullptr, r),
      sbuf(kMomentum ? buf + i : nullptr, r);
  Staged<uint8_t, V::W> sk(keep != nullptr ? keep + i : nullptr, r);
  rmsprop_lanes<V, kWd, kCentered, kMomentum>(sp.x, sg.x, ssq.x, sga.x, sbuf.x, keep != nullptr ? sk.x : nullptr, 0,
                                              a);
  sp.back(p + i, r);
  ssq.back(sq + i, r);
  if constexpr (kCentered) sga.back(ga + i, r);
  if constexpr (kMomentum) sbuf.back(buf + i, r);
}

template <class V, class T>
void rmsprop_range(T* p, const T* g, T* sq, T* ga, T* buf, const uint8_t* k, int64_t n, const RmspropArgs& a) {
  const int mode = (a.weight_decay != 0.0f ? 4 : 0) | (a.centered ? 2 : 0) | (a.has_momentum ? 1 : 0);
  switch (mode) {
    case 0: return rmsprop_range_impl<V, false, false, false>(p, g, sq, ga, buf, k, n, a);
    case 1: return rmsprop_range_impl<V, false, false, true>(p, g, sq, ga, buf, k, n, a);
    case 2: return rmsprop_range_impl<V, false, true, false>(p, g, sq, ga, buf, k, n, a);
    case 3: return rmsprop_range_impl<V, false, true, true>(p, g, sq, ga, buf, k, n, a);
    case 4: return rmsprop_range_impl<V, true, false, false>(p, g, sq, ga, buf, k, n, a);
    case 5: return rmsprop_range_impl<V, true, false, true>(p, g, sq, ga, buf, k, n, a);
    case 6: return rmsprop_range_impl<V, true, true, false>(p, g, sq, ga, buf, k, n, a);
    default: return rmsprop_range_impl<V, true, true, true>(p, g, sq, ga, buf, k, n, a);
  }
}

// ------------------------------------------------------------------------------ Lion
template <class V, class T>
inline void lion_lanes(T* p, const T* g, T* m, const uint8_t* keep, int64_t i, const LionArgs& a) {
  const V grad = V::load(g + i) * V(a.grad_mult);
  const V exp_avg = V::load(m + i);
  const V c = exp_avg * V(a.beta1) + V(a.one_minus_beta1) * grad;
  V param = V::load(p + i) * V(a.decay) - V(a.lr) * sign_lanes(c);
  if (keep != nullptr) param = keep_or_zero(param, keep + i);
  param.store(p + i);
  (exp_avg * V(a.beta2) + V(a.one_minus_beta2) * grad).store(m + i);
}

template <class V, class T>
void lion_range(T* p, const T* g, T* m, const uint8_t* keep, int64_t n, const LionArgs& a) {
  int64_t i = 0;
  for (; i + V::W <= n; i += V::W) lion_lanes<V>(p, g, m, keep, i, a);
  if (i == n) return;
  const int64_t r = n - i;  // the tail through the body's lanes, as RMSprop's
  Staged<T, V::W> sp(p + i, r), sg(g + i, r), sm(m + i, r);
  Staged<uint8_t, V::W> sk(keep != nullptr ? keep + i : nullptr, r);
  lion_lanes<V>(sp.x, sg.x, sm.x, keep != nullptr ? sk.x : nullptr, 0, a);
  sp.back(p + i, r);
  sm.back(m + i, r);
}

// ------------------------------------------------------------------------------ Adafactor, factored
template <class V, class T>
double adafactor_stats_rows(const T* g, const T* p, double* row_sums, float* col_sums, int64_t rows, int64_t cols,
                            const AdafactorArgs& a) {
  const V mult(a.grad_mult);
  const Vec1 mult1(a.grad_mult);
  SquareSum<V> psum;
  SquareSum<Vec1> psum1;
  for (int64_t r = 0; r < rows; ++r) {
    const T* gr = g + r * cols;
    const T* pr = p + r * cols;
    SquareSum<V> rsum;
    SquareSum<Vec1> rsum1;
    int64_t c = 0;
    for (; c + V::W <= cols; c += V::W) {
      const V x = V::load(gr + c) * mult;
      rsum.add(x);
      (V::load(col_sums + c) + x * x).store(col_sums + c);
      psum.add(V::load(pr + c));
    }
    for (; c < cols; ++c) {
      const Vec1 x = Vec1::load(gr + c) * mult1;
      rsum1.add(x);
      col_sums[c] += (x * x).x;
      psum1.add(Vec1::load(pr + c));
    }
    row_sums[r] = rsum.result() + rsum1.result();
  }
  return psum.result() + psum1.result();
}

// U = g mult min(row_scale col_scale, 1/eps1): torch's rsqrt(max(r c / mean(r), eps1^2)) g with
// the reciprocal square root split over the two factors (the scales hold 1/sqrt of each).
template <class V, class T>
inline V adafactor_u(const T* gr, const float* col_scale, int64_t c, V row_scale, V mult, V inv_eps1) {
  return V::load(gr + c) * mult * vmin_lanes(row_scale * V::load(col_scale + c), inv_eps1);
}

template <class V, class T>
double adafactor_update_sq_rows(const T* g, const float* row_scale, const float* col_scale, int64_t rows,
                                int64_t cols, const AdafactorArgs& a) {
  SquareSum<V> sum;
  SquareSum<Vec1> sum1;
  for (int64_t r = 0; r < rows; ++r) {
    const T* gr = g + r * cols;
    int64_t c = 0;
    for (; c + V::W <= cols; c += V::W)
      sum.add(adafactor_u(gr, col_scale, c, V(row_scale[r]), V(a.grad_mult), V(a.inv_eps1)));
    for (; c < cols; ++c)
      sum1.add(adafactor_u(gr, col_scale, c, Vec1(row_scale[r]), Vec1(a.grad_mult), Vec1(a.inv_eps1)));
  }
  return sum.result() + sum1.result();
}

template <class V, class T>
inline void adafactor_apply_lanes(T* pr, const T* gr, const float* col_scale, const uint8_t* keep, int64_t c,
                                  V row_scale, const AdafactorArgs& a) {
  const V u = adafactor_u(gr, col_scale, c, row_scale, V(a.apply_mult), V(a.inv_eps1));
  V param = V::load(pr + c) * V(a.decay) - V(a.step) * u;
  if (keep != nullptr) param = keep_or_zero(param, keep + c);
  param.store(pr + c);
}

template <class V, class T>
void adafactor_apply_rows(T* p, const T* g, const float* row_scale, const float* col_scale, const uint8_t* keep,
                          int64_t rows, int64_t cols, const AdafactorArgs& a) {
  for (int64_t r = 0; r < rows; ++r) {
    T* pr = p + r * cols;
    const T* gr = g + r * cols;
    const uint8_t* kr = keep != nullptr ? keep + r * cols : nullptr;
    int64_t c = 0;
    for (; c + V::W <= cols; c += V::W) adafactor_apply_lanes<V>(pr, gr, col_scale, kr, c, V(row_scale[r]), a);
    for (; c < cols; ++c) adafactor_apply_lanes<Vec1>(pr, gr, col_scale, kr, c, Vec1(row_scale[r]), a);
  }
}

// ------------------------------------------------------------------------------ Adafactor, vectors
// (the new variance and U of lanes [i, i + W), from the stored variance)
template <class V, class T>
inline V adafactor_vec_u(const T* g, const T* v, int64_t i, V mult, const AdafactorArgs& a, V* variance) {
  const V grad = V::load(g + i) * mult;
  *variance = lerp_lanes(V::load(v + i), grad * grad, a.lerp_small, V(a.lerp_w), V(a.lerp_one_minus_w));
  return grad * vrcp(vsqrt(vmax(*variance, V(a.eps1_sq))));
}

template <class V, class T>
void adafactor_vec_stats_range(const T* g, const T* v, const T* p, int64_t n, const AdafactorArgs& a, double* sums) {
  SquareSum<V> psum, usum;
  SquareSum<Vec1> psum1, usum1;
  int64_t i = 0;
  V variance;
  Vec1 variance1;
  for (; i + V::W <= n; i += V::W) {
    usum.add(adafactor_vec_u(g, v, i, V(a.grad_mult), a, &variance));
    psum.add(V::load(p + i));
  }
  for (; i < n; ++i) {
    usum1.add(adafactor_vec_u(g, v, i, Vec1(a.grad_mult), a, &variance1));
    psum1.add(Vec1::load(p + i));
  }
  sums[0] += psum.result() + psum1.result();
  sums[1] += usum.result() + usum1.result();
}

template <class V, class T>
inline void adafactor_vec_apply_lanes(T* p, const T* g, T* v, const uint8_t* keep, int64_t i, const AdafactorArgs& a) {
  V variance;
  const V u = adafactor_vec_u(g, v, i, V(a.apply_mult), a, &variance);
  variance.store(v + i);
  V param = V::load(p + i) * V(a.decay) - V(a.step) * u;
  if (keep != nullptr) param = keep_or_zero(param, keep + i);
  param.store(p + i);
}

template <class V, class T>
void adafactor_vec_apply_range(T* p, const T* g, T* v, const uint8_t* keep, int64_t n, const AdafactorArgs& a) {
  int64_t i = 0;
  for (; i + V::W <= n; i += V::W) adafactor_vec_apply_lanes<V>(p, g, v, keep, i, a);
  for (; i < n; ++i) adafactor_vec_apply_lanes<Vec1>(p, g, v, keep, i, a);
}

// ------------------------------------------------------------------------------ storage dispatch
#define BK_MORE_DISPATCH(dt, CALL)                                \
  switch (dt) {                                                   \
    case DType::f32: { using T = float; CALL; }                   \
    case DType::f16: { using T = fp16_t; CALL; }                  \
    case DType::bf16: { using T = bf16_t; CALL; }                 \
  }

template <class V>
void rmsprop_any(DType dt, void* p, const void* g, void* sq, void* ga, void* buf, const uint8_t* k, int64_t n,
                 const RmspropArgs& a) {
  BK_MORE_DISPATCH(dt, return rmsprop_range<V>((T*)p, (const T*)g, (T*)sq, (T*)ga, (T*)buf, k, n, a))
}

template <class V>
void lion_any(DType dt, void* p, const void* g, void* m, const uint8_t* k, int64_t n, const LionArgs& a) {
  BK_MORE_DISPATCH(dt, return lion_range<V>((T*)p, (const T*)g, (T*)m, k, n, a))
}

template <class V>
double adafactor_stats_any(DType dt, const void* g, const void* p, double* row_sums, float* col_sums, int64_t rows,
                           int64_t cols, const AdafactorArgs& a) {
  BK_MORE_DISPATCH(dt, return adafactor_stats_rows<V>((const T*)g, (const T*)p, row_sums, col_sums, rows, cols, a))
  return 0.0;
}

template <class V>
double adafactor_update_sq_any(DType dt, const void* g, const float* row_scale, const float* col_scale, int64_t rows,
                               int64_t cols, const AdafactorArgs& a) {
  BK_MORE_DISPATCH(dt, return adafactor_update_sq_rows<V>((const T*)g, row_scale, col_scale, rows, cols, a))
  return 0.0;
}

template <class V>
void adafactor_apply_any(DType dt, void* p, const void* g, const float* row_scale, const float* col_scale,
                         const uint8_t* k, int64_t rows, int64_t cols, const AdafactorArgs& a) {
  BK_MORE_DISPATCH(dt, return adafactor_apply_rows<V>((T*)p, (const T*)g, row_scale, col_scale, k, rows, cols, a))
}

template <class V>
void adafactor_vec_stats_any(DType dt, const void* g, const void* v, const void* p, int64_t n, const AdafactorArgs& a,
                             double* sums) {
  BK_MORE_DISPATCH(dt, return adafactor_vec_stats_range<V>((const T*)g, (const T*)v, (const T*)p, n, a, sums))
}

template <class V>
void adafactor_vec_apply_any(DType dt, void* p, const void* g, void* v, const uint8_t* k, int64_t n,
                             const AdafactorArgs& a) {
  BK_MORE_DISPATCH(dt, return adafactor_vec_apply_range<V>((T*)p, (const T*)g, (T*)v, k, n, a))
}
#undef BK_MORE_DISPATCH

// The function table of one instruction set.
template <class V>
bigkernels::optim::cpu::MoreKernels make_more_kernels(const char* isa) {
  return {isa,
          rmsprop_any<V>,
          lion_any<V>,
          adafactor_stats_any<V>,
          adafactor_update_sq_any<V>,
          adafactor_apply_any<V>,
          adafactor_vec_stats_any<V>,
          adafactor_vec_apply_any<V>};
}

}  // namespace
