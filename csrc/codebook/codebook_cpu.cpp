// CPU binding of the codebook (weight-sharing) ops: validates every argument before any work,
// picks the instruction set at run time and splits the work into blocks run with
// st::parallel_for. Kernels live in codebook_cpu_{scalar,avx2,encode}.cpp behind codebook_cpu.h.
#include "common/stable.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <vector>

#include "codebook/codebook_cpu.h"
#include "common/cpu_features.h"
#include "common/cpu_parallel.h"

namespace bigkernels::codebook::cpu {

const Kernels& best_kernels() {
  // Levels as in optim_cpu.cpp's best_kernels (scalar 0, avx2 1); no AVX-512 instance here.
  static const int cpu_level = bigkernels::cpu_has_avx2_fma_f16c() ? 1 : 0;
  return std::min(cpu_level, bigkernels::cpu_isa_level_cap()) >= 1 ? avx2_kernels() : scalar_kernels();
}

namespace {

bool is_float(st::ScalarType t) { return t == st::kFloat || t == st::kHalf || t == st::kBFloat16; }

DType float_dtype(st::ScalarType t) {
  return t == st::kHalf ? DType::f16 : (t == st::kBFloat16 ? DType::bf16 : DType::f32);
}

void check_cpu(const char* op, const char* name, const st::Tensor& t) {
  BK_CHECK(t.device().is_cpu(), op, ": expected ", name, " on the CPU, got a tensor on ", t.device());
}

int64_t packed_cols(int64_t K, int bits) {
  if (bits == 3) return 3 * ((K + 7) / 8);
  const int64_t per = 8 / bits;
  return (K + per - 1) / per;
}

// Validates indices [N, P] uint8 and centroids [G, 2**bits] (float) for K inputs per row and
// group_size rows per codebook; returns bits.
int check_format(const char* op, const st::Tensor& indices, const st::Tensor& centroids, int64_t K,
                 int64_t group_size) {
  check_cpu(op, "indices", indices);
  check_cpu(op, "centroids", centroids);
  BK_CHECK(indices.dim() == 2 && indices.scalar_type() == st::kByte, op,
              ": expected indices [N, packed] of dtype torch.uint8, got ", indices.scalar_type(), " with shape ",
              indices.sizes());
  BK_CHECK(centroids.dim() == 2 && is_float(centroids.scalar_type()), op,
              ": expected centroids [groups, 2**bits] of dtype float32, bfloat16 or float16, got ",
              centroids.scalar_type(), " with shape ", centroids.sizes());
  const int64_t C = centroids.size(1);
  const int bits = C == 4 ? 2 : C == 8 ? 3 : C == 16 ? 4 : C == 256 ? 8 : 0;
  BK_CHECK(bits != 0, op, ": expected centroids with 4, 8, 16 or 256 columns (2**bits for bits in 2, 3, 4, 8), ",
              "got shape ", centroids.sizes());
  BK_CHECK(group_size > 0, op, ": expected a positive group_size, got ", group_size);
  BK_CHECK(K >= 0, op, ": expected a non-negative in_features, got ", K);
  const int64_t N = indices.size(0);
  BK_CHECK(indices.size(1) == packed_cols(K, bits), op, ": indices of ", K, " ", bits, "-bit entries per row need ",
              packed_cols(K, bits), " bytes per row, got shape ", indices.sizes());
  const int64_t groups = std::max<int64_t>(1, (N + group_size - 1) / group_size);
  BK_CHECK(centroids.size(0) == groups, op, ": ", N, " output rows in groups of ", group_size, " need ", groups,
              " codebooks, got centroids of shape ", centroids.sizes());
  return bits;
}

// Byte rows with unit stride (a row stride is fine); otherwise a contiguous copy.
st::Tensor rows_unit_stride(const st::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) && t.stride(0) >= std::max<int64_t>(t.size(1), 1) ? t : st::contiguous(t);
}

st::Tensor as_f32(const st::Tensor& t) {
  return t.scalar_type() == st::kFloat ? rows_unit_stride(t) : st::contiguous(st::to(t, st::kFloat));
}

Format format_of(const st::Tensor& idx, const st::Tensor& table, int64_t K, int64_t group_size, int bits) {
  return Format{idx.numel() ? idx.mutable_data_ptr<uint8_t>() : nullptr, idx.stride(0), table.mutable_data_ptr<float>(), group_size,
                bits, K};
}

// Below this many multiply-adds a product runs on the calling thread: waking the other threads
// costs more (and, on a loaded machine, can cost milliseconds).
constexpr int64_t kSerialWork = 1 << 18;

// Splits out [M, N] into blocks and runs fn(m0, m1, n0, n1) on them in parallel. A block holds up
// to 64 rows of x and ~128 KiB of packed W rows (which stay in L2 while the kernel's row tiles
// of x pass over them); blocks shrink (rows of W first: M = 1 splits N) until every thread gets
// about four; threads take blocks as they finish one, as many threads as threads_for(work) (from
// 2 x 2^18 multiply-adds: a 1 x 1024 x 1024 product uses two; see common/cpu_parallel.h for the
// trade-off on a machine busier than its cores).
template <class Fn>
void for_each_block(int64_t M, int64_t N, int64_t K, int64_t w_row_bytes, const Fn& fn) {
  if (M == 0 || N == 0) return;
  const double work = double(M) * double(N) * double(std::max<int64_t>(K, 1));
  if (bigkernels::threads_for(work) == 1) return fn(0, M, 0, N);
  constexpr int64_t kRowsPerBlock = 64, kWBlockBytes = 128 << 10, kN = 4, kM = 4;
  const int64_t want = 4 * int64_t(st::get_num_threads());
  int64_t nb = std::max<int64_t>(kN, kWBlockBytes / std::max<int64_t>(w_row_bytes, 1) / kN * kN);
  int64_t mb = std::min<int64_t>(M, kRowsPerBlock);
  auto blocks = [&] { return ((M + mb - 1) / mb) * ((N + nb - 1) / nb); };
  while (blocks() < want && nb > kN) nb = std::max<int64_t>(kN, nb / 2 / kN * kN);
  while (blocks() < want && mb > kM) mb = std::max<int64_t>(kM, mb / 2 / kM * kM);
  const int64_t mblocks = (M + mb - 1) / mb;
  bigkernels::parallel_units(blocks(), [&](int64_t blk) {
    const int64_t mi = blk % mblocks, ni = blk / mblocks;
    fn(mi * mb, std::min(M, (mi + 1) * mb), ni * nb, std::min(N, (ni + 1) * nb));
  }, bigkernels::threads_for(work));
}

// Rows [0, N) in chunks of about `work` elements of K each, in parallel.
template <class Fn>
void for_each_rows(int64_t N, int64_t K, const Fn& fn) {
  if (N == 0) return;
  if (N * std::max<int64_t>(K, 1) <= kSerialWork) return fn(0, N);
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(K, 1));
  st::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { fn(n0, n1); });
}

