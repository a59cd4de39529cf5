// CPU binding of the sparse linear kernel ops csr_mm, bsr_mm and sparse24_mm: validates every
// argument before any work (CSR column indices, which would cost a pass over nnz, are range
// checked by the kernels themselves, which read nothing out of range and report it), converts x
// (and the bias) to fp32 once, picks the instruction set at run time and runs blocks of output
// features (and of rows, for larger M) with st::parallel_for. Kernels live in
// sparse_cpu_{scalar,avx2,avx512}.cpp behind the pointer-level sparse_cpu.h.
#include "common/stable.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#include "common/cpu_features.h"
#include "common/cpu_parallel.h"
#include "sparse/sparse_cpu.h"

namespace bigkernels::sparse::cpu {

const Kernels& best_kernels() {
  // Levels as in the other families: scalar 0, avx2 1, avx512 2 (capped by BIGKERNELS_CPU_ISA).
  static const int cpu_level = bigkernels::cpu_has_avx512()          ? 2
                               : bigkernels::cpu_has_avx2_fma_f16c() ? 1
                                                                     : 0;
  switch (std::min(cpu_level, bigkernels::cpu_isa_level_cap())) {
    case 2: return avx512_kernels();
    case 1: return avx2_kernels();
    default: return scalar_kernels();
  }
}

namespace {

bool is_float(st::ScalarType t) { return t == st::kFloat || t == st::kHalf || t == st::kBFloat16; }

DType dtype_of(st::ScalarType t) {
  return t == st::kFloat ? DType::f32 : t == st::kBFloat16 ? DType::bf16 : DType::f16;
}

void check_cpu(const char* op, const char* name, const st::Tensor& t) {
  BK_CHECK(t.device().is_cpu(), op, ": expected ", name, " on the CPU, got a tensor on ", t.device());
}

void check_dim(const char* op, const char* name, const st::Tensor& t, int64_t dim) {
  check_cpu(op, name, t);
  BK_CHECK(t.dim() == dim, op, ": expected ", name, " to be ", dim, "-D, got ", t.dim(), "-D with shape ",
              t.sizes());
}

void check_x(const char* op, const st::Tensor& x) {
  check_dim(op, "x", x, 2);
  BK_CHECK(is_float(x.scalar_type()), op, ": expected x of dtype float32, bfloat16 or float16, got ",
              x.scalar_type());
}

// The stored weights: x's dtype or float32.
void check_weights(const char* op, const char* name, const st::Tensor& w, const st::Tensor& x) {
  BK_CHECK(w.scalar_type() == x.scalar_type() || w.scalar_type() == st::kFloat, op, ": expected ", name,
              " of dtype ", x.scalar_type(), " (x's) or float32, got ", w.scalar_type());
}

void check_index(const char* op, const char* name, const st::Tensor& t, st::ScalarType want) {
  check_dim(op, name, t, 1);
  BK_CHECK(t.scalar_type() == want, op, ": expected ", name, " of dtype ", want, ", got ", t.scalar_type());
}

// crow [rows + 1] int64: crow[0] = 0, non-decreasing, crow[rows] = nnz.
void check_crow(const char* op, const st::Tensor& crow, int64_t nnz) {
  const int64_t* c = crow.mutable_data_ptr<int64_t>();
  const int64_t rows = crow.numel() - 1;
  BK_CHECK(c[0] == 0, op, ": expected crow[0] == 0, got ", c[0]);
  BK_CHECK(c[rows] == nnz, op, ": expected crow[-1] == ", nnz, " (the number of stored entries), got ",
              c[rows]);
  for (int64_t r = 0; r < rows; ++r)
    BK_CHECK(c[r] <= c[r + 1], op, ": expected crow to be non-decreasing, got crow[", r, "] = ", c[r],
                " > crow[", r + 1, "] = ", c[r + 1]);
}

void check_bias(const char* op, const std::optional<st::Tensor>& bias, const st::Tensor& x, int64_t N) {
  if (!bias.has_value()) return;
  check_dim(op, "bias", *bias, 1);
  BK_CHECK(bias->scalar_type() == st::kFloat || bias->scalar_type() == x.scalar_type(), op,
              ": expected bias of dtype float32 or ", x.scalar_type(), " (x's), got ", bias->scalar_type());
  BK_CHECK(bias->size(0) == N, op, ": expected bias of shape [", N, "] (one per output feature), got shape ",
              bias->sizes());
}

// What every op shares once its format is checked: fp32 x and bias, the output, the arguments.
struct Prepared {
  st::Tensor x32, bias32, out;
  SparseArgs a{};
};

Prepared prepare(const st::Tensor& x, const std::optional<st::Tensor>& bias, int64_t N, const st::Tensor& w) {
  Prepared p;
  p.x32 = st::contiguous(st::to(x, st::kFloat));
  p.out = st::empty({x.size(0), N}, st::options(x));
  if (bias.has_value()) p.bias32 = st::contiguous(st::to(*bias, st::kFloat));
  SparseArgs& a = p.a;
  a.x = p.x32.mutable_data_ptr<float>();
  a.M = x.size(0);
  a.K = x.size(1);
  a.N = N;
  a.w = w.data_ptr();
  a.w_dtype = dtype_of(w.scalar_type());
  a.bias = bias.has_value() ? p.bias32.mutable_data_ptr<float>() : nullptr;
  a.out = p.out.data_ptr();
  a.out_dtype = dtype_of(x.scalar_type());
  return p;
}

// Runs fn(m0, m1, n0, n1) over a grid of row blocks (multiples of m_step, at least m_min rows)
// and feature blocks (at least n_min), small enough that every thread gets about four; blocks
// are ordered row-block major so a thread's consecutive blocks share their rows of x. `work`
// (multiply-adds) caps the threads for small products (bigkernels::threads_for).
template <class Fn>
void for_each_block(int64_t M, int64_t N, int64_t m_step, int64_t m_max, int64_t n_min, double work, const Fn& fn) {
  if (M == 0 || N == 0) return;
  const int64_t want = 4 * int64_t(st::get_num_threads());
  int64_t mb = std::max<int64_t>(m_step, std::min<int64_t>((M + m_step - 1) / m_step * m_step, m_max));
  int64_t nb = std::max<int64_t>(n_min, (N + want - 1) / want);
  const int64_t mblocks = (M + mb - 1) / mb, nblocks = (N + nb - 1) / nb;
  st::parallel_for(0, mblocks * nblocks, bigkernels::grain_for(mblocks * nblocks, work), [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t mi = blk / nblocks, ni = blk % nblocks;
      fn(mi * mb, std::min(M, (mi + 1) * mb), ni * nb, std::min(N, (ni + 1) * nb));
    }
  });
}

// The AVX2 engines (sparse_cpu_panels.h) from these batch sizes (below them the kernels above,
// which need no packing, are as fast or faster); CSR only from kCsrPanelDensity stored entries
// per weight, where its per-entry kernels cost more than the dense product on decoded panels
// (measured, 4096 x 4096, one thread: 50% stored at 128 rows 0.96x dense vs 0.62x; 90% sparse:
// the x-chunk kernel 4x ahead), and from kCsrPanelDensityWideK where the x chunk the per-entry
// kernel reads at random ([K][32] floats) outgrows kXChunkCacheBytes (Zen 3's L2 is 512 KB):
// two threads, 64-512 rows, panel time / x-chunk time at 40 / 30 / 25 / 20% stored: K = 1024
// 0.9-1.1 / 0.9-1.1 / - / 1.35-1.56; K = 2048 0.66-0.77 / 0.95-1.28 / - / 2.3-2.7; K = 3072
// - / 1.0-1.25 / - / -; K = 4096 (512 KB) 0.41-0.73 / 0.61-0.94 / 0.84-1.26 / 0.87-1.77.
// 2:4: below kSparse24LanesMinRows the in-lane permute tiles (sparse24_permil), from there rows
// along the lanes (measured, one core, vs F.linear, 1024^2 / 4096^2: 8 rows 1.38x / 1.55x vs
// 1.33x / 1.29x; 12 rows 1.10x / 1.18x vs 1.20x / 1.25x; 4 rows 2.2x / 2.6x, where the lanes'
// 16-row groups are three quarters zeros).
constexpr int64_t kBsrPanelMinRows = 16, kCsrPanelMinRows = 48, kSparse24LanesMinRows = 12;
constexpr double kCsrPanelDensity = 0.4, kCsrPanelDensityWideK = 0.25;
constexpr int64_t kXChunkCacheBytes = 384 << 10;

int64_t panel_min_rows(int64_t dflt) {  // BIGKERNELS_PANEL_MIN_ROWS overrides (tuning)
  const char* v = std::getenv("BIGKERNELS_PANEL_MIN_ROWS");
  return v ? std::atoll(v) : dflt;
}

// Stored entries per weight from which CSR takes the panel engine, for K inputs in x chunks of
// `chunk` rows; BIGKERNELS_CSR_PANEL_DENSITY overrides (tuning: 0 always, > 1 never).
double csr_panel_density(int64_t K, int64_t chunk) {
  const char* v = std::getenv("BIGKERNELS_CSR_PANEL_DENSITY");
  if (v) return std::atof(v);
  return K * chunk * int64_t(sizeof(float)) > kXChunkCacheBytes ? kCsrPanelDensityWideK : kCsrPanelDensity;
}

// x packed for the panel engine (row panels of kPanelRows rows), then its blocks (up to 264 rows
// by 128 output features) in parallel: fn(m0, m1, n0, n1) runs one.
template <class Fn>
void run_panels(const Kernels& k, SparseArgs& a, st::Tensor& keep, double work, const Fn& fn) {
  const int64_t M = a.M, K = a.K, panels = (M + kPanelRows - 1) / kPanelRows;
  keep = st::empty({packed_a_floats(M, K)}, st::TensorOptions().dtype(st::kFloat));
  float* ap = keep.mutable_data_ptr<float>();
  st::parallel_for(0, panels, bigkernels::grain_for(panels, 4.0 * double(M) * double(K)),
                   [&](int64_t p0, int64_t p1) { k.pack_a_f32(a.x, K, M, K, p0, p1, ap); });
  a.a_packed = ap;
  bigkernels::for_each_engine_block(M, a.N, kPanelRows, 264, kPanelCols, 128, work, fn);
}

// x [M, K] (fp32, row stride K) as groups of R rows, each [K][R] (rows past M zero): input k of a
// group's R rows is R contiguous floats (the CSR chunks and the 2:4 lanes kernels read it so).
st::Tensor pack_row_groups(const float* x, int64_t M, int64_t K, int64_t R) {
  const int64_t groups = (M + R - 1) / R;
  st::Tensor packed = st::empty({groups * K * R}, st::TensorOptions().dtype(st::kFloat));
  float* dst = packed.mutable_data_ptr<float>();
  st::parallel_for(0, groups * K, bigkernels::grain_for(groups * K, 4.0 * double(groups * R) * double(K)),
                   [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t g = i / K, kk = i % K;
      for (int64_t l = 0; l < R; ++l) dst[i * R + l] = g * R + l < M ? x[(g * R + l) * K + kk] : 0.0f;
    }
  });
  return packed;
}

