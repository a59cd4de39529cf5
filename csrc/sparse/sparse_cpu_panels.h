// The sparse linear ops on the AVX2 engines. Included by the AVX2 unit after sparse_cpu_kernels.h.
//
// BSR and CSR on the panel engine (common/cpu_gemm_avx2.h): a decoder writes each strip of 16
// output features over a block of K as a dense panel (stored blocks / non-zeros, zeros elsewhere)
// and the fp32 micro-kernel multiplies it by every row panel of x. A strip with nothing stored in
// the block is skipped, so BSR skips its missing blocks exactly (the k-block is the block size).
// This is the dense product run on panels that stay in cache: little more than a dense GEMM
// costs, whatever the sparsity, and less where whole blocks are missing.
//
// 2:4 with rows of x along the lanes (sparse24_lanes): x packed [K][R] per group of R rows, so
// that input k of R rows is R / 8 contiguous vectors; each kept weight (two per group of four
// inputs, its position from the meta byte) is one broadcast times those vectors. Only the kept
// half of the multiply-adds is done, no permutes, no decoding pass; a register tile of R rows by
// NC features keeps 12 accumulators.
// It is load-bound (one 256-bit load per FMA: ~1 FMA per cycle on Zen 3, where the dense
// micro-kernel, 0.67 loads per FMA, does ~1.7), and still ahead of the dense product on decoded
// panels, which was measured and dropped (2 threads, vs F.linear, M = 16..512: 1024^2 lanes
// 2.37x..1.01x, panels 1.49x..0.98x; 4096^2 M = 64..512: lanes 1.61x..1.23x, panels 1.24x..1.07x).
#pragma once

#include "common/cpu_gemm_avx2.h"
#include "sparse/sparse_cpu.h"

namespace {
namespace sc = bigkernels::sparse::cpu;
static_assert(gemm::kMR == sc::kPanelRows && gemm::kNR == sc::kPanelCols, "sparse_cpu.h's panel shape must be the engine's");

// fn(tag) with decltype(tag)::type the stored weights' element type.
template <class T>
struct Type {
  using type = T;
};
template <class Fn>
auto by_weight_type(DType dt, const Fn& fn) {
  switch (dt) {
    case DType::f32: return fn(Type<float>{});
    case DType::bf16: return fn(Type<bf16_t>{});
    default: return fn(Type<fp16_t>{});
  }
}

// out[m, n .. n + cnt) = acc + bias.
inline void store_sums(const SparseArgs& a, int64_t m, int64_t n, int64_t cnt, const float* acc) {
  int64_t j = 0;
  if (a.out_dtype == DType::f32) {  // 8 at a time (one addition each, as below)
    float* out = static_cast<float*>(a.out) + m * a.N + n;
    for (; j + 8 <= cnt; j += 8) {
      const __m256 b = a.bias ? _mm256_loadu_ps(a.bias + n + j) : _mm256_setzero_ps();  // (+0: -0 -> +0 too)
      _mm256_storeu_ps(out + j, _mm256_add_ps(_mm256_loadu_ps(acc + j), b));
    }
  }
  for (; j < cnt; ++j) store_out(a.out_dtype, a.out, m * a.N + n + j, acc[j] + bias_of(a, n + j));
}

// ------------------------------------------------------------------ BSR panels
template <class T>
struct BsrPanels {
  const SparseArgs& a;
  int64_t n0, n1;                // the unit's output features
  std::vector<int32_t>& where;   // [block row - n0 / B][k block]: stored block index, or -1
  int64_t br0 = 0, kb = 0;