st::Tensor codebook_mm_cpu(const st::Tensor& x_in, const st::Tensor& indices_in, const st::Tensor& centroids,
                           const std::optional<st::Tensor>& bias, int64_t group_size) {
  const char* op = "codebook_mm";
  check_cpu(op, "x", x_in);
  BK_CHECK(x_in.dim() == 2 && is_float(x_in.scalar_type()), op,
              ": expected a 2-D x of dtype float32, bfloat16 or float16, got ", x_in.scalar_type(), " with shape ",
              x_in.sizes());
  const int64_t K = x_in.size(1);
  const int bits = check_format(op, indices_in, centroids, K, group_size);
  const int64_t N = indices_in.size(0), M = x_in.size(0);
  if (bias.has_value()) {
    check_cpu(op, "bias", *bias);
    BK_CHECK(bias->dim() == 1 && bias->size(0) == N && is_float(bias->scalar_type()), op,
                ": expected a float bias of shape [", N, "] (one per output row), got ", bias->scalar_type(),
                " with shape ", bias->sizes());
  }
  st::Tensor out = st::empty({M, N}, st::options(x_in));
  if (M == 0 || N == 0) return out;
  const st::Tensor x = as_f32(x_in), idx = rows_unit_stride(indices_in), table = st::contiguous(st::to(centroids, st::kFloat));
  const std::optional<st::Tensor> bi = bias.has_value() ? std::optional<st::Tensor>(st::contiguous(st::to(*bias, st::kFloat)))
                                                        : std::nullopt;
  const Kernels& k = best_kernels();
  GemmArgs g{format_of(idx, table, K, group_size, bits), x.mutable_data_ptr<float>(), x.stride(0), nullptr,
             bi ? bi->mutable_data_ptr<float>() : nullptr, out.data_ptr(), N, float_dtype(out.scalar_type())};
  // Larger M: the panel engine (x packed once; blocks of up to 264 rows x 128 columns, as quant's).
  const char* min_rows_env = std::getenv("BIGKERNELS_PANEL_MIN_ROWS");  // tuning override
  if (k.engine_gemm && M >= (min_rows_env ? std::atoll(min_rows_env) : k.engine_min_rows(bits))) {
    st::Tensor ap = st::empty({packed_x_floats(M, K)}, st::options(x));
    float* app = ap.mutable_data_ptr<float>();
    const int64_t panels = (M + kPanelRows - 1) / kPanelRows;
    st::parallel_for(0, panels, bigkernels::grain_for(panels, 4.0 * double(M) * double(K)),
                     [&](int64_t p0, int64_t p1) { k.pack_x(g.x, g.ldx, M, K, p0, p1, app); });
    g.a_packed = app;
    bigkernels::for_each_engine_block(M, N, kPanelRows, 264, kPanelCols, 128, double(M) * double(N) * double(K),
                                      [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) { k.engine_gemm(g, m0, m1, n0, n1); });
    return out;
  }
  // Small M on the 4-bit lookup path: x rearranged once here rather than by every block.
  st::Tensor xp;
  if (bits == 4 && k.permute_x && M < k.permute_rows && K >= 64) {
    xp = st::empty({M, K / 64 * 64}, st::options(x));
    k.permute_x(g.x, g.ldx, K, 0, M, xp.mutable_data_ptr<float>());
    g.xp = xp.mutable_data_ptr<float>();
  }
  for_each_block(M, N, K, std::max<int64_t>(idx.size(1), 1),
                 [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) { k.lut_gemm(g, m0, m1, n0, n1); });
  return out;
}

