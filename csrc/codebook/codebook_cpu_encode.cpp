// ISA-independent codebook row kernels: the encoder (weights -> nearest-centroid indices, packed)
// and the centroid sums of the backward (each centroid's gradient: the sum of the dense weight's
// gradient over the weights tied to it). Both are branch-free scalar loops over a row.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "codebook/codebook_cpu.h"
#include "codebook/codebook_cpu_kernels.h"

namespace bigkernels::codebook::cpu {
namespace {

// Number of the C - 1 ascending midpoints strictly below v (mids[C - 1] is +inf): a branch-free
// binary search over C entries, run for kLanes values in lockstep so that their dependent load
// chains overlap; NaN counts as above every midpoint, as torch.searchsorted has it.
constexpr int kLanes = 8;

template <int C>
inline void nearest(const float* mids, const float* v, int n, uint32_t* out) {
  uint32_t i[kLanes] = {};
  for (uint32_t step = C / 2; step > 0; step /= 2)
#pragma GCC unroll 8
    for (int e = 0; e < kLanes; ++e) i[e] += step & (0u - uint32_t(e < n && mids[i[e] + step - 1] < v[e]));
  for (int e = 0; e < n; ++e) out[e] = v[e] != v[e] ? uint32_t(C - 1) : i[e];
}

template <int BITS>
void encode_bits(const Format& f, const float* mids, const float* w, int64_t ldw, int64_t n0, int64_t n1,
                 uint8_t* out) {
  constexpr int C = 1 << BITS;
  const int64_t row_bytes = BITS == 3 ? 3 * ((f.K + 7) / 8) : (f.K * BITS + 7) / 8;
  for (int64_t n = n0; n < n1; ++n) {
    const float* m = mids + (n / f.group_size) * C;
    const float* wr = w + n * ldw;
    uint8_t* o = out + n * f.ldi;
    std::memset(o, 0, size_t(row_bytes));
    for (int64_t k0 = 0; k0 < f.K; k0 += kLanes) {
      const int cnt = int(std::min<int64_t>(kLanes, f.K - k0));
      uint32_t idx[kLanes];
      nearest<C>(m, wr + k0, cnt, idx);
      for (int e = 0; e < cnt; ++e) {
        const int64_t bit = (k0 + e) * BITS;
        const int shift = int(bit & 7);
        o[bit >> 3] = uint8_t(o[bit >> 3] | (idx[e] << shift));
        if (shift + BITS > 8) o[(bit >> 3) + 1] = uint8_t(o[(bit >> 3) + 1] | (idx[e] >> (8 - shift)));
      }
    }
  }
}

template <int BITS>
void sums_bits(const Format& f, const float* g, int64_t ldg, int64_t n0, int64_t n1, double* acc) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = f.idx + n * f.ldi;
    const float* gr = g + n * ldg;
    for (int64_t k = 0; k < f.K; ++k) acc[index_at<BITS>(row, k)] += double(gr[k]);
  }
}

}  // namespace

void encode_rows(const Format& f, const float* mids, const float* w, int64_t ldw, int64_t n0, int64_t n1,
                 uint8_t* idx_out) {
  switch (f.bits) {
    case 2: return encode_bits<2>(f, mids, w, ldw, n0, n1, idx_out);
    case 3: return encode_bits<3>(f, mids, w, ldw, n0, n1, idx_out);
    case 4: return encode_bits<4>(f, mids, w, ldw, n0, n1, idx_out);
    default: return encode_bits<8>(f, mids, w, ldw, n0, n1, idx_out);
  }
}

void centroid_sums(const Format& f, const float* grad_w, int64_t ldg, int64_t n0, int64_t n1, double* acc) {
  switch (f.bits) {
    case 2: return sums_bits<2>(f, grad_w, ldg, n0, n1, acc);
    case 3: return sums_bits<3>(f, grad_w, ldg, n0, n1, acc);
    case 4: return sums_bits<4>(f, grad_w, ldg, n0, n1, acc);
    default: return sums_bits<8>(f, grad_w, ldg, n0, n1, acc);
  }
}

}  // namespace bigkernels::codebook::cpu