  BsrPanels(const SparseArgs& args, int64_t lo, int64_t hi, std::vector<int32_t>& table)
      : a(args), n0(lo), n1(hi), where(table) {
    const int64_t B = a.B;
    br0 = n0 / B;
    kb = a.K / B;
    const int64_t brs = (n1 - 1) / B - br0 + 1;
    where.assign(size_t(brs * kb), -1);
    for (int64_t r = 0; r < brs; ++r)
      for (int64_t j = a.crow[br0 + r]; j < a.crow[br0 + r + 1]; ++j) where[size_t(r * kb + a.col[j])] = int32_t(j);
  }
  // whole blocks: exact skipping for B >= 32, up to 16 small blocks (<= 128 inputs) per panel otherwise
  int64_t k_block() const { return a.B >= 32 ? a.B : std::min<int64_t>(16, 128 / a.B) * a.B; }
  bool pack(int64_t n, int64_t k0, int64_t kc, float* dst) const {
    const int64_t B = a.B, nkb = kc / B;
    const T* blocks = static_cast<const T*>(a.w);
    const T* rows[16][gemm::kNR];  // per block of the panel (at most 128 / B + 1 <= 16 of them)
    bool any = false;
    for (int64_t q = 0; q < nkb; ++q)
      for (int r = 0; r < gemm::kNR; ++r) {
        const int64_t f = n + r;
        const int32_t j = f < n1 ? where[size_t((f / B - br0) * kb + k0 / B + q)] : -1;
        rows[q][r] = j >= 0 ? blocks + (int64_t(j) * B + f % B) * B : nullptr;
        any = any || j >= 0;
      }
    if (!any) return false;  // nothing stored here: no zeros written, no micro-kernels
    for (int64_t q = 0; q < nkb; ++q) gemm::panel_from_rows(rows[q], 0, B, dst + q * B * gemm::kNR);
    return true;
  }
  void store(int64_t m, int64_t n, int64_t cnt, const float* acc) const { store_sums(a, m, n, cnt, acc); }
};

template <class T>
void bsr_panels_t(const SparseArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  static thread_local std::vector<int32_t> table;
  BsrPanels<T> dec(a, n0, n1, table);
  gemm::unit_f32(dec, a.a_packed, a.K, m0, m1, n0, n1);
}

void bsr_panels(const SparseArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  by_weight_type(a.w_dtype, [&](auto t) { bsr_panels_t<typename decltype(t)::type>(a, m0, m1, n0, n1); });
}

// ------------------------------------------------------------------ CSR panels
// Each row's entries are visited once, in order, as the k-blocks advance (a cursor per row of the
// unit). An entry that is not where increasing, in-range columns would put it (an unsorted row, a
// column outside [0, K)) is counted and left out: the binding then runs csr_rows instead.
template <class T>
struct CsrPanels {
  const SparseArgs& a;
  int64_t n0, n1;
  std::vector<int64_t>& cursor;
  int64_t bad = 0;
  CsrPanels(const SparseArgs& args, int64_t lo, int64_t hi, std::vector<int64_t>& cur) : a(args), n0(lo), n1(hi), cursor(cur) {
    cursor.assign(a.crow + n0, a.crow + n1);
  }
  int64_t k_block() const { return gemm::kKC; }
  bool pack(int64_t n, int64_t k0, int64_t kc, float* dst) {
    std::memset(dst, 0, sizeof(float) * size_t(kc * gemm::kNR));
    const T* vals = static_cast<const T*>(a.w);
    bool any = false;
    for (int r = 0; r < gemm::kNR && n + r < n1; ++r) {
      int64_t c = cursor[size_t(n + r - n0)];
      const int64_t e = a.crow[n + r + 1];
      for (; c < e; ++c) {
        const int64_t col = a.col[c];
        if (col >= k0 + kc) break;
        if (col < k0) {
          ++bad;
          continue;
        }
        dst[(col - k0) * gemm::kNR + r] = Vec1::load(vals + c).x;
      }
      any = any || c != cursor[size_t(n + r - n0)];
      cursor[size_t(n + r - n0)] = c;
    }
    return any;
  }
  void store(int64_t m, int64_t n, int64_t cnt, const float* acc) const { store_sums(a, m, n, cnt, acc); }
};

template <class T>
int64_t csr_panels_t(const SparseArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  static thread_local std::vector<int64_t> cursor;
  CsrPanels<T> dec(a, n0, n1, cursor);
  gemm::unit_f32(dec, a.a_packed, a.K, m0, m1, n0, n1);
  for (int64_t n = n0; n < n1; ++n) dec.bad += a.crow[n + 1] - cursor[size_t(n - n0)];  // columns >= K
  return dec.bad;
}

int64_t csr_panels(const SparseArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  return by_weight_type(a.w_dtype, [&](auto t) { return csr_panels_t<typename decltype(t)::type>(a, m0, m1, n0, n1); });
}

void pack_a_f32(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t p0, int64_t p1, float* dst) {
  gemm::pack_a_f32(x, ldx, M, K, p0, p1, dst);
}

// ------------------------------------------------------------------ 2:4, rows along the lanes
// acc[c * ld + r] += sum over the kept weights of feature c in groups [0, groups) of
// value * x[r, input], for the RV * 8 rows of xa ([4 * groups][RV * 8] fp32).
template <int RV, int NC>
void s24_lane_tile(const float* xa, const float* const* v, const uint8_t* const* mt, int64_t groups, float* acc,
                   int64_t ld) {
  constexpr int R = RV * 8;
  __m256 s[NC][RV];
  for (int c = 0; c < NC; ++c)
    for (int i = 0; i < RV; ++i) s[c][i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const float* xg = xa + g * 4 * R;
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) {
      const unsigned m = mt[c][g];
      const float* p0 = xg + (m & 3) * R;
      const float* p1 = xg + ((m >> 2) & 3) * R;
      const __m256 w0 = _mm256_broadcast_ss(v[c] + 2 * g), w1 = _mm256_broadcast_ss(v[c] + 2 * g + 1);
#pragma GCC unroll 4
      for (int i = 0; i < RV; ++i) s[c][i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(p0 + 8 * i), s[c][i]);
#pragma GCC unroll 4
      for (int i = 0; i < RV; ++i) s[c][i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(p1 + 8 * i), s[c][i]);
    }
  }
  for (int c = 0; c < NC; ++c)
    for (int i = 0; i < RV; ++i) {
      float* p = acc + c * ld + 8 * i;
      _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), s[c][i]));
    }
}