st::Tensor codebook_dequantize_cpu(const st::Tensor& indices_in, const st::Tensor& centroids, int64_t in_features,
                                  int64_t group_size) {
  const char* op = "codebook_dequantize";
  const int bits = check_format(op, indices_in, centroids, in_features, group_size);
  const int64_t N = indices_in.size(0);
  st::Tensor out = st::empty({N, in_features}, st::options(centroids));
  if (N == 0 || in_features == 0) return out;
  const st::Tensor idx = rows_unit_stride(indices_in), table = st::contiguous(st::to(centroids, st::kFloat));
  const Format f = format_of(idx, table, in_features, group_size, bits);
  const Kernels& k = best_kernels();
  void* o = out.data_ptr();
  const DType dt = float_dtype(out.scalar_type());
  for_each_rows(N, in_features, [&](int64_t n0, int64_t n1) { k.dequantize_rows(f, n0, n1, o, in_features, dt); });
  return out;
}

st::Tensor codebook_quantize_cpu(const st::Tensor& weight, const st::Tensor& centroids, int64_t group_size) {
  const char* op = "codebook_quantize";
  check_cpu(op, "weight", weight);
  check_cpu(op, "centroids", centroids);
  BK_CHECK(weight.dim() == 2 && is_float(weight.scalar_type()), op,
              ": expected a 2-D weight of dtype float32, bfloat16 or float16, got ", weight.scalar_type(),
              " with shape ", weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  BK_CHECK(centroids.dim() == 2, op, ": expected centroids [groups, 2**bits], got shape ", centroids.sizes());
  const int64_t C = centroids.size(1);
  const int bits = C == 4 ? 2 : C == 8 ? 3 : C == 16 ? 4 : C == 256 ? 8 : 0;
  BK_CHECK(bits != 0, op, ": expected centroids with 4, 8, 16 or 256 columns, got shape ", centroids.sizes());
  st::Tensor out = st::empty({N, packed_cols(K, bits)}, st::options(weight).dtype(st::kByte));
  check_format(op, out, centroids, K, group_size);
  const st::Tensor table = st::contiguous(st::to(centroids, st::kFloat));
  const int64_t G = table.size(0);
  // midpoints between consecutive centroids (+inf in the last slot); the centroids must ascend
  std::vector<float> mids(size_t(G * C));
  const float* t = table.mutable_data_ptr<float>();
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t j = 0; j + 1 < C; ++j) {
      const float a = t[g * C + j], b = t[g * C + j + 1];
      BK_CHECK(a <= b, op, ": the centroids of each codebook must be sorted ascending (and not NaN); codebook ",
                  g, " has ", a, " before ", b);
      mids[size_t(g * C + j)] = (a + b) * 0.5f;
    }
    mids[size_t(g * C + C - 1)] = std::numeric_limits<float>::infinity();
  }
  if (N == 0 || K == 0) return out;
  const st::Tensor w = as_f32(weight);
  const Format f = format_of(out, table, K, group_size, bits);
  const float* wp = w.mutable_data_ptr<float>();
  const int64_t ldw = w.stride(0);
  uint8_t* op_ = out.mutable_data_ptr<uint8_t>();
  for_each_rows(N, K, [&](int64_t n0, int64_t n1) { encode_rows(f, mids.data(), wp, ldw, n0, n1, op_); });
  return out;
}