// x packed in groups of R = lane_rows(M) rows (pack_row_groups), then blocks of whole groups by up
// to 128 output features in parallel: fn(m0, m1, n0, n1) runs one.
template <class Fn>
void run_lanes(SparseArgs& a, st::Tensor& keep, double work, const Fn& fn) {
  const int64_t R = lane_rows(a.M);
  keep = pack_row_groups(a.x, a.M, a.K, R);
  a.a_packed = keep.mutable_data_ptr<float>();
  bigkernels::for_each_engine_block(a.M, a.N, R, 256, 8, 128, work, fn);
}

st::Tensor csr_mm_cpu(const st::Tensor& x, const st::Tensor& crow_in, const st::Tensor& col_in,
                      const st::Tensor& values_in, const std::optional<st::Tensor>& bias) {
  const char* op = "csr_mm";
  check_x(op, x);
  check_index(op, "crow", crow_in, st::kLong);
  check_index(op, "col", col_in, st::kInt);
  check_dim(op, "values", values_in, 1);
  check_weights(op, "values", values_in, x);
  BK_CHECK(crow_in.numel() >= 1, op, ": expected crow of shape [N + 1], got shape ", crow_in.sizes());
  const int64_t N = crow_in.numel() - 1, nnz = values_in.numel();
  BK_CHECK(col_in.numel() == nnz, op, ": expected col and values of the same length, got col of ",
              col_in.numel(), " and values of ", nnz);
  check_bias(op, bias, x, N);
  const st::Tensor crow = st::contiguous(crow_in), col = st::contiguous(col_in), values = st::contiguous(values_in);
  check_crow(op, crow, nnz);
  // (the AVX2 gathers may load x[0] for a lane they then drop: x must have an input to load)
  BK_CHECK(nnz == 0 || x.size(1) > 0, op, ": expected every col entry in [0, 0) (x has K = 0 inputs), got ",
           "entries outside it");
  Prepared p = prepare(x, bias, N, values);
  SparseArgs& a = p.a;
  a.crow = crow.mutable_data_ptr<int64_t>();
  a.col = col.mutable_data_ptr<int32_t>();
  if (a.M == 0 || N == 0) return p.out;
  const Kernels& k = best_kernels();
  std::atomic<int64_t> bad{0};
  if (k.csr_panels && a.M >= panel_min_rows(kCsrPanelMinRows) &&
      double(nnz) >= csr_panel_density(a.K, k.csr_chunk(a.M)) * double(N) * double(a.K)) {
    st::Tensor packed;
    run_panels(k, a, packed, double(a.M) * double(N) * double(a.K),
               [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) { bad += k.csr_panels(a, m0, m1, n0, n1); });
    if (bad.load() == 0) return p.out;
    bad = 0;  // unsorted rows or columns out of range: the kernels below take the first, report the second
    a.a_packed = nullptr;
  }
  if (a.M < kCsrTransposeM) {
    // gathers: rows of x stay in L1/L2, blocks of output features in parallel
    const int64_t per_row = std::max<int64_t>(1, nnz / std::max<int64_t>(N, 1));
    // (a gathered non-zero costs ~8 of a dense product's multiply-adds: ~1.5 vs ~0.2 cycles)
    const int64_t grain = std::max(std::max<int64_t>(1, (1 << 14) / (per_row * a.M)),
                                   bigkernels::grain_for(N, 8.0 * double(nnz) * double(a.M)));
    st::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { bad += k.csr_rows(a, 0, a.M, n0, n1); });
  } else {
    // x in chunks [K][CH] (CH rows of x along the vector lanes), zero rows past M
    const int64_t CH = k.csr_chunk(a.M), M = a.M;
    const st::Tensor xt = pack_row_groups(a.x, M, a.K, CH);
    const float* xtp = xt.mutable_data_ptr<float>();
    a.xt = xtp;
    for_each_block(M, N, CH, CH, 16, double(nnz) * double(M), [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
      bad += k.csr_rows(a, m0, m1, n0, n1);
    });
  }
  BK_CHECK(bad.load() == 0, op, ": expected every col entry in [0, ", a.K, ") (x has K = ", a.K,
              " inputs), got entries outside it");
  return p.out;
}