// Features [n, n + nc) (nc <= NC) against one group of R rows of x (xa: at k0), k0 .. k0 + kc.
template <int RV, int NC>
void s24_lane_strip(const float* xa, const float* const* v, const uint8_t* const* mt, int nc, int64_t groups,
                    float* acc, int64_t ld) {
  // (the last strip of a block may be narrower)
  if (nc == NC) s24_lane_tile<RV, NC>(xa, v, mt, groups, acc, ld);
  else if (nc == 1) s24_lane_tile<RV, 1>(xa, v, mt, groups, acc, ld);
  else if (nc == 2) s24_lane_tile<RV, (NC > 2 ? 2 : 1)>(xa, v, mt, groups, acc, ld);
  else if (nc == 3) s24_lane_tile<RV, (NC > 3 ? 3 : 1)>(xa, v, mt, groups, acc, ld);
  else if (nc == 4) s24_lane_tile<RV, (NC > 4 ? 4 : 1)>(xa, v, mt, groups, acc, ld);
  else s24_lane_tile<RV, (NC > 5 ? 5 : 1)>(xa, v, mt, groups, acc, ld);
}

// For each block of K: each group of R rows of x (its block: 16 KB, in L1) meets every feature of
// the unit in strips of NC, whose values and meta (a few hundred bytes per strip) stream from L2.
template <class T, int RV, int NC>
void sparse24_lanes_rv(const SparseArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  constexpr int R = RV * 8;
  constexpr int64_t KC = 4096 / R;  // R x KC fp32 of x (16 KB) per block
  static thread_local std::vector<float> acc_buf, vbuf;
  static thread_local std::vector<const float*> vptr;
  static thread_local std::vector<const uint8_t*> mptr;
  const int64_t K = a.K, rows = gemm::round_up(m1 - m0, R), cols = n1 - n0;
  acc_buf.assign(size_t(cols * rows), 0.0f);
  vptr.resize(size_t(cols));
  mptr.resize(size_t(cols));
  if (!std::is_same_v<T, float>) vbuf.resize(size_t(cols * (KC / 2)));
  const T* values = static_cast<const T*>(a.w);
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kc = std::min<int64_t>(KC, K - k0);
    for (int64_t c = 0; c < cols; ++c) {
      mptr[size_t(c)] = a.meta + (n0 + c) * (K / 4) + k0 / 4;
      const T* src = values + (n0 + c) * (K / 2) + k0 / 2;
      if constexpr (std::is_same_v<T, float>) {
        vptr[size_t(c)] = src;
      } else {  // the block's values as fp32, once for all row groups
        float* d = vbuf.data() + c * (KC / 2);
        for (int64_t j = 0; j < kc / 2; ++j) d[j] = Vec1::load(src + j).x;
        vptr[size_t(c)] = d;
      }
    }
    for (int64_t m = m0; m < m1; m += R) {
      const float* xa = a.a_packed + (m / R) * K * R + k0 * R;
      for (int64_t c = 0; c < cols; c += NC)
        s24_lane_strip<RV, NC>(xa, vptr.data() + c, mptr.data() + c, int(std::min<int64_t>(NC, cols - c)), kc / 4,
                               acc_buf.data() + c * rows + (m - m0), rows);
    }
  }
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t n = n0; n < n1; ++n)
      store_out(a.out_dtype, a.out, m * a.N + n, acc_buf[size_t((n - n0) * rows + (m - m0))] + bias_of(a, n));
}

