// Work distribution shared by the CPU kernel bindings (threads through the stable ABI's
// parallel_for; the kernels themselves stay pointer-level).
#pragma once

#include "common/stable.h"

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace bigkernels {

// Threads worth waking for `work` multiply-adds: one per 2^18 (some 15-40 us on one core), at
// most st::get_num_threads(). A smaller product runs on the calling thread: waking a second one
// costs a few microseconds on an idle machine. A 1024 x 1024 product at M = 1 (2^20 multiply-adds,
// ~90 us for MKL's one-thread GEMV) is worth two: the compressed kernels then finish ahead of
// F.linear instead of behind it. The trade-off: on a machine busier than its cores, the caller
// spins at the end of each parallel region until the other thread gets a core (measured on the
// shared 2-core VM at load ~15 with 2^21 here: a one-token forward of a 1024-wide Llama burned 4x
// the dense model's CPU time in those waits when every 1024 x 1024 product used both threads);
// torch.set_num_threads(1) is the answer there.
inline int64_t threads_for(double work) {
  constexpr double kWorkPerThread = double(1 << 18);
  return std::max<int64_t>(1, std::min<int64_t>(st::get_num_threads(), int64_t(work / kWorkPerThread)));
}

// The st::parallel_for grain that splits `items` over at most threads_for(work) threads (for
// copies and conversions, count ~4 multiply-adds of work per element).
inline int64_t grain_for(int64_t items, double work) {
  const int64_t t = threads_for(work);
  return std::max<int64_t>(1, (items + t - 1) / t);
}

// fn(u) for every u in [0, units), on all of st::parallel_for's threads, each thread taking the
// next unit when it finishes one: a thread slowed down (another process on its core) does fewer
// units instead of holding the others at the end of a static split.
template <class Fn>
void parallel_units(int64_t units, const Fn& fn, int64_t max_threads = 1 << 30) {
  if (units <= 0) return;
  const int64_t threads = std::min<int64_t>(std::min<int64_t>(st::get_num_threads(), units), max_threads);
  std::atomic<int64_t> next{0};
  st::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t u = next.fetch_add(1); u < units; u = next.fetch_add(1)) fn(u);
  });
}

// fn(m0, m1, n0, n1) over blocks of out [M, N] for a cache-blocked engine: blocks of rows start
// at multiples of row_step (at most max_rows rows), blocks of columns at multiples of col_step
// (cols wide); both halve (columns first) until every thread gets about four. Threads take blocks
// as they finish one (parallel_units; as many as threads_for(work multiply-adds)); blocks sharing
// columns are consecutive.
template <class Fn>
void for_each_engine_block(int64_t M, int64_t N, int64_t row_step, int64_t max_rows, int64_t col_step, int64_t cols,
                           double work, const Fn& fn) {
  if (M == 0 || N == 0) return;
  const int64_t want = 4 * int64_t(st::get_num_threads());
  auto up = [](int64_t v, int64_t to) { return (v + to - 1) / to * to; };
  int64_t mb = std::min(up(M, row_step), std::max(row_step, max_rows / row_step * row_step)), nb = up(cols, col_step);
  auto count = [&] { return ((M + mb - 1) / mb) * ((N + nb - 1) / nb); };
  while (count() < want && nb > col_step) nb = std::max(col_step, up(nb / 2, col_step));
  while (count() < want && mb > row_step) mb = std::max(row_step, up(mb / 2, row_step));
  const int64_t mblocks = (M + mb - 1) / mb;
  parallel_units(count(), [&](int64_t u) {
    const int64_t mi = u % mblocks, ni = u / mblocks;
    fn(mi * mb, std::min(M, (mi + 1) * mb), ni * nb, std::min(N, (ni + 1) * nb));
  }, threads_for(work));
}

}  // namespace bigkernels