st::Tensor bsr_mm_cpu(const st::Tensor& x, const st::Tensor& crow_in, const st::Tensor& col_in,
                      const st::Tensor& blocks_in, const std::optional<st::Tensor>& bias) {
  const char* op = "bsr_mm";
  check_x(op, x);
  check_index(op, "crow", crow_in, st::kLong);
  check_index(op, "col", col_in, st::kInt);
  check_dim(op, "blocks", blocks_in, 3);
  check_weights(op, "blocks", blocks_in, x);
  const int64_t B = blocks_in.size(2), nnzb = blocks_in.size(0);
  BK_CHECK(B >= 1 && blocks_in.size(1) == B, op, ": expected blocks of shape [nnzb, B, B] (square), got ",
              blocks_in.sizes());
  BK_CHECK(crow_in.numel() >= 1, op, ": expected crow of shape [N / B + 1], got shape ", crow_in.sizes());
  const int64_t K = x.size(1), nbr = crow_in.numel() - 1, N = nbr * B, KB = K / B;
  BK_CHECK(K % B == 0, op, ": expected x's K = ", K, " to be a multiple of the block size B = ", B);
  BK_CHECK(col_in.numel() == nnzb, op, ": expected col of length ", nnzb, " (one per block), got ",
              col_in.numel());
  check_bias(op, bias, x, N);
  const st::Tensor crow = st::contiguous(crow_in), col = st::contiguous(col_in), blocks = st::contiguous(blocks_in);
  check_crow(op, crow, nnzb);
  const int32_t* cp = col.mutable_data_ptr<int32_t>();
  for (int64_t j = 0; j < nnzb; ++j)
    BK_CHECK(cp[j] >= 0 && cp[j] < KB, op, ": expected col entries in [0, K / B = ", KB, "), got col[", j,
                "] = ", cp[j]);
  Prepared p = prepare(x, bias, N, blocks);
  SparseArgs& a = p.a;
  a.crow = crow.mutable_data_ptr<int64_t>();
  a.col = cp;
  a.B = B;
  const int64_t M = a.M;
  if (M == 0 || N == 0) return p.out;
  const Kernels& k = best_kernels();
  if (k.bsr_panels && M >= panel_min_rows(kBsrPanelMinRows)) {
    st::Tensor packed;
    run_panels(k, a, packed, double(M) * double(nnzb) * double(B * B),
               [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) { k.bsr_panels(a, m0, m1, n0, n1); });
    return p.out;
  }
  if (M < kBsrTransposeM) {
    st::parallel_for(0, nbr, bigkernels::grain_for(nbr, double(nnzb) * double(B * B) * double(M)),
                     [&](int64_t r0, int64_t r1) { k.bsr_rows(a, 0, M, r0, r1); });
    return p.out;
  }
  // one scratch buffer per thread: the widest block row, transposed to fp32
  const int64_t* c = a.crow;
  int64_t widest = 0;
  for (int64_t r = 0; r < nbr; ++r) widest = std::max(widest, c[r + 1] - c[r]);
  const int64_t per_thread = std::max<int64_t>(1, widest * B * B);
  st::ThreadSlots slots;  // one per parallel_for chunk (at most one chunk per thread)
  std::vector<float> scratch(size_t(per_thread) * size_t(slots.slots()));
  // rows of x in blocks of 96..384 (each block re-transposes its block row), block rows in parallel
  const int64_t want = 4 * int64_t(st::get_num_threads());
  int64_t mb = std::max<int64_t>(96, std::min<int64_t>(384, (M * nbr + want - 1) / want));
  const int64_t mblocks = (M + mb - 1) / mb;
  st::parallel_for(0, mblocks * nbr, 1, [&](int64_t b, int64_t e) {
    SparseArgs t = a;
    t.scratch = scratch.data() + size_t(slots.take()) * size_t(per_thread);
    for (int64_t i = b; i < e; ++i) {
      const int64_t mi = i / nbr, r = i % nbr;
      k.bsr_rows(t, mi * mb, std::min(M, (mi + 1) * mb), r, r + 1);
    }
  });
  return p.out;
}