template <class T>
void sparse24_lanes_t(const SparseArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (sc::lane_rows(a.M) == 32) return sparse24_lanes_rv<T, 4, 3>(a, m0, m1, n0, n1);
  return sparse24_lanes_rv<T, 2, 6>(a, m0, m1, n0, n1);
}

void sparse24_lanes(const SparseArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  by_weight_type(a.w_dtype, [&](auto t) { sparse24_lanes_t<typename decltype(t)::type>(a, m0, m1, n0, n1); });
}

// ------------------------------------------------------------------ 2:4, a few rows (in-lane permutes)
// Below kSparse24LanesMinRows rows. Each row of x arrives with the middle quads of every 16 inputs
// swapped (the binding's copy: inputs 0-3, 8-11, 4-7, 12-15; see SparseArgs::xt), so that a step
// of 8 kept weights (groups g .. g + 3, inputs 16s .. 16s + 15) finds its inputs in two vectors
// whose 128-bit lanes match the weights' lanes: lane l of xa holds the group of weights 4l, 4l + 1,
// lane l of xb that of weights 4l + 2, 4l + 3. vpermilps reads only the low two bits of each
// control dword, so the control is the 4 meta bytes broadcast and shifted per lane (the position
// in the group lands in bits 0-1), and a fixed blend merges the two permutes: 2 in-lane permutes,
// a blend and a shift per 8 weights and row, where cross-lane selection (sparse24_rows) costs two
// vpermps, a compare, a blendv and five integer ops. The weights are read once for all MR rows.
template <class T, int MR>
void s24_permil_tile(const SparseArgs& a, int64_t m, int64_t n0, int64_t n1) {
  const int64_t K = a.K, half = K / 2, steps = K / 16, ldx = steps * 16;
  const T* values = static_cast<const T*>(a.w);
  const __m256i shifts = _mm256_setr_epi32(0, 2, 8, 10, 16, 18, 24, 26);
  const float* xs[MR];
  for (int i = 0; i < MR; ++i) xs[i] = a.xt + (m + i) * ldx;
  for (int64_t n = n0; n < n1; ++n) {
    const T* v = values + n * half;
    const uint8_t* mt = a.meta + n * (K / 4);
    __m256 acc[2][MR];
    for (int c = 0; c < 2; ++c)
      for (int i = 0; i < MR; ++i) acc[c][i] = _mm256_setzero_ps();
    auto step = [&](int64_t s, __m256* sum) {
      int32_t word;
      std::memcpy(&word, mt + 4 * s, 4);
      const __m256i ctl = _mm256_srlv_epi32(_mm256_set1_epi32(word), shifts);
      const __m256 w = Vec8::load(v + 8 * s).x;
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) {
        const float* p = xs[i] + 16 * s;
        const __m256 sel = _mm256_blend_ps(_mm256_permutevar_ps(_mm256_loadu_ps(p), ctl),
                                           _mm256_permutevar_ps(_mm256_loadu_ps(p + 8), ctl), 0xCC);
        sum[i] = _mm256_fmadd_ps(w, sel, sum[i]);
      }
    };
    int64_t s = 0;
    for (; s + 2 <= steps; s += 2) {  // two accumulator sets: independent FMA chains
      step(s, acc[0]);
      step(s + 1, acc[1]);
    }
    if (s < steps) step(s, acc[0]);
    float tail[MR] = {};
    for (int64_t j = steps * 8; j < half; ++j) {  // the last < 8 weights (K not a multiple of 16)
      const int64_t k = 4 * (j / 2) + ((mt[j / 2] >> (2 * (j & 1))) & 3);
      const float w = Vec1::load(v + j).x;
      for (int i = 0; i < MR; ++i) tail[i] += w * a.x[(m + i) * K + k];
    }
    for (int i = 0; i < MR; ++i)
      store_out(a.out_dtype, a.out, (m + i) * a.N + n,
                Isa::hsum(Vec8(_mm256_add_ps(acc[0][i], acc[1][i]))) + tail[i] + bias_of(a, n));
  }
}

