// The CPU distillation-loss maths, written once over an instruction-set policy `Isa` (lane type
// Isa::V plus fma, a lane select, a horizontal max and the pieces of poly_exp) and the storage
// types of the two logit tensors. Included by distill_cpu_{scalar,avx2,avx512}.cpp after each
// defines its Isa.
//
// Per row (s = student, t = teacher logits, T the temperature, invT = 1/T):
//   pass 1  ms = max s, mt = max t                                   (no exponentials)
//   pass 2  a = s·invT − ms·invT, b = t·invT − mt·invT, es = e^a, et = e^b
//           ls = Σ es, lt = Σ et, A = Σ et·(b − a)   [+ l1 = Σ e^(s − ms) for cross-entropy at T ≠ 1]
//           KL = A/lt − log lt + log ls;  loss = (1 − α)·T²·KL + α·(ms + log l1 − s[label])
//   pass 3  (only for gradients) from the exponentials kept in fp32 scratch:
//           d/ds = scale·((1 − α)·T·(es/ls − et/lt) + α·(e1/l1 − onehot))
//           d/dt = scale·(1 − α)·T·(et/lt)·(b − a − A/lt)
// Sums run in fp32 lanes flushed to double every kFlush vectors; the scalar tail adds in double.
#pragma once

#include <cmath>
#include <cstring>
#include <limits>

#include "common/cpu_vec.h"
#include "distill/distill_cpu.h"

namespace {
using bigkernels::distill::cpu::DType;
using bigkernels::distill::cpu::KdArgs;

// One lane (with the C library's exp, see lane_exp): the tails of the vector ISAs and the whole
// scalar instance.
struct ScalarIsa {
  using V = Vec1;
  static V fma(V a, V b, V c) { return V(a.x * b.x + c.x); }
  static V pos_or_zero(V cond, V val) { return V(cond.x > 0.0f ? val.x : 0.0f); }  // 0·inf = 0 where p = 0
  static float hmax(V v) { return v.x; }
};

// e^x on the lanes of an instruction set within 2 ulp (Cephes' expf): x = n·ln2 + r with
// |r| <= ln2/2, a degree-6 polynomial in r, times 2^n. Below -87.34 (where e^x leaves fp32's normal
// range) the result is 0, so e^-inf = 0; NaN stays NaN; inputs here are <= 0 (logits minus their
// maximum). Isa supplies clamp (NaN-preserving), round (to nearest), scale2n (p·2^n) and
// zero_below (0 where x < lo).
template <class Isa>
inline typename Isa::V poly_exp(typename Isa::V x) {
  using V = typename Isa::V;
  const V lo(-87.33654f);
  const V xc = Isa::clamp(x, lo, V(88.3762626647949f));
  const V n = Isa::round(xc * V(1.44269504088896341f));
  V r = Isa::fma(n, V(-0.693359375f), xc);
  r = Isa::fma(n, V(2.12194440e-4f), r);
  V p = Isa::fma(V(1.9875691500e-4f), r, V(1.3981999507e-3f));
  p = Isa::fma(p, r, V(8.3334519073e-3f));
  p = Isa::fma(p, r, V(4.1665795894e-2f));
  p = Isa::fma(p, r, V(1.6666665459e-1f));
  p = Isa::fma(p, r, V(5.0000001201e-1f));
  p = Isa::fma(p, r * r, r + V(1.0f));
  return Isa::zero_below(x, lo, Isa::scale2n(p, n));
}

// exp on Isa's lanes: poly_exp for the vector instruction sets, the C library's for one lane.
template <class Isa>
inline typename Isa::V lane_exp(typename Isa::V x) { return poly_exp<Isa>(x); }
template <>
inline Vec1 lane_exp<ScalarIsa>(Vec1 x) { return Vec1(std::exp(x.x)); }

constexpr int kFlush = 64;

// Sum of vectors in fp32 lanes, flushed into a double every kFlush additions.
template <class V>
struct LaneSum {
  V lanes = V(0.0f);
  double total = 0.0;
  int pending = 0;
  void add(V v) {
    lanes = lanes + v;
    if (++pending == kFlush) flush();
  }
  void flush() {
    total += lanes.sum_lanes();
    lanes = V(0.0f);
    pending = 0;
  }
  double sum() {
    flush();
    return total;
  }
};

inline float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }  // NaN propagates