st::Tensor codebook_centroid_grad_cpu(const st::Tensor& grad_w_in, const st::Tensor& indices_in,
                                     const st::Tensor& centroids, int64_t group_size) {
  const char* op = "codebook_centroid_grad";
  check_cpu(op, "grad_w", grad_w_in);
  BK_CHECK(grad_w_in.dim() == 2 && is_float(grad_w_in.scalar_type()) && grad_w_in.size(0) == indices_in.size(0),
              op, ": expected a float grad_w [N, K] with N = ", indices_in.size(0), " (the rows of indices), got ",
              grad_w_in.scalar_type(), " with shape ", grad_w_in.sizes());
  const int64_t N = grad_w_in.size(0), K = grad_w_in.size(1);
  const int bits = check_format(op, indices_in, centroids, K, group_size);
  const int64_t G = centroids.size(0), C = centroids.size(1);
  if (N == 0 || K == 0) return st::zeros(centroids.sizes(), st::options(centroids));
  const st::Tensor gw = as_f32(grad_w_in), idx = rows_unit_stride(indices_in);
  const st::Tensor table = st::contiguous(st::to(centroids, st::kFloat));
  const Format f = format_of(idx, table, K, group_size, bits);
  // Deterministic whatever the thread count: fixed blocks of rows (never straddling a group),
  // each summing into its own partial, then the partials of each group added in block order.
  const int64_t rows = std::max<int64_t>(1, (1 << 16) / K);
  std::vector<int64_t> starts;  // block b covers rows [starts[b], starts[b + 1])
  for (int64_t n = 0; n < N;) {
    starts.push_back(n);
    n = std::min({N, n + rows, (n / group_size + 1) * group_size});
  }
  starts.push_back(N);
  const int64_t nblocks = int64_t(starts.size()) - 1;
  std::vector<double> partial(size_t(nblocks * C), 0.0);
  const float* gp = gw.mutable_data_ptr<float>();
  const int64_t ldg = gw.stride(0);
  st::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      centroid_sums(f, gp, ldg, starts[size_t(b)], starts[size_t(b + 1)], partial.data() + b * C);
    }
  });
  std::vector<double> total(size_t(G * C), 0.0);
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t grp = starts[size_t(b)] / group_size;
    for (int64_t c = 0; c < C; ++c) total[size_t(grp * C + c)] += partial[size_t(b * C + c)];
  }
  st::Tensor out = st::empty({G, C}, st::options(centroids).dtype(st::kFloat));
  float* o = out.mutable_data_ptr<float>();
  for (int64_t i = 0; i < G * C; ++i) o[i] = float(total[size_t(i)]);
  return st::to(out, centroids.scalar_type());
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(bigkernels, CPU, m) {
  m.impl("codebook_mm", TORCH_BOX(&codebook_mm_cpu));
  m.impl("codebook_dequantize", TORCH_BOX(&codebook_dequantize_cpu));
  m.impl("codebook_quantize", TORCH_BOX(&codebook_quantize_cpu));
  m.impl("codebook_centroid_grad", TORCH_BOX(&codebook_centroid_grad_cpu));
}

}  // namespace bigkernels::codebook::cpu