template <class T>
void sparse24_permil_t(const SparseArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  int64_t m = m0;
  for (; m + 4 <= m1; m += 4) s24_permil_tile<T, 4>(a, m, n0, n1);
  switch (m1 - m) {
    case 3: return s24_permil_tile<T, 3>(a, m, n0, n1);
    case 2: return s24_permil_tile<T, 2>(a, m, n0, n1);
    case 1: return s24_permil_tile<T, 1>(a, m, n0, n1);
    default: return;
  }
}

void sparse24_permil(const SparseArgs& a, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  by_weight_type(a.w_dtype, [&](auto t) { sparse24_permil_t<typename decltype(t)::type>(a, m0, m1, n0, n1); });
}


// ------------------------------------------------------------------ 2:4 to dense (fp32)
// Rows [n0, n1) of the dense [N, K] weight (the binding's sparse24_to_dense; 16-bit values take its
// scalar copy): two groups (8 outputs) per vector; output lane l of a group takes its first kept
// value where l is its first position, its second where l is the second, else 0 (compares against
// the lane index). 1024 x 1024, one thread: 0.26 ms through the op vs 0.66 ms for the scalar copy.
void sparse24_to_dense_f32(const float* values, const uint8_t* meta, int64_t K, int64_t n0, int64_t n1, float* out) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 0, 1, 2, 3), three = _mm256_set1_epi32(3);
  const __m256i shift0 = _mm256_setr_epi32(0, 0, 0, 0, 8, 8, 8, 8), shift1 = _mm256_setr_epi32(2, 2, 2, 2, 10, 10, 10, 10);
  const __m256i first = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2), second = _mm256_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3);
  const int64_t groups = K / 4;
  for (int64_t n = n0; n < n1; ++n) {
    const float* v = values + n * (K / 2);
    const uint8_t* mt = meta + n * groups;
    float* o = out + n * K;
    int64_t g = 0;
    for (; g + 2 <= groups; g += 2) {
      uint16_t word;
      std::memcpy(&word, mt + g, 2);
      const __m256i w = _mm256_set1_epi32(word);
      const __m256i p0 = _mm256_and_si256(_mm256_srlv_epi32(w, shift0), three);
      const __m256i p1 = _mm256_and_si256(_mm256_srlv_epi32(w, shift1), three);
      const __m256 four = _mm256_castps128_ps256(_mm_loadu_ps(v + 2 * g));  // v0 v1 of both groups
      const __m256 v0 = _mm256_permutevar8x32_ps(four, first), v1 = _mm256_permutevar8x32_ps(four, second);
      _mm256_storeu_ps(o + 4 * g, _mm256_or_ps(_mm256_and_ps(v0, _mm256_castsi256_ps(_mm256_cmpeq_epi32(lane, p0))),
                                               _mm256_and_ps(v1, _mm256_castsi256_ps(_mm256_cmpeq_epi32(lane, p1)))));
    }
    if (g < groups) {  // an odd last group
      for (int l = 0; l < 4; ++l) o[4 * g + l] = 0.0f;
      o[4 * g + (mt[g] & 3)] = v[2 * g];
      o[4 * g + ((mt[g] >> 2) & 3)] = v[2 * g + 1];
    }
  }
}

}  // namespace