template <class T>
inline float load1(const T* p) { return Vec1::load(p).x; }

template <class Isa, class T>
float row_max(const T* x, int64_t n) {
  using V = typename Isa::V;
  V m(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + V::W <= n; j += V::W) m = vmax(m, V::load(x + j));
  float out = Isa::hmax(m);
  for (; j < n; ++j) out = nan_max(out, load1(x + j));
  return out;
}

// One row. kGrad: keep the exponentials for pass 3 (a gradient is asked); kCe1: cross-entropy
// needs its own softmax at T = 1 (alpha > 0 and T != 1).
template <class Isa, class TS, class TT, bool kGrad, bool kCe1>
void kd_row(const KdArgs& a, int64_t r, float* scratch) {
  using V = typename Isa::V;
  using S = ScalarIsa;
  constexpr int W = V::W;
  const int64_t n = a.V;
  const TS* s = static_cast<const TS*>(a.s) + r * a.s_stride;
  const TT* t = static_cast<const TT*>(a.t) + r * a.t_stride;
  TS* gs = a.gs ? static_cast<TS*>(a.gs) + r * n : nullptr;
  TT* gt = a.gt ? static_cast<TT*>(a.gt) + r * n : nullptr;
  const int64_t label = a.labels ? a.labels[r] : 0;
  if (a.labels && a.has_ignore && label == a.ignore_index) {
    a.loss[r] = 0.0f;
    if (gs) std::memset(static_cast<void*>(gs), 0, sizeof(TS) * n);
    if (gt) std::memset(static_cast<void*>(gt), 0, sizeof(TT) * n);
    return;
  }
  const bool ce = a.alpha > 0.0f && a.labels != nullptr;
  const float ms = row_max<Isa>(s, n), mt = row_max<Isa>(t, n);
  const float invT = a.inv_temperature, cs = ms * invT, ct = mt * invT;
  float* es_buf = scratch;
  float* et_buf = scratch + n;
  float* e1_buf = scratch + 2 * n;

  // pass 2: exponentials and sums
  LaneSum<V> ls, lt, acc, l1;
  {
    const V vinv(invT), vcs(cs), vct(ct), vms(ms);
    int64_t j = 0;
    for (; j + W <= n; j += W) {
      const V x = V::load(s + j), y = V::load(t + j);
      const V av = Isa::fma(x, vinv, -vcs), bv = Isa::fma(y, vinv, -vct);
      const V es = lane_exp<Isa>(av), et = lane_exp<Isa>(bv);
      ls.add(es);
      lt.add(et);
      acc.add(Isa::pos_or_zero(et, et * (bv - av)));
      if constexpr (kGrad) {
        es.store(es_buf + j);
        et.store(et_buf + j);
      }
      if constexpr (kCe1) {
        const V e1 = lane_exp<Isa>(x - vms);
        l1.add(e1);
        if constexpr (kGrad) e1.store(e1_buf + j);
      }
    }
    for (; j < n; ++j) {
      const float x = load1(s + j), y = load1(t + j);
      const float av = S::fma(Vec1(x), Vec1(invT), Vec1(-cs)).x, bv = S::fma(Vec1(y), Vec1(invT), Vec1(-ct)).x;
      const float es = std::exp(av), et = std::exp(bv);
      ls.total += es;
      lt.total += et;
      acc.total += et > 0.0f ? double(et * (bv - av)) : 0.0;
      if constexpr (kGrad) {
        es_buf[j] = es;
        et_buf[j] = et;
      }
      if constexpr (kCe1) {
        const float e1 = std::exp(x - ms);
        l1.total += e1;
        if constexpr (kGrad) e1_buf[j] = e1;
      }
    }
  }
  const double Ls = ls.sum(), Lt = lt.sum(), A = acc.sum();
  const double log_ls = std::log(Ls), log_lt = std::log(Lt);
  const double kl = A / Lt - log_lt + log_ls;
  const double T = a.temperature, alpha = a.alpha;
  double loss = (1.0 - alpha) * T * T * kl;
  double L1 = Ls;
  if (ce) {
    L1 = kCe1 ? l1.sum() : Ls;  // at T = 1 the student's softmax is the KD one
    loss = (1.0 - alpha) * T * T * kl + alpha * (double(ms) + std::log(L1) - double(load1(s + label)));
  }
  a.loss[r] = float(loss);
  if constexpr (!kGrad) return;

  // pass 3: gradients, written once
  const double c = (1.0 - alpha) * T * a.grad_scale;
  if (gs) {
    const double k1 = ce ? alpha * a.grad_scale / L1 : 0.0;
    // at T = 1 the cross-entropy softmax is es / ls: fold its coefficient into es's
    const float kps = float(c / Ls + (kCe1 ? 0.0 : k1)), kpt = float(c / Lt), kp1 = float(k1);
    const V vps(kps), vpt(kpt), vp1(kp1);
    int64_t j = 0;
    for (; j + W <= n; j += W) {
      V g = V::load(es_buf + j) * vps - V::load(et_buf + j) * vpt;
      if constexpr (kCe1) g = Isa::fma(V::load(e1_buf + j), vp1, g);
      g.store(gs + j);
    }
    for (; j < n; ++j) {
      float g = es_buf[j] * kps - et_buf[j] * kpt;
      if constexpr (kCe1) g = S::fma(Vec1(e1_buf[j]), Vec1(kp1), Vec1(g)).x;
      Vec1(g).store(gs + j);
    }
    if (ce) {  // the label's entry, recomputed in fp32 with its one-hot term (rounded once)
      const int64_t l = label;
      float g = es_buf[l] * kps - et_buf[l] * kpt;
      if constexpr (kCe1) g = S::fma(Vec1(e1_buf[l]), Vec1(kp1), Vec1(g)).x;
      Vec1(g - float(alpha * a.grad_scale)).store(gs + l);
    }
  }
  if (gt) {
    const float kt = float(c / Lt), shift = float(A / Lt);
    const V vinv(invT), vcs(cs), vct(ct), vkt(kt), vshift(shift);
    int64_t j = 0;
    for (; j + W <= n; j += W) {
      const V av = Isa::fma(V::load(s + j), vinv, -vcs), bv = Isa::fma(V::load(t + j), vinv, -vct);
      const V et = V::load(et_buf + j);
      Isa::pos_or_zero(et, et * vkt * (bv - av - vshift)).store(gt + j);
    }
    for (; j < n; ++j) {
      const float av = S::fma(Vec1(load1(s + j)), Vec1(invT), Vec1(-cs)).x;
      const float bv = S::fma(Vec1(load1(t + j)), Vec1(invT), Vec1(-ct)).x;
      const float et = et_buf[j];
      Vec1(et > 0.0f ? et * kt * (bv - av - shift) : 0.0f).store(gt + j);
    }
  }
}