st::Tensor sparse24_mm_cpu(const st::Tensor& x, const st::Tensor& values_in, const st::Tensor& meta_in,
                           const std::optional<st::Tensor>& bias) {
  const char* op = "sparse24_mm";
  check_x(op, x);
  check_dim(op, "values", values_in, 2);
  check_weights(op, "values", values_in, x);
  check_dim(op, "meta", meta_in, 2);
  BK_CHECK(meta_in.scalar_type() == st::kByte, op, ": expected meta of dtype torch.uint8, got ",
              meta_in.scalar_type());
  const int64_t K = x.size(1), N = values_in.size(0);
  BK_CHECK(K % 4 == 0, op, ": expected x's K = ", K, " to be a multiple of 4 (groups of 4 inputs)");
  BK_CHECK(values_in.size(1) * 2 == K, op, ": expected values of shape [N, K / 2 = ", K / 2, "], got ",
              values_in.sizes());
  BK_CHECK(meta_in.size(0) == N && meta_in.size(1) * 4 == K, op, ": expected meta of shape [", N,
              ", K / 4 = ", K / 4, "], got ", meta_in.sizes());
  check_bias(op, bias, x, N);
  const st::Tensor values = st::contiguous(values_in), meta = st::contiguous(meta_in);
  Prepared p = prepare(x, bias, N, values);
  SparseArgs& a = p.a;
  a.meta = meta.mutable_data_ptr<uint8_t>();
  const Kernels& k = best_kernels();
  if (a.M == 0 || N == 0) return p.out;
  if (k.sparse24_lanes && a.M >= panel_min_rows(kSparse24LanesMinRows)) {
    st::Tensor packed;
    run_lanes(a, packed, double(a.M) * double(N) * double(K / 2),
              [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) { k.sparse24_lanes(a, m0, m1, n0, n1); });
    return p.out;
  }
  if (k.sparse24_permil) {  // fewer rows than the lanes want: rows of x quad-swapped (see sparse_cpu.h)
    const int64_t M = a.M, ldx = K / 16 * 16;
    const st::Tensor xs = st::empty({std::max<int64_t>(M * ldx, 1)}, st::options(p.x32));
    float* dst = xs.mutable_data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k0 = 0; k0 < ldx; k0 += 16) {
        const float* src = a.x + m * K + k0;
        float* d = dst + m * ldx + k0;
        std::memcpy(d, src, 4 * sizeof(float));
        std::memcpy(d + 4, src + 8, 4 * sizeof(float));
        std::memcpy(d + 8, src + 4, 4 * sizeof(float));
        std::memcpy(d + 12, src + 12, 4 * sizeof(float));
      }
    a.xt = dst;
    for_each_block(M, N, M, M, 8, double(N) * double(K / 2) * double(M), [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
      k.sparse24_permil(a, m0, m1, n0, n1);
    });
    return p.out;
  }
  if (a.M == 1) {  // one dot product per feature, x read in place, blocks of features in parallel
    for_each_block(a.M, N, 1, 1, 8, double(N) * double(K / 2), [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
      k.sparse24_rows(a, m0, m1, n0, n1);
    });
    return p.out;
  }
  // x packed in groups of PR rows, each [ceil(K / PK)][PR][PK] (see SparseArgs::xt)
  constexpr int64_t PR = kSparse24PackRows, PK = kSparse24PackK;
  const int64_t steps = (K + PK - 1) / PK, groups = (a.M + PR - 1) / PR;
  const st::Tensor xpack = st::zeros({groups * (steps * PR * PK + kSparse24PackPad)}, st::options(p.x32));
  {
    float* dst = xpack.mutable_data_ptr<float>();
    const float* src = a.x;
    st::parallel_for(0, a.M, std::max<int64_t>(4, bigkernels::grain_for(a.M, 4.0 * double(a.M) * double(K))),
                     [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m) {
        float* d = dst + m / PR * (steps * PR * PK + kSparse24PackPad) + m % PR * PK;
        for (int64_t s = 0; s < steps; ++s)
          std::memcpy(d + s * PR * PK, src + m * K + s * PK, sizeof(float) * std::min(PK, K - s * PK));
      }
    });
  }
  a.xt = xpack.mutable_data_ptr<float>();
  // rows of x in blocks whose packed copy stays in L2 while each tile of features' weights, read
  // once from memory, meets all of them
  const int64_t mb = std::max<int64_t>(4, std::min<int64_t>(64, kSparse24PackedX / std::max<int64_t>(K, 1) / 4 * 4));
  for_each_block(a.M, N, 4, mb, 8, double(N) * double(K / 2) * double(a.M), [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    k.sparse24_rows(a, m0, m1, n0, n1);
  });
  return p.out;
}