template <class Isa, class TS, class TT>
void kd_rows_typed(const KdArgs& a, int64_t r0, int64_t r1, float* scratch) {
  const bool grad = a.gs != nullptr || a.gt != nullptr;
  const bool ce1 = a.alpha > 0.0f && a.labels != nullptr && a.inv_temperature != 1.0f;
  auto fn = grad ? (ce1 ? kd_row<Isa, TS, TT, true, true> : kd_row<Isa, TS, TT, true, false>)
                 : (ce1 ? kd_row<Isa, TS, TT, false, true> : kd_row<Isa, TS, TT, false, false>);
  for (int64_t r = r0; r < r1; ++r) fn(a, r, scratch);
}

template <class Isa, class TS>
void kd_rows_s(const KdArgs& a, int64_t r0, int64_t r1, float* scratch) {
  switch (a.t_dtype) {
    case DType::f32: return kd_rows_typed<Isa, TS, float>(a, r0, r1, scratch);
    case DType::f16: return kd_rows_typed<Isa, TS, fp16_t>(a, r0, r1, scratch);
    case DType::bf16: return kd_rows_typed<Isa, TS, bf16_t>(a, r0, r1, scratch);
  }
}

// Storage-type dispatch, instantiated once per instruction set.
template <class Isa>
void kd_rows_any(const KdArgs& a, int64_t r0, int64_t r1, float* scratch) {
  switch (a.s_dtype) {
    case DType::f32: return kd_rows_s<Isa, float>(a, r0, r1, scratch);
    case DType::f16: return kd_rows_s<Isa, fp16_t>(a, r0, r1, scratch);
    case DType::bf16: return kd_rows_s<Isa, bf16_t>(a, r0, r1, scratch);
  }
}

}  // namespace