// ------------------------------------------------------------------ to dense
// The dense weight [N, K] of a 2:4 or CSR format, in the stored dtype: the layers' "decompress"
// path (the dense product on a weight built for the call, which wins over the sparse kernels
// at large batches on small layers) and the sparse ops' backward. One pass over the output,
// rows in parallel; the weights are copied bit for bit (2 or 4 bytes each).
template <class Bits>
void sparse24_rows_to_dense(const Bits* values, const uint8_t* meta, int64_t K, int64_t n0, int64_t n1, Bits* out) {
  for (int64_t n = n0; n < n1; ++n) {
    const Bits* v = values + n * (K / 2);
    const uint8_t* mt = meta + n * (K / 4);
    Bits* o = out + n * K;
    // zeros, then the kept two of every four straight to memory (a group built on the stack and
    // copied stalls on store forwarding: 3x slower)
    std::memset(o, 0, sizeof(Bits) * size_t(K));
    for (int64_t g = 0; g < K / 4; ++g) {
      o[4 * g + (mt[g] & 3)] = v[2 * g];
      o[4 * g + ((mt[g] >> 2) & 3)] = v[2 * g + 1];
    }
  }
}

st::Tensor sparse24_to_dense_cpu(const st::Tensor& values_in, const st::Tensor& meta_in) {
  const char* op = "sparse24_to_dense";
  check_dim(op, "values", values_in, 2);
  BK_CHECK(is_float(values_in.scalar_type()), op, ": expected values of dtype float32, bfloat16 or float16, got ",
           values_in.scalar_type());
  check_dim(op, "meta", meta_in, 2);
  BK_CHECK(meta_in.scalar_type() == st::kByte, op, ": expected meta of dtype torch.uint8, got ", meta_in.scalar_type());
  const int64_t N = values_in.size(0), K = 2 * values_in.size(1);
  BK_CHECK(K % 4 == 0 && meta_in.size(0) == N && meta_in.size(1) * 4 == K, op, ": expected meta of shape [", N,
           ", ", K / 4, "] for values of shape ", values_in.sizes(), " (and values.size(1) even), got ",
           meta_in.sizes());
  const st::Tensor values = st::contiguous(values_in), meta = st::contiguous(meta_in);
  st::Tensor out = st::empty({N, K}, st::options(values));
  if (N == 0 || K == 0) return out;
  const uint8_t* mt = meta.mutable_data_ptr<uint8_t>();
  const bool wide = values.scalar_type() == st::kFloat;
  const Kernels& k = best_kernels();
  st::parallel_for(0, N, bigkernels::grain_for(N, 4.0 * double(N) * double(K)), [&](int64_t n0, int64_t n1) {
    if (wide && k.sparse24_to_dense_f32)
      k.sparse24_to_dense_f32(static_cast<const float*>(values.data_ptr()), mt, K, n0, n1,
                              static_cast<float*>(out.data_ptr()));
    else if (wide)
      sparse24_rows_to_dense(static_cast<const uint32_t*>(values.data_ptr()), mt, K, n0, n1,
                             static_cast<uint32_t*>(out.data_ptr()));
    else
      sparse24_rows_to_dense(static_cast<const uint16_t*>(values.data_ptr()), mt, K, n0, n1,
                             static_cast<uint16_t*>(out.data_ptr()));
  });
  return out;
}

template <class Bits>
int64_t csr_rows_to_dense(const int64_t* crow, const int32_t* col, const Bits* values, int64_t K, int64_t n0,
                          int64_t n1, Bits* out) {
  int64_t bad = 0;
  for (int64_t n = n0; n < n1; ++n) {
    Bits* o = out + n * K;
    std::memset(o, 0, sizeof(Bits) * size_t(K));
    for (int64_t j = crow[n]; j < crow[n + 1]; ++j) {
      if (uint64_t(int64_t(col[j])) >= uint64_t(K)) {
        ++bad;
        continue;
      }
      o[col[j]] = values[j];
    }
  }
  return bad;
}

st::Tensor csr_to_dense_cpu(const st::Tensor& crow_in, const st::Tensor& col_in, const st::Tensor& values_in,
                            int64_t in_features) {
  const char* op = "csr_to_dense";
  check_index(op, "crow", crow_in, st::kLong);
  check_index(op, "col", col_in, st::kInt);
  check_dim(op, "values", values_in, 1);
  BK_CHECK(is_float(values_in.scalar_type()), op, ": expected values of dtype float32, bfloat16 or float16, got ",
           values_in.scalar_type());
  BK_CHECK(crow_in.numel() >= 1, op, ": expected crow of shape [N + 1], got shape ", crow_in.sizes());
  BK_CHECK(in_features >= 0, op, ": expected in_features >= 0, got ", in_features);
  const int64_t N = crow_in.numel() - 1, nnz = values_in.numel(), K = in_features;
  BK_CHECK(col_in.numel() == nnz, op, ": expected col and values of the same length, got col of ", col_in.numel(),
           " and values of ", nnz);
  const st::Tensor crow = st::contiguous(crow_in), col = st::contiguous(col_in), values = st::contiguous(values_in);
  check_crow(op, crow, nnz);
  st::Tensor out = st::empty({N, K}, st::options(values));
  if (N == 0 || K == 0) {  // (N = 0: check_crow has made nnz 0)
    BK_CHECK(nnz == 0, op, ": expected every col entry in [0, ", K, "), got entries outside it");
    return out;
  }
  const int64_t* c = crow.mutable_data_ptr<int64_t>();
  const int32_t* cl = col.mutable_data_ptr<int32_t>();
  const bool wide = values.scalar_type() == st::kFloat;
  std::atomic<int64_t> bad{0};
  st::parallel_for(0, N, bigkernels::grain_for(N, 4.0 * double(N) * double(K)), [&](int64_t n0, int64_t n1) {
    bad += wide ? csr_rows_to_dense(c, cl, static_cast<const uint32_t*>(values.data_ptr()), K, n0, n1,
                                    static_cast<uint32_t*>(out.data_ptr()))
                : csr_rows_to_dense(c, cl, static_cast<const uint16_t*>(values.data_ptr()), K, n0, n1,
                                    static_cast<uint16_t*>(out.data_ptr()));
  });
  BK_CHECK(bad.load() == 0, op, ": expected every col entry in [0, ", K, "), got entries outside it");
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(bigkernels, CPU, m) {
  m.impl("sparse24_to_dense", TORCH_BOX(&sparse24_to_dense_cpu));
  m.impl("csr_to_dense", TORCH_BOX(&csr_to_dense_cpu));
  m.impl("csr_mm", TORCH_BOX(&csr_mm_cpu));
  m.impl("bsr_mm", TORCH_BOX(&bsr_mm_cpu));
  m.impl("sparse24_mm", TORCH_BOX(&sparse24_mm_cpu));
}

}  // namespace bigkernels::sparse::cpu
